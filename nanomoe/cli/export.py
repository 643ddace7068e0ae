"""`nanomoe export`: a checkpoint as a Hugging Face transformers model folder."""

from __future__ import annotations

from pathlib import Path

from . import add_command


def cmd_export(args) -> int:
    """Export a checkpoint as a Hugging Face transformers folder (Llama or Mixtral).

    rope + rmsnorm + swiglu models become LlamaForCausalLM (dense) or MixtralForCausalLM (MoE), with
    the tokenizer as a PreTrainedTokenizerFast, generation defaults and a model card; safetensors weights.

    Architectures with no transformers equivalent (learned positions, LayerNorm, ReLU/GELU, biases,
    Switch routing, shared experts, capacity limits) are refused with what would have to change.

    Examples:
      nanomoe export --checkpoint runs/tiny-moe --out exports/tiny-moe
      nanomoe export --checkpoint runs/tiny-llama --out exports/tiny-llama --dtype bfloat16
      python -c "from transformers import pipeline; print(pipeline('text-generation', 'exports/tiny-moe')('Once'))"
    """
    from ..hf import export_hf
    from ..training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint, prefer=args.prefer)
    state = ckpt.trainer_state
    last_eval = state.get("last_eval") or {}
    info = {
        "name": Path(args.out).name,
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "tokens_seen": state.get("tokens_seen"),
        "val_loss": state.get("best_val_loss", last_eval.get("loss")),
        "data_source": (ckpt.data_meta or {}).get("source"),
    }
    out = export_hf(ckpt.model, ckpt.tokenizer, args.out, dtype=args.dtype, overwrite=args.force, info=info)
    arch = "MixtralForCausalLM" if ckpt.model_config.is_moe else "LlamaForCausalLM"
    print(f"exported {ckpt.path} (step {ckpt.step}) as {arch}, {args.dtype}, to {out}")
    for f in sorted(out.iterdir()):
        print(f"  {f.name:28s} {f.stat().st_size:>12,} bytes")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}), AutoTokenizer.from_pretrained(...)")
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "export", cmd_export)
    p.add_argument("--checkpoint", required=True, metavar="RUN",
                   help="a run dir (its best.json, else latest.json) or a checkpoints/step-* dir")
    p.add_argument("--prefer", choices=["best", "latest"], default="best",
                   help="which checkpoint of a run dir to export (default best)")
    p.add_argument("--format", choices=["hf"], default="hf", help="hf: a Hugging Face transformers folder")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (created; must be empty or an "
                   "earlier export replaced with --force)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weight precision of the export (default float32, exact)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out")
