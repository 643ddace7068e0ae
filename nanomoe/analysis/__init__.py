"""Analysis of trained models: expert usage reports (`nanomoe experts`)."""

from .experts import TokenText, analyze_experts, route_samples, write_report

__all__ = ["TokenText", "analyze_experts", "route_samples", "write_report"]
