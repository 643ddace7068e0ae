"""The native extension (nanomoe/csrc): the decode step and the expert training kernels, on the CPU.

- Decode step (csrc/decode_step.cpp): one C++ call per token. `Decoder(compile=True)` uses it when
  the model qualifies (CPU, fp32 or bf16 weights, eval mode) and falls back to `torch.compile`
  (dense) or eager decoding (MoE) otherwise. NANOMOE_NATIVE_DECODE=0 turns it off.
- Expert kernels (csrc/experts.cpp): forward and backward of the MoE layer's experts in training,
  each expert on one thread (nanomoe/grouped_ffn.py uses them on the CPU; without them it runs the
  same math in Python). NANOMOE_NATIVE_EXPERTS=0 turns them off.
- Fused ops (csrc/fused_ops.cpp): cross entropy, RMSNorm, rotary embeddings and SwiGLU, forward and backward,
  for training and evaluation on the CPU (nanomoe/ops.py; PyTorch's ops otherwise, and under
  torch.compile, which fuses them itself). NANOMOE_NATIVE_OPS=0 turns them off.

NANOMOE_NATIVE=0 turns all of them off. The extension is compiled with the machine's C++ compiler on first
use (~30 s, once: torch keeps the build under ~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR)
for the CPU it runs on (-march=native: AVX512-BF16 dot products and AMX tiles where the CPU has them).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "module.cpp", CSRC / "decode_step.cpp", CSRC / "experts.cpp", CSRC / "fused_ops.cpp"]
HEADERS = [CSRC / "simd.h", CSRC / "tensor_types.h"]

# -fopenmp: at::parallel_for is a header template whose OpenMP pragmas only take effect when the
# extension itself is built with OpenMP; it then shares torch's libgomp (same soname, loaded first).
FLAGS = ["-O3", "-march=native", "-fopenmp"]

_module = None
_build_error: str | None = None


def _cpu_tag() -> str:
    """Short hash of the CPU's feature flags: a -march=native build is only valid on CPUs like it,
    and a home directory may be shared by machines that are not."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags} {torch.__version__}".encode()).hexdigest()[:10]


def _put_ninja_on_path() -> None:
    """torch builds extensions with the `ninja` command; the pip package (a dependency) installs it
    next to this interpreter, which is not on PATH when a virtual environment is not activated."""
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja

        candidates.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for directory in candidates:
        if (directory / "ninja").exists():
            os.environ["PATH"] = f"{directory}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def build_extension(flags: list[str]):
    """Build (or load the cached build of) the extension with these compiler flags."""
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    # one build per source version, flags and kind of CPU: two checkouts (or a CI run next to a dev
    # tree) sharing ~/.cache never load or rebuild each other's extension
    code = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    # the checkout's path too: torch's build file names it, so two checkouts sharing a build dir
    # would rebuild it in turn each time the other one loads
    source_hash = hashlib.sha1(code + " ".join(flags).encode() + str(CSRC.resolve()).encode()).hexdigest()[:8]
    name = f"nanomoe_native_{_cpu_tag()}_{source_hash}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    with _build_lock(build_dir):
        if not any(build_dir.glob("*.so")):
            print("nanomoe: building the native kernels (once per machine, ~30-60 s)...", file=sys.stderr)
        return cpp_extension.load(name=name, sources=[str(path) for path in SOURCES], extra_cflags=flags,
                                  extra_ldflags=["-fopenmp"], extra_include_paths=[str(CSRC)], verbose=False)


@contextlib.contextmanager
def _build_lock(build_dir: Path, stale_after_s: float = 600):
    """Builds and loads take flock(2) on nanomoe.lock, which the kernel releases however the holder
    ends. torch's own `lock` file, which torch waits on without a timeout, is then waited for here
    instead, and removed once it is older than any build takes: a build killed hard left it."""
    try:
        import fcntl
    except ImportError:  # Windows: torch's lock alone
        yield
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    torch_lock = build_dir / "lock"
    with open(build_dir / "nanomoe.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            while torch_lock.exists():
                try:
                    age = time.time() - torch_lock.stat().st_mtime
                except OSError:  # released just now
                    break
                if age > stale_after_s:
                    print(f"nanomoe: removing {torch_lock} ({age / 60:.0f} min old), left by a build that was "
                          "killed", file=sys.stderr)
                    torch_lock.unlink(missing_ok=True)
                    break
                time.sleep(0.5)
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def load_extension():
    """The compiled module, building it on first use; None (and a warning, once) if it cannot be built."""
    global _module, _build_error
    if _module is not None or _build_error is not None:
        return _module
    try:
        _module = build_extension(FLAGS)
    except Exception as e:  # no compiler, no headers, ...: everything still runs through torch
        _build_error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        warnings.warn(f"the native kernels could not be built ({_build_error}); decoding uses torch.compile "
                      "and MoE training the Python expert path", stacklevel=2)
    return _module


def _enabled(variable: str) -> bool:
    return os.environ.get("NANOMOE_NATIVE", "1") != "0" and os.environ.get(variable, "1") != "0"


def experts_module():
    """The extension for the expert training kernels, or None when they are turned off or cannot be
    built (the caller then runs its Python path)."""
    if not _enabled("NANOMOE_NATIVE_EXPERTS"):
        return None
    return load_extension()


def fused_ops_module():
    """The extension for the fused ops (nanomoe/ops.py), or None (the caller then runs PyTorch's)."""
    if not _enabled("NANOMOE_NATIVE_OPS"):
        return None
    return load_extension()


def unsupported_reason(model) -> str | None:
    """Why `model` cannot decode natively, or None if it can."""
    if not _enabled("NANOMOE_NATIVE_DECODE"):
        return "NANOMOE_NATIVE=0 or NANOMOE_NATIVE_DECODE=0"
    weight = model.tok_emb.weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device.type}, the native step runs on the CPU"
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return f"weights in {weight.dtype}; the native step reads float32 or bfloat16"
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1:
        return f"parameters of several dtypes ({sorted(map(str, dtypes))})"
    if model.training:
        return "the model is in training mode (dropout, router noise): call model.eval()"
    return None


def _named(**tensors) -> dict[str, torch.Tensor]:
    """The entries that exist (a model without biases has none to pass), detached and contiguous
    (the kernels read rows; a contiguous tensor is passed as it is, without a copy)."""
    return {k: t.detach().contiguous() for k, t in tensors.items() if t is not None}


def _layer_tensors(block, k_cache: torch.Tensor, v_cache: torch.Tensor) -> dict[str, torch.Tensor]:
    attn = block.attn
    entries = _named(attn_norm_w=block.attn_norm.weight, attn_norm_b=getattr(block.attn_norm, "bias", None),
                     qkv_w=attn.qkv.weight, qkv_b=attn.qkv.bias, proj_w=attn.proj.weight, proj_b=attn.proj.bias,
                     ffn_norm_w=block.ffn_norm.weight, ffn_norm_b=getattr(block.ffn_norm, "bias", None),
                     k_cache=k_cache, v_cache=v_cache)
    if not block.is_moe:
        ffn = block.ffn
        return entries | _named(fc_w=ffn.fc.weight, fc_b=ffn.fc.bias, out_w=ffn.proj.weight, out_b=ffn.proj.bias)
    moe, experts = block.ffn, block.ffn.experts
    shared = moe.shared_expert
    # experts store (E, in, out) for x @ w; the kernels read nn.Linear's (out, in) rows: transposed copies
    return entries | _named(
        gate_w=moe.router.gate.weight, selection_bias=moe.router.selection_bias,
        experts_in=experts.w_in.detach().transpose(1, 2).contiguous(), experts_in_b=experts.b_in,
        experts_out=experts.w_out.detach().transpose(1, 2).contiguous(), experts_out_b=experts.b_out,
        shared_fc_w=shared.fc.weight if shared is not None else None,
        shared_fc_b=shared.fc.bias if shared is not None else None,
        shared_out_w=shared.proj.weight if shared is not None else None,
        shared_out_b=shared.proj.bias if shared is not None else None,
    )


class NativeDecodeStep:
    """Callable (tokens_B, slot, pad_B) -> (logits (B, V) fp32, [per MoE layer (B, K) expert ids]),
    over the decoder's StaticKVCache.

    Reads the model's dense weight matrices in place at batch 1; keeps packed copies of them for
    batches, transposed copies of expert weights (and packed ones for batches), and copies of the
    norms, biases, router and rope tables: build a new one after changing the model.
    """

    def __init__(self, module, model, cache):
        cfg = model.config
        rope = cfg.position == "rope"
        globals_ = _named(tok_emb=model.tok_emb.weight, lm_head=model.lm_head.weight,
                          pos_emb=model.pos_emb.weight if model.pos_emb is not None else None,
                          final_norm_w=model.final_norm.weight, final_norm_b=getattr(model.final_norm, "bias", None),
                          rope_cos=model.rope_cos if rope else None, rope_sin=model.rope_sin if rope else None)
        layers = [_layer_tensors(block, cache.k[i], cache.v[i]) for i, block in enumerate(model.blocks)]
        B, max_len = cache.k[0].shape[0], cache.max_len
        dims = [cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.ffn_hidden, cfg.vocab_size, cfg.block_size,
                B, max_len, cfg.n_experts, cfg.top_k if cfg.is_moe else 0, cfg.expert_hidden if cfg.is_moe else 0]
        self._moe = cfg.is_moe
        self._step = module.DecodeStep(globals_, layers, dims, [cfg.norm, cfg.position, cfg.ffn, cfg.router],
                                       float(cfg.norm_eps))

    def __call__(self, tokens_B: torch.Tensor, slot: int, pad_B: torch.Tensor):
        logits, experts = self._step.step(tokens_B, slot, pad_B)
        return logits, list(experts.unbind(0)) if self._moe else []


def native_decode_available(model) -> bool:
    """Whether Decoder(compile=True) decodes `model` natively (builds the extension if needed)."""
    return unsupported_reason(model) is None and load_extension() is not None


def native_decode_step(model, cache) -> NativeDecodeStep | None:
    """A native step for `model` over `cache`, or None when the model does not qualify or the
    extension cannot be built."""
    if not native_decode_available(model):
        return None
    try:
        return NativeDecodeStep(_module, model, cache)
    except RuntimeError as e:  # e.g. weights whose shapes disagree with the config: decode another way
        warnings.warn(f"the native decode step does not take this model ({e}); decoding without it", stacklevel=2)
        return None
