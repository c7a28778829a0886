"""LightningDataModules and collators (the lowest layer: imports nothing else of the package)."""

from .collate import VQACollator
from .datamodule import ShapesVQADataModule
from .shapes import COLOR_NAMES, N_PATCH_CLASSES, QUESTION_TYPES, SHAPES, SIZE_NAMES, VOCAB, ShapesVQADataset

__all__ = [
    "COLOR_NAMES", "N_PATCH_CLASSES", "QUESTION_TYPES", "SHAPES", "SIZE_NAMES", "VOCAB",
    "ShapesVQADataModule", "ShapesVQADataset", "VQACollator",
]
