"""Expert usage analysis of a trained MoE: which experts get how many tokens, which tokens, how
confidently, and with whom; plus a few stories with every token coloured by its expert.

`analyze_experts` runs the model over a split (the same pass as `nanomoe eval`, padding left out)
and returns a JSON-ready dict; `write_report` turns it into experts.json, PNG heatmaps and a
self-contained report.html. Shape legend: N tokens, E experts, K experts per token, V vocabulary.
"""

from __future__ import annotations

import codecs
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..atomic_io import write_bytes_atomic
from ..errors import ConfigError
from ..evaluation import RoutingAccumulator, evaluate_checkpoint
from ..runtime import autocast_context

# ---------------------------------------------------------------------------------------------
# Token ids -> readable text pieces


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2): printable Latin-1 bytes stand for themselves, the other
    bytes are shifted to code points 256 + n so that every byte is a visible character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in chars.items()}


class TokenText:
    """Text of single tokens for display: exact per-token pieces of a sequence (multi-byte characters
    split across tokens go to the token that completes them) and readable names of lone tokens."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.special = {i: t for t, i in tokenizer.special_tokens.items()}
        self.byte_level = False
        if tokenizer.kind == "bpe":
            decoder = json.loads(tokenizer.hf.to_str()).get("decoder") or {}
            self.byte_level = decoder.get("type") == "ByteLevel"
            self.alphabet = _byte_level_alphabet()

    def token_bytes(self, token_id: int) -> bytes | None:
        """UTF-8 bytes of a byte-level BPE token (None for special tokens and other tokenizers)."""
        if not self.byte_level or token_id in self.special:
            return None
        piece = self.tokenizer.hf.id_to_token(token_id)
        if piece is None or any(c not in self.alphabet for c in piece):
            return None
        return bytes(self.alphabet[c] for c in piece)

    def pieces(self, ids: list[int]) -> list[str]:
        """One string per token; "".join(pieces) == the decoded text."""
        if self.tokenizer.kind == "word":
            return [self.tokenizer.vocab[i] for i in ids]
        if not self.byte_level:
            return [self.tokenizer.decode([i]) for i in ids]
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out = []
        for i in ids:
            raw = self.token_bytes(i)
            out.append(decoder.decode(raw) if raw is not None else self.tokenizer.decode([i]))
        out[-1:] = [out[-1] + decoder.decode(b"", final=True)] if out else []
        return out

    def name(self, token_id: int) -> str:
        """A lone token as text; bytes that are not a whole character are shown as \\xNN."""
        raw = self.token_bytes(token_id)
        if raw is not None:
            return raw.decode("utf-8", errors="backslashreplace")
        return self.pieces([token_id])[0]


# ---------------------------------------------------------------------------------------------
# Analysis


def _layer_report(acc: RoutingAccumulator, i: int, block: int, text: TokenText, *, top_tokens: int,
                  min_count: int, top_k: int) -> dict[str, Any]:
    counts_E = acc.counts[i]
    E = counts_E.numel()
    n = max(1, acc.n_tokens[i])
    total = counts_E.sum().item()
    fractions = (counts_E / total).tolist() if total > 0 else [0.0] * E
    mean = counts_E.mean().item()
    hist = acc.confidence_hist[i]
    report: dict[str, Any] = {
        "layer": block,
        "tokens": acc.n_tokens[i],
        "tokens_per_expert": [int(c) for c in counts_E.tolist()],
        "load_fractions": fractions,
        "load_cv": counts_E.std(unbiased=False).item() / mean if mean > 0 else 0.0,
        "max_load_fraction": max(fractions),
        "routing_entropy": acc.entropy_sum[i] / n,
        "routing_entropy_normalized": acc.entropy_sum[i] / n / math.log(E) if E > 1 else 0.0,
        "router_confidence": acc.confidence_sum[i] / n,
        "confidence_histogram": {
            "bin_edges": [b / len(hist) for b in range(len(hist) + 1)],
            "fractions": (hist / max(1.0, hist.sum().item())).tolist(),
        },
        "dropped_fraction": acc.dropped_sum[i] / n,
        "dead_experts": [e for e in range(E) if counts_E[e].item() == 0],
        "overloaded_experts": [e for e in range(E) if fractions[e] > 2.0 / E],
        "underloaded_experts": [e for e in range(E) if 0 < fractions[e] < 0.5 / E],
        "coselection": None,
        "top_pairs": [],
    }
    if top_k >= 2:
        co_EE = acc.coselect[i] / n  # fraction of tokens whose top-k holds both i and j
        report["coselection"] = co_EE.tolist()
        pairs = [(co_EE[a, b].item(), a, b) for a in range(E) for b in range(a + 1, E)]
        pairs.sort(reverse=True)
        report["top_pairs"] = [{"experts": [a, b], "fraction": f} for f, a, b in pairs[:5]]

    token_expert_EV = acc.token_expert[i]
    totals_V = acc.token_totals
    share_EV = token_expert_EV / totals_V.clamp_min(1)  # P(expert e among the token's K | token v)
    frequent_V = totals_V >= min_count
    experts = []
    for e in range(E):
        by_count = torch.argsort(token_expert_EV[e], descending=True)[:top_tokens]
        # by share among frequent tokens, ties broken by count
        share = torch.where(frequent_V, share_EV[e].mul(1e6).round(), torch.zeros_like(share_EV[e]))
        by_share = torch.argsort(share * (token_expert_EV[e].max() + 1) + token_expert_EV[e], descending=True)
        by_share = by_share[:top_tokens]

        def rows(ids, e=e):
            return [{"id": int(v), "token": text.name(int(v)), "count": int(token_expert_EV[e, v]),
                     "share": share_EV[e, v].item()} for v in ids.tolist() if token_expert_EV[e, v] > 0]

        experts.append({"expert": e, "load_fraction": fractions[e], "top_tokens": rows(by_count),
                        "distinctive_tokens": rows(by_share)})
    report["experts"] = experts
    return report


@torch.no_grad()
def route_samples(model, tokenizer, docs: list[list[int]], *, autocast=None) -> list[dict[str, Any]]:
    """Every token of each document with its experts and their router probabilities, per MoE layer.

    Each document is run alone after an <|endoftext|> (as in training), cut to the model's block_size.
    """
    import contextlib

    text = TokenText(tokenizer)
    device = next(model.parameters()).device
    block_size = model.config.block_size
    samples = []
    for doc in docs:
        ids = [int(t) for t in doc[: block_size - 1]]
        if not ids:
            continue
        x = torch.tensor([[tokenizer.eot_id, *ids]], device=device)
        with autocast if autocast is not None else contextlib.nullcontext():
            out = model(x)
        layers = []
        for stats in out.moe:
            experts_NK = stats.expert_indices[1:]  # position 0 is the <|endoftext|> context
            probs_NK = stats.router_probs[1:].float().gather(-1, experts_NK)
            layers.append({"experts": experts_NK.tolist(),
                           "probs": [[round(p, 4) for p in row] for row in probs_NK.tolist()]})
        samples.append({"ids": ids, "tokens": text.pieces(ids), "layers": layers})
    return samples


def analyze_experts(
    checkpoint,
    data_dir,
    *,
    split: str = "val",
    mode: str = "packed",
    batch_size: int = 16,
    block_size: int | None = None,
    max_batches: int | None = 50,
    precision: str = "fp32",
    n_samples: int = 4,
    top_tokens: int = 12,
    min_count: int = 5,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Expert usage of a loaded MoE checkpoint on a split of `data_dir` (JSON-ready dict).

    Counts are over the positions `nanomoe eval` scores (padding left out); a token sent to K experts
    counts once for each, so every layer's load fractions sum to 1.
    """
    from ..data.loader import BatchLoader

    cfg = checkpoint.model_config
    if not cfg.is_moe:
        raise ConfigError(f"{checkpoint.path} is a dense model (n_experts=0): it has no experts to analyse; "
                          "use `nanomoe eval` for its loss")
    if checkpoint.tokenizer is None:
        raise ConfigError(f"{checkpoint.path} holds no tokenizer.json, which the report needs to show tokens")
    for name, value in (("n_samples", n_samples), ("top_tokens", top_tokens), ("min_count", min_count)):
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    routing = RoutingAccumulator(vocab_size=cfg.vocab_size)
    evaluation = evaluate_checkpoint(checkpoint, data_dir, split=split, mode=mode, batch_size=batch_size,
                                     block_size=block_size, max_batches=max_batches, precision=precision,
                                     routing=routing, progress=progress)
    evaluation.pop("moe", None)  # the layers below say more
    text = TokenText(checkpoint.tokenizer)
    layers = [_layer_report(routing, i, block, text, top_tokens=top_tokens, min_count=min_count, top_k=cfg.top_k)
              for i, block in enumerate(cfg.moe_layers)]

    loader = BatchLoader(data_dir, split, 1, 1, mode="documents")
    docs = [loader.tokens[s:e - 1].tolist() for s, e in zip(loader.doc_starts[:n_samples], loader.doc_ends)]
    device = next(checkpoint.model.parameters()).device
    samples = route_samples(checkpoint.model, checkpoint.tokenizer, docs,
                            autocast=autocast_context(precision, device))
    return {
        "format": 1,
        "model": {
            "n_layer": cfg.n_layer, "n_experts": cfg.n_experts, "top_k": cfg.top_k, "router": cfg.router,
            "moe_layers": cfg.moe_layers, "n_shared_experts": cfg.n_shared_experts,
            "capacity_factor": cfg.capacity_factor,
        },
        "evaluation": evaluation,
        "summary": {
            "load_cv": sum(layer["load_cv"] for layer in layers) / len(layers),
            "routing_entropy_normalized": sum(layer["routing_entropy_normalized"] for layer in layers) / len(layers),
            "router_confidence": sum(layer["router_confidence"] for layer in layers) / len(layers),
            "dead_experts": sum(len(layer["dead_experts"]) for layer in layers),
            "overloaded_experts": sum(len(layer["overloaded_experts"]) for layer in layers),
        },
        "layers": layers,
        "samples": samples,
    }


# ---------------------------------------------------------------------------------------------
# Report files


def _figure_bytes(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def plot_heatmaps(analysis: dict[str, Any]) -> dict[str, bytes]:
    """PNG images: expert load per layer, co-selection per layer (top-k >= 2), router confidence."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    layers = analysis["layers"]
    E = analysis["model"]["n_experts"]
    images = {}

    load = np.array([layer["load_fractions"] for layer in layers])  # (L, E)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * E, 1.2 + 0.45 * len(layers)))
    im = ax.imshow(load * E, cmap="RdBu_r", vmin=0, vmax=2, aspect="auto")  # 1 = fair share
    for (r, c), value in np.ndenumerate(load):
        ax.text(c, r, f"{100 * value:.0f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(E))
    ax.set_yticks(range(len(layers)), [f"layer {layer['layer']}" for layer in layers])
    ax.set_xlabel("expert")
    ax.set_title("share of tokens (%); colour = load / fair share", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    images["expert_load.png"] = _figure_bytes(fig)
    plt.close(fig)

    if analysis["model"]["top_k"] >= 2:
        cols = min(4, len(layers))
        n_rows = math.ceil(len(layers) / cols)
        fig, axes = plt.subplots(n_rows, cols, figsize=(3.2 * cols, 3.0 * n_rows), squeeze=False)
        for k, layer in enumerate(layers):
            ax = axes[k // cols][k % cols]
            co = np.array(layer["coselection"])
            np.fill_diagonal(co, np.nan)  # the diagonal is each expert's own load
            im = ax.imshow(co, cmap="viridis", vmin=0)
            ax.set_title(f"layer {layer['layer']}", fontsize=9)
            ax.set_xticks(range(E))
            ax.set_yticks(range(E))
            fig.colorbar(im, ax=ax, fraction=0.046)
        for k in range(len(layers), n_rows * cols):
            axes[k // cols][k % cols].axis("off")
        fig.suptitle("co-selection: fraction of tokens routed to both experts", fontsize=10)
        fig.tight_layout()
        images["coselection.png"] = _figure_bytes(fig)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for layer in layers:
        hist = layer["confidence_histogram"]
        edges = hist["bin_edges"]
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        ax.plot(centers, hist["fractions"], marker=".", label=f"layer {layer['layer']}")
    ax.axvline(1 / E, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("router probability of the first-choice expert")
    ax.set_ylabel("fraction of tokens")
    ax.set_title("router confidence (dashed: uniform 1/E)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    images["router_confidence.png"] = _figure_bytes(fig)
    plt.close(fig)
    return images


def write_report(analysis: dict[str, Any], out_dir: str | os.PathLike, *, title: str = "nanomoe expert report"
                 ) -> dict[str, Path]:
    """Write experts.json, the PNG heatmaps and report.html (self-contained: images inline, no network)
    into `out_dir`. Each file is written whole or not at all; other files in `out_dir` are untouched."""
    import base64

    from .report_html import render_report

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out} cannot be created ({e.strerror or e}); choose another directory") from None
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a directory")
    images = plot_heatmaps(analysis)
    written = {}
    try:
        write_bytes_atomic(out / "experts.json", (json.dumps(analysis, indent=1) + "\n").encode())
        written["json"] = out / "experts.json"
        for name, png in images.items():
            write_bytes_atomic(out / name, png)
            written[name] = out / name
        inline = {name: "data:image/png;base64," + base64.b64encode(png).decode() for name, png in images.items()}
        write_bytes_atomic(out / "report.html", render_report(analysis, inline, title=title).encode("utf-8"))
        written["html"] = out / "report.html"
    except OSError as e:
        raise ConfigError(f"could not write the report to {out}: {e.strerror or e}") from None
    return written


__all__ = ["TokenText", "analyze_experts", "route_samples", "plot_heatmaps", "write_report"]
