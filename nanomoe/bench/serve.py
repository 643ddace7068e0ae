"""`nanomoe bench serve`: the server under load from concurrent streaming clients.

Starts `nanomoe serve` in a subprocess on a free 127.0.0.1 port, then runs two phases of --seconds
each: one client (the baseline), then --clients clients. Every client streams one completion after
another (up to --max-tokens new tokens each) until the phase's time is up; requests still
running then are finished and counted. Prints, per phase: requests/s, aggregate new tokens/s,
time to first token and inter-token latency (p50, p99, ms), errors; and the ratio of the two
phases' tokens/s. Without --checkpoint the model is --preset with random weights (speed does not
depend on their values) and a small byte-level tokenizer trained on the fly (the model's vocabulary
is cut to its size). Run it on a quiet machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..cli import add_command

PROMPTS = ["Once upon a time", "One day, a little girl named Lily", "The dog ran to the park and",
           "Tom had a red ball.", "In a small town there was a big tree", "The sun was hot and the cat"]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    import numpy as np

    return float(np.percentile(values, q))


async def _client(http, url: str, deadline: float, max_tokens: int, index: int, stats: dict) -> None:
    n = 0
    while time.perf_counter() < deadline:
        body = {"prompt": PROMPTS[(index + n) % len(PROMPTS)], "max_tokens": max_tokens, "stream": True,
                "temperature": 0.8, "stop": [], "stream_options": {"include_usage": True}}
        n += 1
        t0 = time.perf_counter()
        last, first, tokens = None, None, 0
        try:
            async with http.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    stats["errors"] += 1
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        stats["errors"] += 1
                        break
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        now = time.perf_counter()
                        if first is None:
                            first = now
                            stats["ttft"].append(now - t0)
                        else:
                            stats["itl"].append(now - last)
                        last = now
        except Exception:  # a refused or broken connection: count it and go on
            stats["errors"] += 1
            continue
        stats["requests"] += 1
        stats["tokens"] += tokens


async def _phase(base: str, clients: int, seconds: float, max_tokens: int) -> dict:
    import httpx

    stats = {"requests": 0, "tokens": 0, "errors": 0, "ttft": [], "itl": []}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(http, "/v1/completions", t0 + seconds, max_tokens, i, stats)
                               for i in range(clients)))
        elapsed = time.perf_counter() - t0

    def ms(values, q):
        p = percentile(values, q)
        return None if p is None else round(1000 * p, 2)

    return {"clients": clients, "seconds": round(elapsed, 2), "requests": stats["requests"],
            "requests_per_s": round(stats["requests"] / elapsed, 3), "tokens": stats["tokens"],
            "tokens_per_s": round(stats["tokens"] / elapsed, 2), "errors": stats["errors"],
            "ttft_p50_ms": ms(stats["ttft"], 50), "ttft_p99_ms": ms(stats["ttft"], 99),
            "inter_token_p50_ms": ms(stats["itl"], 50), "inter_token_p99_ms": ms(stats["itl"], 99)}


def _random_checkpoint(preset: str, directory: Path) -> Path:
    import torch

    from ..data.tokenizer import train_bpe_tokenizer
    from ..model import GPT
    from ..presets import get_preset
    from ..training import checkpoint as ckpt

    tokenizer = train_bpe_tokenizer([" ".join(PROMPTS)] * 50, vocab_size=get_preset(preset).vocab_size)
    torch.manual_seed(0)
    model = GPT(get_preset(preset, vocab_size=tokenizer.vocab_size))
    run = directory / preset
    ckpt.save_checkpoint(run, ckpt.checkpoint_name(0), model_state=model.state_dict(), model_config=model.config,
                         trainer_state={"step": 0}, tokenizer_json=tokenizer.to_json_str(), pointers={"latest": {}})
    return run


def _wait_for(base: str, proc: subprocess.Popen, timeout_s: float = 300) -> dict:
    import httpx

    from ..errors import ConfigError

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"the server exited with status {proc.returncode}: {proc.stderr.read().strip()[-500:]}")
        try:
            return httpx.get(base + "/health", timeout=5).json()
        except httpx.HTTPError:
            time.sleep(0.2)
    raise ConfigError(f"the server did not answer within {timeout_s:.0f} s")


def cmd_bench_serve(args) -> int:
    """Load test of `nanomoe serve`: requests/s, tokens/s, time to first token, inter-token latency.

    A single-client phase, then --clients concurrent streaming clients, --seconds each.

    Examples:
      nanomoe bench serve --json                              # tiny-moe, random weights
      nanomoe bench serve --checkpoint runs/tiny-moe --clients 16 --seconds 60 --json
    """
    from ..errors import ConfigError

    if args.clients < 1 or args.seconds <= 0 or args.max_tokens < 1:
        raise ConfigError("--clients and --max-tokens must be >= 1 and --seconds > 0")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.checkpoint) if args.checkpoint else _random_checkpoint(args.preset, Path(tmp))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "nanomoe", "serve", "--checkpoint", str(run), "--port", str(port),
                   "--max-batch", str(args.max_batch), "--dtype", args.dtype, "--log-level", "warning", "--grace", "1"]
        if args.threads:
            command += ["--threads", str(args.threads)]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        try:
            health = _wait_for(base, proc)
            result = {"model": str(args.checkpoint or f"{args.preset} (random weights)"), "backend": health["backend"],
                      "dtype": args.dtype, "max_batch": args.max_batch, "max_tokens": args.max_tokens}
            if not args.no_baseline:
                result["single"] = asyncio.run(_phase(base, 1, args.seconds, args.max_tokens))
            result["concurrent"] = asyncio.run(_phase(base, args.clients, args.seconds, args.max_tokens))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if "single" in result and result["single"]["tokens_per_s"]:
        result["tokens_per_s_ratio"] = round(result["concurrent"]["tokens_per_s"] / result["single"]["tokens_per_s"], 2)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['model']}  backend={result['backend']}  max_batch={args.max_batch}  max_tokens={args.max_tokens}")
    for name in ("single", "concurrent"):
        if name in result:
            r = result[name]
            print(f"{r['clients']:3d} client(s): {r['requests_per_s']:.2f} req/s  {r['tokens_per_s']:.1f} tok/s  "
                  f"TTFT p50/p99 {r['ttft_p50_ms']}/{r['ttft_p99_ms']} ms  inter-token p50/p99 "
                  f"{r['inter_token_p50_ms']}/{r['inter_token_p99_ms']} ms  errors {r['errors']}")
    if "tokens_per_s_ratio" in result:
        print(f"tokens/s with {args.clients} clients / 1 client: {result['tokens_per_s_ratio']}x")
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "serve", cmd_bench_serve)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", default="tiny-moe", help="model shape with random weights (default: tiny-moe)")
    source.add_argument("--checkpoint", help="run directory or checkpoint to serve instead")
    p.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default 16)")
    p.add_argument("--seconds", type=float, default=60, help="length of each phase (default 60)")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (default 128)")
    p.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (default 32)")
    p.add_argument("--threads", type=int, default=None, help="the server's --threads")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="the server's --dtype (default fp32, the server's default; bf16: faster batches, "
                        "see docs/serve.md)")
    p.add_argument("--no-baseline", action="store_true", help="skip the single-client phase")
    p.add_argument("--json", action="store_true", help="print one JSON object")
