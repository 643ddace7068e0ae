"""A/B of the decoder's attention span: batched greedy decoding that attends over the written KV
cache slots rounded up to 64 (what `Decoder` does) against reading the whole cache, in one
process, interleaved. The figures in docs/generation.md and the README come from this script.

    python research/decode_span_ab.py [--preset tiny-llama] [--batch-size 32] [--new-tokens 256]
                                        [--repeats 3] [--no-compile]
"""

from __future__ import annotations

import argparse
import time

import torch

from nanomoe import generation
from nanomoe.model import GPT
from nanomoe.presets import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT(get_preset(args.preset)).eval().to(torch.bfloat16)
    prompts = [[1]] * args.batch_size
    growing = generation.Decoder._span

    def whole_cache(decoder) -> int:
        return decoder.max_len

    def tokens_per_s(span) -> float:
        generation.Decoder._span = span
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                generation.generate_batch(model, prompts, args.new_tokens, temperature=0,
                                          compile=not args.no_compile)
                return args.batch_size * args.new_tokens / (time.perf_counter() - t0)
        finally:
            generation.Decoder._span = growing

    cases = {"span": growing, "whole_cache": whole_cache}
    for span in cases.values():  # compile (or warm up) both first
        tokens_per_s(span)
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, span in cases.items():
            results[name].append(tokens_per_s(span))
    for name, values in results.items():
        print(f"{name:<12} tokens/s: " + ", ".join(f"{v:.0f}" for v in values))


if __name__ == "__main__":
    main()
