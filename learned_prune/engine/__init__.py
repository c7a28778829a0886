"""Runs an HF LLaVA with pruning sites: hard gather for inference, soft log-masks for training."""

from .core import Engine
from .protocol import PrunerProtocol
from .segment import SegmentOutput, run_layers
from .selection import LayerTrace, Selection
from .sites import parse_site
from .state import PruneState

__all__ = ["Engine", "LayerTrace", "PruneState", "PrunerProtocol", "SegmentOutput", "Selection", "parse_site",
           "run_layers"]
