"""Runs an HF LLaVA with pruning sites: hard gather for inference, soft log-masks for training."""

from .core import Engine, parse_site
from .state import LayerTrace, PruneState, Selection

__all__ = ["Engine", "LayerTrace", "PruneState", "Selection", "parse_site"]
