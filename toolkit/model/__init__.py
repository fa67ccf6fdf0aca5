"""Model code: math only, no parallelism plumbing."""

from toolkit.model.hybrid import HybridLM, count_parameters, flops_per_token

__all__ = ["HybridLM", "count_parameters", "flops_per_token"]
