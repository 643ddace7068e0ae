"""The native decode step: one C++ call per token for dense models on the CPU (csrc/decode_step.cpp).

`Decoder(compile=True)` uses it when the model qualifies (dense, CPU, fp32 or bf16 weights) and
falls back to `torch.compile` otherwise. The extension is compiled with the machine's C++ compiler
on first use (about a minute, once: torch keeps the build under ~/.cache/torch_extensions, or
$TORCH_EXTENSIONS_DIR) for the CPU it runs on (-march=native, so AVX512-BF16 dot products where the
CPU has them). NANOMOE_NATIVE_DECODE=0 turns it off (then torch.compile decodes).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "decode_step.cpp"

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
    import platform

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


def load_extension():
    """The compiled module, building it on first use; None (and a warning, once) if it cannot be built."""
    global _module, _build_error
    if _module is not None or _build_error is not None:
        return _module
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        name = f"nanomoe_decode_step_{_cpu_tag()}"
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not any(build_dir.glob("*.so")):
            print("nanomoe: building the native decode step (once per machine, about a minute)...", file=sys.stderr)
        _module = cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                                     verbose=False)
    except Exception as e:  # no compiler, no headers, ...: decoding still works through torch.compile
        _build_error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        warnings.warn(f"the native decode step could not be built ({_build_error}); decoding uses torch.compile",
                      stacklevel=2)
    return _module


def unsupported_reason(model) -> str | None:
    """Why `model` cannot decode natively, or None if it can."""
    if os.environ.get("NANOMOE_NATIVE_DECODE", "1") == "0":
        return "NANOMOE_NATIVE_DECODE=0"
    cfg = model.config
    weight = model.tok_emb.weight
    if cfg.is_moe:
        return "MoE layers are not implemented in the native step"
    if weight.device.type != "cpu":
        return f"the model is on {weight.device.type}, the native step runs on the CPU"
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return f"weights in {weight.dtype}; the native step reads float32 or bfloat16"
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1:
        return f"parameters of several dtypes ({sorted(map(str, dtypes))})"
    return None


def _empty() -> torch.Tensor:
    return torch.empty(0)


def _or_empty(t: torch.Tensor | None) -> torch.Tensor:
    return t.detach() if t is not None else _empty()


class NativeDecodeStep:
    """Callable (tokens_B, slot, pad_B) -> logits (B, V) fp32 over the decoder's StaticKVCache.

    Reads the model's weight matrices in place (a later change to them is seen) but copies the
    norms, biases and rope tables when built: build a new one after training the model further.
    """

    def __init__(self, module, model, cache):
        cfg = model.config
        blocks = model.blocks
        matrices = [model.tok_emb.weight, _or_empty(model.pos_emb.weight if model.pos_emb is not None else None),
                    model.lm_head.weight]
        vectors = [model.final_norm.weight, _or_empty(getattr(model.final_norm, "bias", None)),
                   _or_empty(model.rope_cos if cfg.position == "rope" else None),
                   _or_empty(model.rope_sin if cfg.position == "rope" else None)]
        caches = []
        for layer, block in enumerate(blocks):
            attn, ffn = block.attn, block.ffn
            matrices += [attn.qkv.weight, attn.proj.weight, ffn.fc.weight, ffn.proj.weight]
            vectors += [block.attn_norm.weight, _or_empty(getattr(block.attn_norm, "bias", None)),
                        _or_empty(attn.qkv.bias), _or_empty(attn.proj.bias),
                        block.ffn_norm.weight, _or_empty(getattr(block.ffn_norm, "bias", None)),
                        _or_empty(ffn.fc.bias), _or_empty(ffn.proj.bias)]
            caches += [cache.k[layer], cache.v[layer]]
        matrices = [m.detach() for m in matrices]
        vectors = [v.detach() for v in vectors]
        B, max_len = cache.k[0].shape[0], cache.max_len
        dims = [cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.ffn_hidden, cfg.vocab_size,
                cfg.block_size, B, max_len]
        self._step = module.DecodeStep(matrices, vectors, caches, dims, [cfg.norm, cfg.position, cfg.ffn],
                                       float(cfg.norm_eps))

    def __call__(self, tokens_B: torch.Tensor, slot: int, pad_B: torch.Tensor) -> torch.Tensor:
        return self._step.step(tokens_B, slot, pad_B)


def native_decode_step(model, cache) -> NativeDecodeStep | None:
    """A native step for `model` over `cache`, or None when the model does not qualify or the
    extension cannot be built."""
    if unsupported_reason(model) is not None:
        return None
    module = load_extension()
    return NativeDecodeStep(module, model, cache) if module is not None else None
