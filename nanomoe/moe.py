"""Mixture-of-Experts feed-forward layer: router, balancing losses, dropless expert dispatch.

Shape legend (suffixes on tensor names):
    N  tokens (batch and time flattened)      D  model width (n_embd)
    E  routed experts                          K  experts chosen per token (top_k)
    H  expert hidden width                     A  token->expert assignments kept (<= N*K)

Flow: the router scores every token against every expert (in fp32), picks K experts per token and
their gate weights; the dispatcher sorts the N*K assignments by expert so each expert's tokens are
one contiguous block, runs every expert on its block with one matrix product per weight matrix, and
gathers each token's K weighted results back. No Python loop ever runs over tokens. The expert
computation is one autograd Function with a hand-written backward (grouped_ffn.py; docs/moe.md).
On the CPU the router's softmax/top-k, the plan and the experts run through native kernels
(csrc/experts.cpp) when they are built; the Python code here and in grouped_ffn.py is the same math
and runs everywhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .grouped_ffn import ExpertPlan, compute_dtype, grouped_ffn, make_plan, row_multiple_for
from .ops import swiglu


def ffn_activation(h: torch.Tensor, kind: str) -> torch.Tensor:
    """Hidden activation of a feed-forward net. For swiglu, `h` holds [gate | up] halves."""
    if kind == "relu":
        return F.relu(h)
    if kind == "gelu":
        return F.gelu(h, approximate="tanh")
    return swiglu(h)


@dataclass
class RouterOutput:
    expert_indices_NK: torch.Tensor  # int64, chosen experts, best first
    expert_weights_NK: torch.Tensor  # fp32 gate weight of each chosen expert
    router_probs_NE: torch.Tensor  # fp32 softmax over all experts (used by the balancing loss)
    router_logits_NE: torch.Tensor  # fp32 clean logits, before noise (used by the z-loss)
    logsumexp_N: torch.Tensor | None = None  # logsumexp of the clean logits when the router has it


@dataclass
class MoEStats:
    """Auxiliary outputs of one MoE layer, returned explicitly so losses and analysis live outside."""

    load_balance_loss: torch.Tensor  # scalar, Switch Transformer eq. 4 (1.0 when perfectly uniform)
    z_loss: torch.Tensor  # scalar, ST-MoE eq. 5
    tokens_per_expert: torch.Tensor  # (E,) assignments each expert was chosen for (before dropping)
    router_probs: torch.Tensor  # (N, E) fp32
    expert_indices: torch.Tensor  # (N, K) int64
    dropped_fraction: torch.Tensor  # scalar: assignments dropped by the capacity limit / (N*K)


# ---------------------------------------------------------------------------------------------
# Balancing losses (standalone so they can be tested against their formulas)


def expert_counts(expert_indices_NK: torch.Tensor, n_experts: int, valid_N: torch.Tensor | None = None) -> torch.Tensor:
    """Assignments per expert (int64, (E,)), counting only tokens with valid_N True when given.

    A scatter-add rather than torch.bincount: the output shape does not depend on the data, so
    torch.compile traces it without breaking the graph."""
    ones_NK = torch.ones_like(expert_indices_NK)
    if valid_N is not None:
        ones_NK = ones_NK * valid_N.unsqueeze(-1)
    counts_E = torch.zeros(n_experts, dtype=torch.long, device=expert_indices_NK.device)
    return counts_E.scatter_add_(0, expert_indices_NK.reshape(-1), ones_NK.reshape(-1))


def _masked_mean(values_N: torch.Tensor, valid_N: torch.Tensor | None) -> torch.Tensor:
    """Mean over the first dim of the rows with valid_N True (0 when there are none)."""
    if valid_N is None:
        return values_N.mean(dim=0)
    weights = valid_N.to(values_N.dtype).reshape(-1, *([1] * (values_N.dim() - 1)))
    return (values_N * weights).sum(dim=0) / weights.sum().clamp(min=1)


def load_balance_loss(
    router_probs_NE: torch.Tensor, expert_indices_NK: torch.Tensor, valid_N: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer auxiliary loss (Fedus et al. 2021, eqs. 4-6), generalized to top-k.

    loss = E * sum_i f_i * P_i, with f_i the fraction of the N*K assignments sent to expert i and
    P_i the mean router probability of expert i. Equals 1.0 for perfectly uniform routing and grows
    with imbalance; gradients flow through P only (f is a count). valid_N: only these tokens count
    (padding does not); 0 when there are none.
    """
    N, n_experts = router_probs_NE.shape
    if N == 0:  # no tokens at all
        return router_probs_NE.sum() * 0.0
    counts_E = expert_counts(expert_indices_NK, n_experts, valid_N)
    f_E = counts_E.to(router_probs_NE.dtype) / counts_E.sum().clamp(min=1)
    p_E = _masked_mean(router_probs_NE, valid_N)
    return n_experts * torch.sum(f_E * p_E)


def router_z_loss(
    router_logits_NE: torch.Tensor, valid_N: torch.Tensor | None = None, logsumexp_N: torch.Tensor | None = None
) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2.

    Penalizes large router logits, which make the fp32 softmax (and bf16 training) unstable.
    valid_N: only these tokens count; 0 when there are none. logsumexp_N: the logits' logsumexp if
    the router computed it already (its softmax needs it).
    """
    if router_logits_NE.shape[0] == 0:
        return router_logits_NE.sum() * 0.0
    if logsumexp_N is None:
        logsumexp_N = torch.logsumexp(router_logits_NE, dim=-1)
    return _masked_mean(logsumexp_N.pow(2), valid_N)


# ---------------------------------------------------------------------------------------------
# Router


def _softmax_over_experts(scores_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over the last dim, as exp(x - logsumexp(x)), and the logsumexp: with only E entries
    per row torch's softmax kernel (vectorized along that dim) is ~5x slower, forward and backward."""
    lse_N1 = torch.logsumexp(scores_NE, dim=-1, keepdim=True)
    return torch.exp(scores_NE - lse_N1), lse_N1.squeeze(-1)


class _NativeRouter(torch.autograd.Function):
    """The "topk" / "switch" router after the gate product, as one C++ pass each way
    (csrc/experts.cpp): softmax, logsumexp, top-k of probs + bias, gates."""

    @staticmethod
    def forward(ctx, logits_NE, selection_bias, top_k: int, renormalize: bool, module):
        indices_NK, gates_NK, probs_NE, lse_N = module.router_forward(logits_NE, selection_bias, top_k, renormalize)
        ctx.mark_non_differentiable(indices_NK)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(probs_NE, indices_NK)
        ctx.renormalize, ctx.module = renormalize, module
        return indices_NK, gates_NK, probs_NE, lse_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _, d_gates_NK, d_probs_NE, d_lse_N):
        probs_NE, indices_NK = ctx.saved_tensors
        none = probs_NE.new_empty(0)
        d_logits_NE = ctx.module.router_backward(
            probs_NE, indices_NK, none if d_gates_NK is None else d_gates_NK,
            none if d_probs_NE is None else d_probs_NE, none if d_lse_N is None else d_lse_N, ctx.renormalize,
        )
        return d_logits_NE, None, None, None, None


def _native_router_module(x_ND: torch.Tensor):
    """The extension for the router on the CPU outside torch.compile (whose graph it would break;
    inductor fuses the Python router there), else None."""
    if x_ND.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    from . import native

    return native.experts_module()


class Router(nn.Module):
    """Scores tokens against experts and picks the top-k.

    - "noisy_topk" (Shazeer et al. 2017, eqs. 3-5): H = x W_g + N(0,1) * softplus(x W_noise), noise
      only in training; gates = softmax over the K kept logits.
    - "topk" (Mixtral): softmax over all experts, keep K, renormalize the kept probabilities.
    - "switch" (Fedus et al. 2021): softmax over all experts, keep K (1 by default), gates are the
      raw probabilities (not renormalized), so top-1 routing still trains the router.

    `selection_bias` implements DeepSeek-V3's auxiliary-loss-free balancing: it is added to the
    scores only to choose experts, never to the gate weights, and is nudged by
    `update_selection_bias` after each optimizer step (a buffer, not a parameter).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.router
        self.top_k = config.top_k
        self.n_experts = config.n_experts
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.noise = nn.Linear(config.n_embd, config.n_experts, bias=False) if self.kind == "noisy_topk" else None
        self.register_buffer("selection_bias", torch.zeros(config.n_experts), persistent=True)

    def forward(self, x_ND: torch.Tensor) -> RouterOutput:
        # Router math in fp32: routing decisions hinge on small logit differences that bf16 rounds away.
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            x_ND = x_ND.float()
            logits_NE = F.linear(x_ND, self.gate.weight.float())
            if self.kind != "noisy_topk" and (module := _native_router_module(x_ND)) is not None:
                indices_NK, weights_NK, probs_NE, lse_N = _NativeRouter.apply(
                    logits_NE, self.selection_bias, self.top_k, self.kind == "topk", module
                )
                return RouterOutput(indices_NK, weights_NK, probs_NE, logits_NE, lse_N)
            lse_N = None  # of the clean logits
            if self.kind == "noisy_topk":
                scores_NE = logits_NE
                if self.training:
                    noise_std_NE = F.softplus(F.linear(x_ND, self.noise.weight.float()))
                    scores_NE = logits_NE + torch.randn_like(logits_NE) * noise_std_NE
                probs_NE, scores_lse_N = _softmax_over_experts(scores_NE)
                if not self.training:
                    lse_N = scores_lse_N
            else:
                probs_NE, lse_N = _softmax_over_experts(logits_NE)
                scores_NE = probs_NE

            _, indices_NK = torch.topk(scores_NE + self.selection_bias, self.top_k, dim=-1)
            if self.kind == "noisy_topk":
                weights_NK = F.softmax(scores_NE.gather(-1, indices_NK), dim=-1)
            else:
                weights_NK = probs_NE.gather(-1, indices_NK)
                if self.kind == "topk":
                    weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        return RouterOutput(indices_NK, weights_NK, probs_NE, logits_NE, lse_N)

    @torch.no_grad()
    def update_selection_bias(self, tokens_per_expert_E: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3 (Liu et al. 2024, sec. 2.1.2): raise the bias of under-loaded experts and lower
        it for over-loaded ones by a fixed step `rate`."""
        load_E = tokens_per_expert_E.float()
        self.selection_bias.add_(rate * torch.sign(load_E.mean() - load_E))


# ---------------------------------------------------------------------------------------------
# Experts: weights stacked as (E, D, H) tensors so all experts share one parameter per matrix.


class GroupedExperts(nn.Module):
    """E independent feed-forward nets with stacked weights.

    w_in:  (E, D, H) for relu/gelu, (E, D, 2H) for swiglu ([gate | up])
    w_out: (E, H, D)
    """

    def __init__(self, n_experts: int, dim: int, hidden: int, activation: str, bias: bool):
        super().__init__()
        self.activation = activation
        in_width = 2 * hidden if activation == "swiglu" else hidden
        self.w_in = nn.Parameter(torch.empty(n_experts, dim, in_width))
        self.w_out = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.b_in = nn.Parameter(torch.empty(n_experts, in_width)) if bias else None
        self.b_out = nn.Parameter(torch.empty(n_experts, dim)) if bias else None

    def forward(self, x_ND: torch.Tensor, gate_KN: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
        """sum_k gate[k, n] * expert_{e(n,k)}(x[n]) for every token n, over the assignments in `plan`.

        The fast path (grouped_ffn.py): expert-sorted buffers, one matrix product per expert and
        weight matrix, a hand-written backward. `expert_forward` is the plain version tests pin it to.
        """
        return grouped_ffn(x_ND, gate_KN, plan, self.w_in, self.w_out, self.b_in, self.b_out, self.activation)

    def expert_forward(self, x_ND: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e applied to every row of x."""
        h = x_ND @ self.w_in[e]
        if self.b_in is not None:
            h = h + self.b_in[e]
        y = ffn_activation(h, self.activation) @ self.w_out[e]
        if self.b_out is not None:
            y = y + self.b_out[e]
        return y


# ---------------------------------------------------------------------------------------------
# The MoE layer


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int | None:
    """Most assignments one expert accepts (GShard / Switch): ceil(cf * N * K / E). None = dropless."""
    if capacity_factor <= 0:
        return None
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


class MoEFeedForward(nn.Module):
    """Routed experts (+ optional always-on shared experts) replacing a dense feed-forward."""

    def __init__(self, config: ModelConfig, shared_expert: nn.Module | None = None):
        super().__init__()
        self.n_experts = config.n_experts
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.router_bias_update_rate = config.router_bias_update_rate
        self.router = Router(config)
        self.experts = GroupedExperts(config.n_experts, config.n_embd, config.expert_hidden, config.ffn, config.bias)
        self.shared_expert = shared_expert  # DeepSeekMoE: a dense FFN every token goes through

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """valid_BT: False at padding positions, which get no expert, take no capacity and count in
        no balancing loss or load statistic (their output is never read). None: all tokens are real."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        valid_N = None if valid_BT is None else valid_BT.reshape(B * T)
        routing = self.router(x_ND)
        out_ND, dropped_fraction = self._dispatch(x_ND, routing, valid_N)
        if self.shared_expert is not None:
            out_ND = out_ND + self.shared_expert(x_ND)
        stats = MoEStats(
            load_balance_loss=load_balance_loss(routing.router_probs_NE, routing.expert_indices_NK, valid_N),
            z_loss=router_z_loss(routing.router_logits_NE, valid_N, routing.logsumexp_N),
            tokens_per_expert=expert_counts(routing.expert_indices_NK, self.n_experts, valid_N),
            router_probs=routing.router_probs_NE,
            expert_indices=routing.expert_indices_NK,
            dropped_fraction=dropped_fraction,
        )
        return out_ND.reshape(B, T, D), stats

    @torch.compiler.disable  # data-dependent shapes: torch.compile runs this part eagerly, the rest compiled
    def _dispatch(self, x_ND: torch.Tensor, routing: RouterOutput, valid_N: torch.Tensor | None):
        """The experts' combined output (N, D) and the fraction of assignments dropped (0-d tensor)."""
        n_real = x_ND.shape[0] if valid_N is None else int(valid_N.sum())
        # Capacity limits bind only in training: at inference every token gets its experts, so an
        # output never depends on what else is in the batch (Mixtral and the HF export assume this).
        capacity = expert_capacity(n_real, self.top_k, self.n_experts, self.capacity_factor) if self.training else None
        out_ND, n_kept = dispatch_and_combine(
            x_ND, routing.expert_indices_NK, routing.expert_weights_NK, self.experts, capacity, valid_N
        )
        n_assignments = n_real * self.top_k
        dropped = torch.tensor((n_assignments - n_kept) / max(n_assignments, 1), device=x_ND.device)
        return out_ND, dropped

    def update_selection_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        if self.router_bias_update_rate > 0:
            self.router.update_selection_bias(tokens_per_expert_E, self.router_bias_update_rate)


def dispatch_and_combine(
    x_ND: torch.Tensor,
    expert_indices_NK: torch.Tensor,
    expert_weights_NK: torch.Tensor,
    experts: GroupedExperts,
    capacity: int | None,
    valid_N: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Sort assignments by expert, run each expert on its contiguous block, gather back weighted.

    Returns the combined output (N, D) and the number of assignments kept (N*K when dropless).
    With a capacity, first choices of all tokens outrank second choices (GShard), and within a rank
    earlier tokens win; assignments past an expert's capacity contribute nothing (the residual
    connection carries the token through unchanged).
    """
    row_multiple = row_multiple_for(x_ND.device, compute_dtype(x_ND, experts.w_in))
    plan = make_plan(expert_indices_NK, experts.w_in.shape[0], capacity, row_multiple, valid_N)
    out_ND = experts(x_ND, expert_weights_NK.t(), plan)
    return out_ND, plan.n_kept


def moe_forward_reference(layer: MoEFeedForward, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Plain per-expert loop with boolean masks: slow, obviously correct; tests pin the fast path to it.

    Routing is recomputed by `layer.router`, so call both paths in eval mode (or with the same RNG
    state) when the router is noisy.
    """
    B, T, D = x_BTD.shape
    x_ND = x_BTD.reshape(B * T, D)
    routing = layer.router(x_ND)
    real_N = torch.ones(B * T, dtype=torch.bool) if valid_BT is None else valid_BT.reshape(-1).cpu()
    capacity = None
    if layer.training:
        capacity = expert_capacity(int(real_N.sum()), layer.top_k, layer.n_experts, layer.capacity_factor)
    out_ND = torch.zeros_like(x_ND)
    for e in range(layer.n_experts):
        # (token, k) pairs routed to e, first choices before second choices, as in the fast path
        chosen = routing.expert_indices_NK.cpu() == e
        pairs = [(n, k) for k in range(layer.top_k) for n in torch.nonzero(chosen[:, k] & real_N).flatten().tolist()]
        if capacity is not None:
            pairs = pairs[:capacity]
        if not pairs:
            continue
        tokens = torch.tensor([n for n, _ in pairs], device=x_ND.device)
        ranks = torch.tensor([k for _, k in pairs], device=x_ND.device)
        y = layer.experts.expert_forward(x_ND[tokens], e)
        out_ND = out_ND.index_add(0, tokens, routing.expert_weights_NK[tokens, ranks].unsqueeze(-1) * y)
    if layer.shared_expert is not None:
        out_ND = out_ND + layer.shared_expert(x_ND)
    return out_ND.reshape(B, T, D)
