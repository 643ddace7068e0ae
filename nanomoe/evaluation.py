"""Honest evaluation: loss over real tokens only (padding never counts), perplexity, bits per byte,
next-token accuracy, and MoE routing health. Shared by the trainer and `nanomoe eval`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch

from .model import IGNORE_INDEX
from .moe import MoEStats


class RoutingAccumulator:
    """Sums routing statistics of every MoE layer over many batches.

    Per layer: tokens per expert, per-token routing entropy (of the full router distribution), the
    router's confidence (mean probability of its first choice), dropped assignments, and for
    top-k >= 2 the co-selection matrix (how often experts i and j serve the same token).
    """

    def __init__(self) -> None:
        self.counts: list[torch.Tensor] = []  # (E,) float64 per layer
        self.entropy_sum: list[float] = []
        self.confidence_sum: list[float] = []
        self.dropped_sum: list[float] = []
        self.coselect: list[torch.Tensor] = []  # (E, E) per layer
        self.n_tokens: list[int] = []
        self.n_batches = 0

    def update(self, stats: list[MoEStats]) -> None:
        if not stats:
            return
        if not self.counts:
            for s in stats:
                E = s.router_probs.shape[-1]
                self.counts.append(torch.zeros(E, dtype=torch.float64))
                self.coselect.append(torch.zeros(E, E, dtype=torch.float64))
            self.entropy_sum = [0.0] * len(stats)
            self.confidence_sum = [0.0] * len(stats)
            self.dropped_sum = [0.0] * len(stats)
            self.n_tokens = [0] * len(stats)
        with torch.no_grad():
            for i, s in enumerate(stats):
                probs = s.router_probs.float()
                n = probs.shape[0]
                E = probs.shape[-1]
                self.counts[i] += s.tokens_per_expert.detach().double().cpu()
                entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
                self.entropy_sum[i] += entropy.sum().item()
                self.confidence_sum[i] += probs.gather(-1, s.expert_indices[:, :1]).sum().item()
                self.dropped_sum[i] += s.dropped_fraction.item() * n
                if s.expert_indices.shape[1] >= 2:
                    onehot = torch.zeros(n, E, dtype=torch.float64)
                    onehot.scatter_(1, s.expert_indices.cpu(), 1.0)
                    self.coselect[i] += onehot.t() @ onehot
                self.n_tokens[i] += n
        self.n_batches += 1

    def reduce(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the statistics across data-parallel ranks."""
        for i in range(len(self.counts)):
            self.counts[i] = all_reduce_sum(self.counts[i])
            self.coselect[i] = all_reduce_sum(self.coselect[i])
            scalars = all_reduce_sum(
                torch.tensor([self.entropy_sum[i], self.confidence_sum[i], self.dropped_sum[i], self.n_tokens[i]],
                             dtype=torch.float64)
            ).tolist()
            self.entropy_sum[i], self.confidence_sum[i], self.dropped_sum[i] = scalars[:3]
            self.n_tokens[i] = int(scalars[3])

    def summary(self) -> dict:
        """Per-layer health: load fractions, coefficient of variation of the load, mean routing entropy
        (nats; log(E) is uniform), confidence, dropped fraction, dead experts (no tokens at all)
        and overloaded experts (more than twice their fair share)."""
        layers = []
        for i, counts in enumerate(self.counts):
            total = counts.sum().item()
            E = counts.numel()
            fractions = (counts / total).tolist() if total > 0 else [0.0] * E
            mean = counts.mean().item()
            cv = (counts.std(unbiased=False).item() / mean) if mean > 0 else 0.0
            n = max(1, self.n_tokens[i])
            layers.append({
                "load_fractions": fractions,
                "load_cv": cv,
                "max_load_fraction": max(fractions),
                "routing_entropy": self.entropy_sum[i] / n,
                "router_confidence": self.confidence_sum[i] / n,
                "dropped_fraction": self.dropped_sum[i] / n,
                "dead_experts": [e for e in range(E) if counts[e].item() == 0],
                "overloaded_experts": [e for e in range(E) if fractions[e] > 2.0 / E],
                "tokens": self.n_tokens[i],
            })
        if not layers:
            return {}
        return {
            "layers": layers,
            "load_cv": sum(layer["load_cv"] for layer in layers) / len(layers),
            "routing_entropy": sum(layer["routing_entropy"] for layer in layers) / len(layers),
            "dropped_fraction": sum(layer["dropped_fraction"] for layer in layers) / len(layers),
            "dead_experts": sum(len(layer["dead_experts"]) for layer in layers),
        }


def bytes_per_token(data_meta: dict | None, split: str = "val") -> float | None:
    """UTF-8 bytes of text per token of `split`, from a data dir's meta.json (None if unknown)."""
    if not data_meta:
        return None
    split_meta = data_meta.get("splits", {}).get(split, {})
    if split_meta.get("tokens") and split_meta.get("bytes"):
        return split_meta["bytes"] / split_meta["tokens"]
    value = data_meta.get("bytes_per_token")
    if isinstance(value, dict):
        value = value.get(split)
    return float(value) if value else None


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
    bytes_per_token: float | None = None,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Mean cross-entropy over every target that is not IGNORE_INDEX, and what follows from it.

    loss: nats per token; perplexity = exp(loss); bits_per_byte = loss / ln(2) / bytes_per_token;
    accuracy: fraction of targets that are the argmax prediction.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, tokens, correct
    routing = RoutingAccumulator()
    try:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast if autocast is not None else contextlib.nullcontext():
                out = model(x, y)
            n = out.n_loss_tokens.item()
            mask = y != IGNORE_INDEX
            correct = (out.logits.argmax(-1) == y)[mask].sum().item()
            totals += torch.tensor([out.loss.item() * n, n, correct], dtype=torch.float64)
            routing.update(out.moe)
    finally:
        model.train(was_training)
    if all_reduce_sum is not None:
        totals = all_reduce_sum(totals)
        routing.reduce(all_reduce_sum)
    loss_sum, tokens, correct = totals.tolist()
    loss = loss_sum / tokens if tokens else float("nan")
    result = {
        "loss": loss,
        "perplexity": math.exp(loss) if tokens and loss < 700 else float("inf"),
        "bits_per_byte": loss / math.log(2) / bytes_per_token if bytes_per_token and tokens else None,
        "accuracy": correct / tokens if tokens else float("nan"),
        "tokens": int(tokens),
    }
    moe = routing.summary()
    if moe:
        result["moe"] = moe
    return result


__all__ = ["evaluate", "RoutingAccumulator", "bytes_per_token", "IGNORE_INDEX"]
