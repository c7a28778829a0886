"""LightningModules: backbone pretraining and one per learned pruning method."""

from .atp import ATPModule
from .backbone import BackboneModule
from .learned import LearnedPrunerModule

__all__ = ["ATPModule", "BackboneModule", "LearnedPrunerModule"]
