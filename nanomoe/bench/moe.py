"""`nanomoe bench moe`: forward+backward time of one MoE layer against the alternatives.

Candidates, all at the same shape, timed round-robin in one process (median of --repeats):

- nanomoe    MoEFeedForward: router + dispatch + grouped experts (nanomoe/moe, the default kernels)
- reference  moe_forward_reference: the plain per-expert loop the tests pin the fast path to
- torch_grouped_mm, torch_loop  the layer on the torch backend with each of its expert
             implementations (nanomoe/kernels/grouped_ffn.py): the grouped GEMM (F.grouped_mm, the
             GPU path) and the per-expert loop of torch.mm (its fallback)
- dense      the model's dense FeedForward with equal active FLOPs: hidden = top_k * expert_hidden,
             same activation (for swiglu one fused D -> 2 * top_k * H projection, then down)
- hf         Hugging Face's MixtralSparseMoeBlock with the same weights, experts_implementation
             "eager" (what a standalone block runs); "hf_grouped_mm" is the same block with
             torch's grouped_mm, the default that from_pretrained picks. Only for swiglu + topk,
             when transformers is installed.

Each in fp32 and under bf16 autocast (the way nanomoe trains), on the CPU and on CUDA if present.
A step is: zero the gradients, forward on the next of --batches input batches, backward of a fixed
random output gradient. Batches route differently, so expert loads (and matrix shapes) vary from
step to step as in training; the warmup goes once through all batches, so the timed steps see only
matrix shapes every candidate has already compiled kernels for (a long run's steady state).
"""

from __future__ import annotations

import json
import os
import platform

from ..cli import add_command

DTYPES = {"fp32": None, "bf16": "bfloat16"}


def cmd_bench_moe(args) -> int:
    """Time forward+backward of one MoE layer vs the reference loop, a dense FFN and Hugging Face.

    Prints a table, or with --json one object whose headline keys are ratio_vs_dense_bf16,
    ratio_vs_dense_fp32 (MoE time / dense time, lower is better), speedup_vs_reference_bf16 and
    speedup_vs_hf_bf16 (their time / MoE time, higher is better), ratio_grouped_mm_vs_loop_bf16 and
    _fp32 (the torch backend's grouped GEMM time / its per-expert loop's). A benchmark, not a test:
    run it with nothing else busy on the machine."""
    import torch

    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _bench_moe(args)
    finally:
        torch.set_num_threads(threads_before)


def _bench_moe(args) -> int:
    import torch

    from ..malloc import keep_freed_memory
    from ..runtime import resolve_device

    # Without this, whether a candidate page-faults its activations anew every step depends on the
    # order of its allocations relative to glibc's trimming heuristics (docs/moe.md), not on its code.
    malloc = "keep-freed" if args.malloc == "keep-freed" and keep_freed_memory() else "default"
    devices = [resolve_device(args.device).type]  # a GPU asked for but absent: one line saying so
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    report: dict = {
        "shape": {
            "tokens": args.tokens, "n_embd": args.n_embd, "expert_hidden": args.expert_hidden,
            "n_experts": args.n_experts, "top_k": args.top_k, "ffn": args.ffn, "router": args.router,
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "malloc": malloc,
        "clock": args.clock,
    }
    load_before = _loadavg()
    for device in devices:
        result = bench_device(args, device)
        if device == devices[0]:
            report.update(result)
        else:
            report[device] = result

    # other processes' load, 1-minute average before and after: a busy machine distorts everything
    report["loadavg"] = [load_before, _loadavg()]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report, devices)
    if args.profile:
        profile_bf16(args, devices[0])
    return 0


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def build_candidates(args, device: str):
    """Modules at the benchmark shape, sharing weights where they compute the same function."""
    import dataclasses

    import torch

    from ..config import ModelConfig
    from ..kernels import TORCH
    from ..kernels.grouped_ffn import grouped_mm_ffn, loop_grouped_ffn
    from ..model import FeedForward
    from ..moe import MoEFeedForward, moe_forward_reference

    torch.manual_seed(args.seed)
    cfg = ModelConfig(
        vocab_size=256, block_size=args.tokens, n_layer=1, n_head=1, n_embd=args.n_embd, ffn=args.ffn,
        n_experts=args.n_experts, top_k=args.top_k, expert_hidden=args.expert_hidden, router=args.router,
    )
    moe = MoEFeedForward(cfg).to(device)
    dense = FeedForward(args.n_embd, args.top_k * args.expert_hidden, args.ffn, bias=False).to(device)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)
    moe.train()

    candidates = {
        "nanomoe": (moe, lambda x: moe(x)[0]),
        "reference": (moe, lambda x: moe_forward_reference(moe, x)),
        "dense": (dense, dense),
    }
    for name, grouped_ffn in (("torch_grouped_mm", grouped_mm_ffn), ("torch_loop", loop_grouped_ffn)):
        layer = MoEFeedForward(cfg, kernels=dataclasses.replace(TORCH, grouped_ffn=grouped_ffn)).to(device).train()
        layer.load_state_dict(moe.state_dict())
        candidates[name] = (layer, lambda x, layer=layer: layer(x)[0])
    hf = make_hf_block(args, moe, device)
    if hf is not None:
        candidates["hf"] = (hf, hf)
        hf_grouped = make_hf_block(args, moe, device, implementation="grouped_mm")
        if hf_grouped is not None:
            candidates["hf_grouped_mm"] = (hf_grouped, hf_grouped)
    return candidates


def make_hf_block(args, moe, device: str, implementation: str = "eager"):
    """Hugging Face's Mixtral MoE block with the nanomoe layer's weights, or None if unavailable."""
    if args.ffn != "swiglu" or args.router != "topk" or args.no_hf:
        return None
    try:
        import torch
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    config = MixtralConfig(
        hidden_size=args.n_embd, intermediate_size=args.expert_hidden, num_local_experts=args.n_experts,
        num_experts_per_tok=args.top_k, hidden_act="silu", router_jitter_noise=0.0,
    )
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config).to(device)
    with torch.no_grad():  # HF stores (E, 2H, D) and (E, D, H): the transposes of nanomoe's layout
        block.gate.weight.copy_(moe.router.gate.weight)
        block.experts.gate_up_proj.copy_(moe.experts.w_in.transpose(1, 2))
        block.experts.down_proj.copy_(moe.experts.w_out.transpose(1, 2))
    block.train()
    return block


def make_inputs(args, device: str, n: int):
    """n different input batches (one per step, like training) and one output gradient."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    xs = [torch.randn(1, args.tokens, args.n_embd, generator=gen).to(device).requires_grad_() for _ in range(n)]
    grad_out = torch.randn(1, args.tokens, args.n_embd, generator=gen).to(device)
    return xs, grad_out


def make_step(module, forward, xs, grad_out, dtype_name: str, device: str):
    """One training step of `forward` on the next batch of the pool `xs`. Batches route differently,
    so the experts' row counts (hence matrix shapes) change from step to step as in training."""
    import itertools

    import torch

    autocast_dtype = getattr(torch, DTYPES[dtype_name]) if DTYPES[dtype_name] else None
    batches = itertools.cycle(xs)

    def step():
        x = next(batches)
        module.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast(device_type=device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = forward(x)
        out.backward(grad_out)

    return step


def bench_device(args, device: str) -> dict:
    import time

    import torch

    from .timing import time_interleaved

    candidates = build_candidates(args, device)
    xs, grad_out = make_inputs(args, device, n=args.batches)

    # same function, same weights: check the candidates agree before timing them
    with torch.no_grad():
        outs = {name: fwd(xs[0]).float() for name, (_, fwd) in candidates.items() if name != "dense"}
    max_diff = {name: (out - outs["reference"]).abs().max().item() for name, out in outs.items() if name != "reference"}

    steps = {}
    for dtype_name in args.dtypes.split(","):
        for name, (module, forward) in candidates.items():
            steps[f"{name}_{dtype_name}"] = make_step(module, forward, xs, grad_out, dtype_name, device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    # warm up through the whole pool: every candidate has compiled every shape it will meet (oneDNN
    # JIT-compiles a kernel per new matrix shape), the steady state of a long run
    warmup = args.warmup + args.batches
    seconds = time_interleaved(steps, repeats=args.repeats, warmup=warmup, device=device, clock=clock)

    result: dict = {"device": device, "ms": {k: round(v * 1e3, 3) for k, v in seconds.items()}}
    result["max_abs_diff_vs_reference_fp32"] = {k: float(f"{v:.3g}") for k, v in max_diff.items()}
    active_flops = 3 * 2 * args.tokens * args.top_k * args.expert_hidden * args.n_embd * (3 if args.ffn == "swiglu" else 2)
    for dtype_name in args.dtypes.split(","):
        moe_s = seconds[f"nanomoe_{dtype_name}"]
        result[f"ratio_vs_dense_{dtype_name}"] = round(moe_s / seconds[f"dense_{dtype_name}"], 3)
        result[f"speedup_vs_reference_{dtype_name}"] = round(seconds[f"reference_{dtype_name}"] / moe_s, 3)
        for hf_name in ("hf", "hf_grouped_mm"):
            if f"{hf_name}_{dtype_name}" in seconds:
                result[f"speedup_vs_{hf_name}_{dtype_name}"] = round(seconds[f"{hf_name}_{dtype_name}"] / moe_s, 3)
        result[f"tflops_{dtype_name}"] = round(active_flops / moe_s / 1e12, 3)
        result[f"ratio_grouped_mm_vs_loop_{dtype_name}"] = round(
            seconds[f"torch_grouped_mm_{dtype_name}"] / seconds[f"torch_loop_{dtype_name}"], 3)
    return result


def print_table(report: dict, devices: list[str]) -> None:
    shape = report["shape"]
    print(
        f"MoE layer forward+backward: {shape['tokens']} tokens, n_embd {shape['n_embd']}, "
        f"{shape['n_experts']} experts x hidden {shape['expert_hidden']}, top-{shape['top_k']}, {shape['ffn']}; "
        f"torch {report['torch']}, {report['threads']} threads, malloc {report['malloc']}, {report['clock']} clock, "
        f"median of {report['repeats']}; load average before/after {report['loadavg']}"
    )
    for device in devices:
        result = report if device == devices[0] else report[device]
        ms = result["ms"]
        names = list(dict.fromkeys(k.rsplit("_", 1)[0] for k in ms))
        dtypes = list(dict.fromkeys(k.rsplit("_", 1)[1] for k in ms))
        print(f"\n{device}:")
        print(f"  {'':15s}" + "".join(f"{d + ' ms':>12s}{'vs dense':>10s}" for d in dtypes))
        for name in names:
            row = f"  {name:15s}"
            for d in dtypes:
                if f"{name}_{d}" in ms:
                    row += f"{ms[f'{name}_{d}']:12.1f}{ms[f'{name}_{d}'] / ms[f'dense_{d}']:10.2f}"
                else:
                    row += f"{'-':>12s}{'':10s}"
            print(row)
        for key in sorted(k for k in result if k.startswith(("ratio_", "speedup_"))):
            print(f"  {key:32s} {result[key]}")


def profile_bf16(args, device: str) -> None:
    """torch.profiler tables (self time by op) of the nanomoe layer and the dense FFN in bf16."""
    from torch.profiler import ProfilerActivity, profile

    candidates = build_candidates(args, device)
    xs, grad_out = make_inputs(args, device, n=args.batches)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for name in ("nanomoe", "dense"):
        module, forward = candidates[name]
        step = make_step(module, forward, xs, grad_out, "bf16", device)
        for _ in range(args.warmup + args.batches):
            step()
        with profile(activities=activities) as prof:
            for _ in range(args.repeats):
                step()
        print(f"\n{name} bf16, {args.repeats} steps:")
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=36))


def register(subparsers) -> None:
    parser = add_command(subparsers, "moe", cmd_bench_moe)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch x time)")
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--expert-hidden", type=int, default=1024)
    parser.add_argument("--n-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--ffn", choices=["swiglu", "relu", "gelu"], default="swiglu")
    parser.add_argument("--router", choices=["topk", "switch", "noisy_topk"], default="topk")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds, on top of one pass over the batches")
    parser.add_argument("--batches", type=int, default=8, help="distinct input batches, cycled")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32 (no autocast), bf16 (autocast)")
    parser.add_argument("--device", default="auto", help="auto (CPU, and CUDA when present), cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--malloc", choices=["keep-freed", "default"], default="keep-freed",
        help="keep-freed: glibc reuses freed memory instead of returning it (nanomoe.malloc); default: as is",
    )
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="cpu: this process's CPU time, robust to a busy machine but only meaningful with --threads 1",
    )
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face block")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables (bf16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
