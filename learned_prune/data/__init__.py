"""Data modules, collators and benchmark metrics for real data (the lowest layer: imports nothing else
of the package). The embedded ShapesVQA testbed lives in :mod:`learned_prune.testbed`."""

from .collate import VQACollator
from .sampling import ResumableShuffle

__all__ = ["ResumableShuffle", "VQACollator"]
