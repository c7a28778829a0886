"""Every pruning method, one file each; ``load_pruner`` builds them by name."""

from .base import Compose, Pruner, PrunerBase, resolve_keep, topk_selection, validate_keep
from .fastervlm import FasterVLM
from .fastv import FastV
from .pool import PoolPruner
from .registry import PRUNERS, load_pruner, register_pruner
from .no_pruning import NoPruning
from .random_subset import RandomPruner

__all__ = [
    "PRUNERS", "Compose", "FastV", "FasterVLM", "NoPruning", "PoolPruner", "Pruner", "PrunerBase",
    "RandomPruner", "load_pruner", "register_pruner", "resolve_keep", "topk_selection", "validate_keep",
]
