"""Build (or verify) the native CPU kernels: `python -m nanomoe.kernels.build`, run by scripts/setup.sh.

Compiles nanomoe/kernels/csrc for this CPU (once; later runs find the build and only verify it),
then checks one op of each kernel family against the torch reference. Where no compiler exists it
says so and exits 0: training then runs on the torch kernels (pass --strict to fail instead).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def verify() -> None:
    """Raise AssertionError if the native ops disagree with the reference on a small input."""
    from . import NATIVE, TORCH

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=gen, requires_grad=True)
    w = torch.rand(32, generator=gen) + 0.5
    torch.testing.assert_close(NATIVE.rms_norm(x, w, 1e-5), TORCH.rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-5)
    h = torch.randn(6, 64, generator=gen)
    torch.testing.assert_close(NATIVE.swiglu(h), TORCH.swiglu(h), rtol=1e-5, atol=1e-5)
    logits, targets = torch.randn(6, 50, generator=gen), torch.randint(0, 50, (6,), generator=gen)
    torch.testing.assert_close(NATIVE.cross_entropy_sum(logits, targets), TORCH.cross_entropy_sum(logits, targets))
    indices = torch.randint(0, 4, (10, 2), generator=gen)
    native_plan, torch_plan = NATIVE.expert_plan(indices, 4, None, 1), TORCH.expert_plan(indices, 4, None, 1)
    assert torch.equal(native_plan.token_R, torch_plan.token_R), "the native dispatch plan differs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanomoe.kernels.build", description=__doc__.splitlines()[0])
    parser.add_argument("--strict", action="store_true", help="exit 1 when the kernels cannot be built")
    args = parser.parse_args(argv)
    from .extension import build_error, is_built, load_extension

    if is_built():  # otherwise load_extension announces the build itself
        print("nanomoe: native CPU kernels already built; verifying...", flush=True)
    start = time.perf_counter()
    if load_extension() is None:
        print(f"nanomoe: the native kernels could not be built ({build_error()}); "
              "training will run on the torch kernels (kernels='torch')", flush=True)
        return 1 if args.strict else 0
    verify()
    print(f"nanomoe: native CPU kernels ready ({time.perf_counter() - start:.0f} s); kernels='auto' uses them",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
