"""Transitional re-export: ``NoPruning`` moved to :mod:`.no_pruning`, ``RandomPruner`` to
:mod:`.random_subset`. Delete once configs/method/{none,random}.yaml name the new modules."""

from .no_pruning import NoPruning
from .random_subset import RandomPruner

__all__ = ["NoPruning", "RandomPruner"]
