"""Muon's Newton-Schulz on tiny-moe's expert matrices: one call per expert matrix (what
torch.optim.Muon does) against one batched iteration over each stacked (E, rows, cols) tensor.
Prints seconds for each, three rounds in turn. Run: .venv/bin/python scripts/bench_newton_schulz.py"""

import json
import time

import torch
from torch.optim._muon import _zeropower_via_newtonschulz as per_matrix  # torch's own iteration

COEFFS, STEPS, EPS = (3.4445, -4.7750, 2.0315), 5, 1e-7


def batched(G: torch.Tensor) -> torch.Tensor:
    a, b, c = COEFFS
    X = G.bfloat16()
    tall = X.size(-2) > X.size(-1)
    X = X.mT if tall else X
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + EPS)
    for _ in range(STEPS):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


def main() -> None:
    n_layer, n_experts, d, hidden = 6, 8, 256, 512  # tiny-moe: w_in (E, D, 2H) as 2 matrices, w_out (E, H, D)
    stacks = [torch.randn(n_experts, hidden, d) for _ in range(3 * n_layer)]
    matrices = [m for s in stacks for m in s.unbind(0)]
    for _ in range(3):
        start = time.perf_counter()
        for m in matrices:
            per_matrix(m, COEFFS, STEPS, EPS)
        loop = time.perf_counter() - start
        start = time.perf_counter()
        for s in stacks:
            batched(s)
        stacked = time.perf_counter() - start
        print(json.dumps({"matrices": len(matrices), "threads": torch.get_num_threads(),
                          "per_matrix_s": round(loop, 3), "batched_s": round(stacked, 3)}))


if __name__ == "__main__":
    main()
