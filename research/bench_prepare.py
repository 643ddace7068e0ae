"""Benchmark `nanomoe prepare` against its practical limit: one `Tokenizer.encode_batch` call.

Both sides start from a freshly loaded tokenizer and the same documents, and each repeat runs in
its own subprocess, so neither gets a warm BPE cache from the other. Repeats are interleaved and
both the median and the minimum wall time are reported, plus the median CPU time (all threads):
on a shared machine the minimum and the CPU time are the better estimates of what the work costs.

    python research/bench_prepare.py --source ../shared/data/tinystories [--repeats 5] [--json]

- baseline: `tokenizers.Tokenizer.from_file(...).encode_batch(all documents)` (the documents are
  read before the clock starts)
- prepare:  `nanomoe.data.prepare(source, fresh_dir, tokenizer=...)`, end to end: read and split the
  files, encode, write train.bin / val.bin / docs / meta.json
- cli:      `nanomoe prepare ...` as a user runs it (adds Python start-up and imports)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE = """
import sys, time
from tokenizers import Tokenizer
from nanomoe.data.sources import open_source, split_documents
docs = [t for _, t in split_documents(open_source(sys.argv[1]))]
tok = Tokenizer.from_file(sys.argv[2])
t0, c0 = time.perf_counter(), time.process_time()
tok.encode_batch(docs)
print(time.perf_counter() - t0, time.process_time() - c0)
"""

PREPARE = """
import sys, time
from nanomoe.data.prepare import run_prepare
t0, c0 = time.perf_counter(), time.process_time()
r = run_prepare(sys.argv[1], sys.argv[3], tokenizer=sys.argv[2], progress=False)
assert not r.skipped
print(time.perf_counter() - t0, time.process_time() - c0, r.source_bytes)
"""


def run(code: str, *args: str) -> list[float]:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout
    return [float(x) for x in out.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/tinystories"))
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: train a 2048 BPE, untimed)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="nanomoe-bench-") as tmp:
        tokenizer = args.tokenizer
        if tokenizer is None:
            from nanomoe.data.sources import open_source
            from nanomoe.data.tokenizer import train_bpe_tokenizer

            tokenizer = str(train_bpe_tokenizer(open_source(args.source).documents("train"), 2048).save(
                Path(tmp) / "tokenizer.json"))
        baseline, prep, cli = [], [], []
        baseline_cpu, prep_cpu = [], []
        n_bytes = 0
        for i in range(args.repeats):  # interleaved, so load from other processes hits both alike
            seconds, cpu = run(BASELINE, args.source, tokenizer)
            baseline.append(seconds)
            baseline_cpu.append(cpu)
            seconds, cpu, n_bytes = run(PREPARE, args.source, tokenizer, f"{tmp}/prep{i}")
            prep.append(seconds)
            prep_cpu.append(cpu)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "nanomoe", "prepare", "--source", args.source, "--out",
                            f"{tmp}/cli{i}", "--tokenizer", tokenizer, "--no-progress"], check=True,
                           capture_output=True)
            cli.append(time.perf_counter() - t0)

    med = statistics.median
    b, p, c = med(baseline), med(prep), med(cli)
    b_min, p_min = min(baseline), min(prep)
    mb = n_bytes / 1e6
    result = dict(
        source=args.source,
        megabytes=mb,
        repeats=args.repeats,
        cpus=os.cpu_count(),
        load_average=os.getloadavg()[0],
        encode_batch_seconds=b,
        prepare_seconds=p,
        ratio=p / b,
        encode_batch_min_seconds=b_min,
        prepare_min_seconds=p_min,
        ratio_of_minimums=p_min / b_min,
        encode_batch_cpu_seconds=med(baseline_cpu),
        prepare_cpu_seconds=med(prep_cpu),
        cpu_ratio=med(prep_cpu) / med(baseline_cpu),
        prepare_mb_per_s=mb / p,
        encode_batch_mb_per_s=mb / b,
        cli_seconds=c,
        all=dict(encode_batch=baseline, prepare=prep, encode_batch_cpu=baseline_cpu, prepare_cpu=prep_cpu, cli=cli),
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{mb:.2f} MB of text, {args.repeats} repeats, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print("                               median wall         minimum wall        median CPU time")
    print(f"  encode_batch (one call)   {b:7.3f} s {mb / b:5.2f} MB/s   {b_min:7.3f} s {mb / b_min:5.2f} MB/s"
          f"   {med(baseline_cpu):7.3f} s")
    print(f"  prepare (end to end)      {p:7.3f} s {mb / p:5.2f} MB/s   {p_min:7.3f} s {mb / p_min:5.2f} MB/s"
          f"   {med(prep_cpu):7.3f} s")
    print(f"  ratio prepare / encode_batch   {p / b:.2f}x               {p_min / b_min:.2f}x"
          f"               {med(prep_cpu) / med(baseline_cpu):.2f}x   (target <= 1.25x)")
    print(f"  nanomoe prepare (CLI)     {c:7.3f} s  (median, with Python start-up and imports)")


if __name__ == "__main__":
    main()
