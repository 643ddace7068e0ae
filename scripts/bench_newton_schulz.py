"""Muon's Newton-Schulz on a preset's routed-expert matrices: one call per expert matrix (what
torch.optim.Muon does with 2-D parameters) against nanomoe's batched iteration over each stacked
(E, rows, cols) tensor (what `optimizer=muon` runs). Prints one JSON line per round, three rounds
of each preset in turn, seconds per optimizer step's worth of expert matrices.

    .venv/bin/python scripts/bench_newton_schulz.py                     # budget-moe and tiny-moe
    .venv/bin/python scripts/bench_newton_schulz.py --presets tiny-moe
"""

import argparse
import json
import time

import torch
from torch.optim._muon import _zeropower_via_newtonschulz as per_matrix  # torch's own iteration

from nanomoe.model import GPT
from nanomoe.moe import GroupedExperts
from nanomoe.presets import get_preset
from nanomoe.training.optimizers import batched_newton_schulz

COEFFS, STEPS, EPS = (3.4445, -4.7750, 2.0315), 5, 1e-7


def expert_stacks(preset: str) -> list[torch.Tensor]:
    """Random stand-ins shaped like the preset's stacked expert weights (w_in and w_out of each layer)."""
    with torch.device("meta"):
        model = GPT(get_preset(preset))
    shapes = [p.shape for m in model.modules() if isinstance(m, GroupedExperts) for p in (m.w_in, m.w_out)]
    return [torch.randn(shape) for shape in shapes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["budget-moe", "tiny-moe"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for preset in args.presets:
        stacks = expert_stacks(preset)
        matrices = [m for s in stacks for m in s.unbind(0)]
        for _ in range(args.rounds):
            start = time.perf_counter()
            for m in matrices:
                per_matrix(m, COEFFS, STEPS, EPS)
            loop = time.perf_counter() - start
            start = time.perf_counter()
            for s in stacks:
                batched_newton_schulz(s, COEFFS, STEPS, EPS)
            stacked = time.perf_counter() - start
            print(json.dumps({"preset": preset, "matrices": len(matrices), "shapes": sorted({tuple(s.shape[1:]) for s in stacks}),
                              "threads": torch.get_num_threads(), "per_matrix_s": round(loop, 3),
                              "batched_s": round(stacked, 3)}))


if __name__ == "__main__":
    main()
