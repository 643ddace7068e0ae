"""Honest evaluation: loss over real tokens only (padding never counts), perplexity, bits per byte,
next-token accuracy, and MoE routing health. Shared by the trainer and `nanomoe eval`."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .data import check_compatible, read_meta
from .data.loader import BatchLoader
from .errors import ConfigError, DataError
from .model import IGNORE_INDEX
from .moe import MoEStats
from .runtime import autocast_context


class RoutingAccumulator:
    """Sums routing statistics of every MoE layer over many batches.

    Per layer: tokens per expert, per-token routing entropy (of the full router distribution), the
    router's confidence (mean probability of its first choice), dropped assignments, and for
    top-k >= 2 the co-selection matrix (how often experts i and j serve the same token).

    `update(stats, token_ids, mask)`: positions where `mask` is False (padding) are left out of every
    statistic. With `vocab_size`, it also counts which token ids each expert receives (for
    `nanomoe experts`) and a histogram of the router's confidence.
    """

    def __init__(self, vocab_size: int | None = None, confidence_bins: int = 20) -> None:
        self.counts: list[torch.Tensor] = []  # (E,) float64 per layer
        self.entropy_sum: list[float] = []
        self.confidence_sum: list[float] = []
        self.dropped_sum: list[float] = []
        self.coselect: list[torch.Tensor] = []  # (E, E) per layer
        self.n_tokens: list[int] = []
        self.n_batches = 0
        # optional per-token detail (only with vocab_size)
        self.vocab_size = vocab_size
        self.confidence_bins = confidence_bins
        self.token_expert: list[torch.Tensor] = []  # (E, V) float64 per layer: assignments of token v to e
        self.token_totals: torch.Tensor | None = None  # (V,) float64: occurrences of each token id
        self.confidence_hist: list[torch.Tensor] = []  # (bins,) float64 per layer, over [0, 1]

    def _start(self, stats: list[MoEStats]) -> None:
        for s in stats:
            E = s.router_probs.shape[-1]
            self.counts.append(torch.zeros(E, dtype=torch.float64))
            self.coselect.append(torch.zeros(E, E, dtype=torch.float64))
            if self.vocab_size is not None:
                self.token_expert.append(torch.zeros(E, self.vocab_size, dtype=torch.float64))
                self.confidence_hist.append(torch.zeros(self.confidence_bins, dtype=torch.float64))
        self.entropy_sum = [0.0] * len(stats)
        self.confidence_sum = [0.0] * len(stats)
        self.dropped_sum = [0.0] * len(stats)
        self.n_tokens = [0] * len(stats)
        if self.vocab_size is not None:
            self.token_totals = torch.zeros(self.vocab_size, dtype=torch.float64)

    def update(self, stats: list[MoEStats], token_ids: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> None:
        """Add one batch. token_ids: the input ids (B, T) or (N,) the stats were computed on, needed
        for per-token counts; mask: (B, T) or (N,) bool, False where a position is padding."""
        if not stats:
            return
        if not self.counts:
            self._start(stats)
        with torch.no_grad():
            keep_N = mask.reshape(-1).to(stats[0].router_probs.device) if mask is not None else None
            ids_N = token_ids.reshape(-1).to(stats[0].router_probs.device) if token_ids is not None else None
            if ids_N is not None and keep_N is not None:
                ids_N = ids_N[keep_N]
            if self.token_totals is not None and ids_N is not None:
                self.token_totals += torch.bincount(ids_N, minlength=self.vocab_size).double().cpu()
            for i, s in enumerate(stats):
                probs_NE = s.router_probs.float()
                indices_NK = s.expert_indices
                if keep_N is not None:
                    probs_NE, indices_NK = probs_NE[keep_N], indices_NK[keep_N]
                n, E = probs_NE.shape
                if keep_N is None:
                    self.counts[i] += s.tokens_per_expert.detach().double().cpu()
                else:
                    self.counts[i] += torch.bincount(indices_NK.reshape(-1), minlength=E).double().cpu()
                entropy_N = -(probs_NE * probs_NE.clamp_min(1e-12).log()).sum(-1)
                self.entropy_sum[i] += entropy_N.sum().item()
                confidence_N = probs_NE.gather(-1, indices_NK[:, :1]).squeeze(-1)
                self.confidence_sum[i] += confidence_N.sum().item()
                self.dropped_sum[i] += s.dropped_fraction.item() * n
                if indices_NK.shape[1] >= 2:
                    onehot_NE = torch.zeros(n, E, dtype=torch.float64)
                    onehot_NE.scatter_(1, indices_NK.cpu(), 1.0)
                    self.coselect[i] += onehot_NE.t() @ onehot_NE
                if self.vocab_size is not None:
                    self.confidence_hist[i] += torch.histc(
                        confidence_N.cpu(), bins=self.confidence_bins, min=0.0, max=1.0).double()
                    if ids_N is not None:
                        K = indices_NK.shape[1]
                        flat = indices_NK.reshape(-1) * self.vocab_size + ids_N.repeat_interleave(K)
                        self.token_expert[i] += torch.bincount(
                            flat, minlength=E * self.vocab_size).double().cpu().view(E, self.vocab_size)
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
            if self.token_expert:
                self.token_expert[i] = all_reduce_sum(self.token_expert[i])
                self.confidence_hist[i] = all_reduce_sum(self.confidence_hist[i])
        if self.token_totals is not None:
            self.token_totals = all_reduce_sum(self.token_totals)

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
    routing: RoutingAccumulator | None = None,
) -> dict:
    """Mean cross-entropy over every target that is not IGNORE_INDEX, and what follows from it.

    loss: nats per token; perplexity = exp(loss); bits_per_byte = loss / ln(2) / bytes_per_token;
    accuracy: fraction of targets that are the argmax prediction. MoE routing statistics ("moe")
    cover the same positions (padding left out); pass `routing` to collect more detail in it.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, tokens, correct
    routing = routing if routing is not None else RoutingAccumulator()
    try:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast if autocast is not None else contextlib.nullcontext():
                out = model(x, y)
            n = out.n_loss_tokens.item()
            mask = y != IGNORE_INDEX
            correct = (out.logits.argmax(-1) == y)[mask].sum().item()
            totals += torch.tensor([out.loss.item() * n, n, correct], dtype=torch.float64)
            routing.update(out.moe, token_ids=x, mask=mask)
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



def open_eval_loader(checkpoint, data_dir, *, split: str = "val", mode: str = "packed", batch_size: int = 16,
                     block_size: int | None = None, device=None):
    """A BatchLoader over `split` of `data_dir` for a loaded checkpoint, after checking that the data
    was made with the checkpoint's tokenizer and fits its vocabulary (DataError saying what to do if not).

    block_size defaults to the sequence length the model was trained at (else its block_size).
    """
    cfg = checkpoint.model_config
    try:
        check_compatible(data_dir, tokenizer=checkpoint.tokenizer, vocab_size=cfg.vocab_size)
    except DataError as e:
        hint = ""
        if checkpoint.tokenizer is not None:
            hint = (f" To evaluate on this text, encode it with the checkpoint's tokenizer: nanomoe prepare "
                    f"--source SOURCE --out NEW_DATA_DIR --tokenizer {Path(checkpoint.path) / 'tokenizer.json'}")
        raise DataError(f"checkpoint {checkpoint.path} does not fit the data: {e}.{hint}") from None
    if block_size is None:
        trained = int((checkpoint.train_config or {}).get("seq_len") or 0)
        block_size = min(trained, cfg.block_size) if trained > 0 else cfg.block_size
    if block_size > cfg.block_size:
        raise ConfigError(f"--block-size {block_size} exceeds the model's block_size {cfg.block_size}; "
                          f"use --block-size {cfg.block_size} or less")
    return BatchLoader(data_dir, split, batch_size, block_size, mode=mode, device=device)


def evaluate_checkpoint(
    checkpoint,
    data_dir,
    *,
    split: str = "val",
    mode: str = "packed",
    batch_size: int = 16,
    block_size: int | None = None,
    max_batches: int | None = None,
    precision: str = "fp32",
    routing: RoutingAccumulator | None = None,
    progress: bool | None = None,
) -> dict:
    """`evaluate` a loaded checkpoint (`nanomoe.training.checkpoint.load_checkpoint`, on the device to
    use) on one split of a prepared data dir; what was measured is recorded next to the numbers.

    progress: a progress bar on stderr (None: only when stderr is a terminal).
    """
    from tqdm.auto import tqdm

    device = next(checkpoint.model.parameters()).device
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 needs a GPU; use --precision bf16 (fast on recent CPUs) or fp32")
    loader = open_eval_loader(checkpoint, data_dir, split=split, mode=mode, batch_size=batch_size,
                              block_size=block_size)
    n_batches = loader.num_eval_batches(batch_size, max_batches)
    batches = tqdm(loader.eval_batches(batch_size, max_batches), total=n_batches, desc=f"eval {split}",
                   unit="batch", disable=(not progress) if progress is not None else None, leave=False)
    start = time.perf_counter()
    result = evaluate(
        checkpoint.model,
        batches,
        device=device,
        autocast=autocast_context(precision, device),
        bytes_per_token=bytes_per_token(read_meta(data_dir), split),
        routing=routing,
    )
    seconds = time.perf_counter() - start
    return {
        **result,
        "seconds": seconds,
        "tokens_per_second": result["tokens"] / seconds if seconds > 0 else None,
        "checkpoint": str(checkpoint.path),
        "step": checkpoint.step,
        "data": str(data_dir),
        "split": split,
        "mode": mode,
        "block_size": loader.block_size,
        "batch_size": batch_size,
        "batches": n_batches,
        "precision": precision,
        "device": str(device),
    }


__all__ = ["evaluate", "evaluate_checkpoint", "open_eval_loader", "RoutingAccumulator", "bytes_per_token",
           "IGNORE_INDEX"]
