"""LightningModules: backbone pretraining and one per learned pruning method."""

from .backbone import BackboneModule

__all__ = ["BackboneModule"]
