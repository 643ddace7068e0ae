"""Mixture of Experts, by concept: router.py (router and balancing losses), dispatch.py (plan,
capacity, padding), experts.py (the experts), layer.py (the layer that joins them)."""

from .dispatch import dispatch_and_combine, expert_capacity
from .experts import GroupedExperts
from .layer import MoEFeedForward, MoEStats, moe_forward_reference
from .router import Router, RouterOutput, expert_counts, load_balance_loss, router_z_loss

__all__ = ["GroupedExperts", "MoEFeedForward", "MoEStats", "Router", "RouterOutput", "dispatch_and_combine",
           "expert_capacity", "expert_counts", "load_balance_loss", "moe_forward_reference", "router_z_loss"]
