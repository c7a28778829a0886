"""LightningModules: backbone pretraining and one per learned pruning method."""

from .atp import ATPModule
from .bavit import BAViTModule
from .dyvte import DyVTEModule
from .backbone import BackboneModule
from .learned import LearnedPrunerModule
from .lvpruning import LVPruningModule

__all__ = ["ATPModule", "BAViTModule", "BackboneModule", "DyVTEModule", "LearnedPrunerModule", "LVPruningModule"]
