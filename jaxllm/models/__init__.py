"""Model families as Flax modules used as pure functions."""

from jaxllm.models.registry import build_model, forward

__all__ = ["build_model", "forward"]
