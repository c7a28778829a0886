"""LightningModules: one per learned pruning method (the testbed backbone's recipe is in ``learned_prune.testbed``)."""

from .atp import ATPModule
from .bavit import BAViTModule
from .dyvte import DyVTEModule
from .learned import LearnedPrunerModule
from .lvpruning import LVPruningModule

__all__ = ["ATPModule", "BAViTModule", "DyVTEModule", "LearnedPrunerModule", "LVPruningModule"]
