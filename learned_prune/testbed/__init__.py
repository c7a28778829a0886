"""The embedded testbed: ShapesVQA scenes and questions, its data module, its vocabulary and the
recipe that trains the tiny backbone shipped in ``checkpoints/tiny-llava-shapes`` (``module=backbone``;
and the stages of the recipe being built for issue #19, after how LLaVA-style models are made:
``module=contrastive`` (CLIP-style tower), ``module=text_pretrain`` (the LLM on text), ``module=align``
(the projector, LLaVA stage 1), then ``module=backbone`` (instruction tuning)).

Everything specific to the synthetic testbed lives here, above the rest of the package: the engine,
pruners, modules and evaluation know nothing of it.
"""

from .backbone import testbed_llava
from .datamodule import ShapesVQADataModule
from .recipe import BackboneModule
from .scenes import COLOR_NAMES, N_PATCH_CLASSES, QUESTION_TYPES, SHAPES, SIZE_NAMES, VOCAB, ShapesVQADataset

__all__ = [
    "BackboneModule", "COLOR_NAMES", "N_PATCH_CLASSES", "QUESTION_TYPES", "SHAPES", "SIZE_NAMES", "VOCAB",
    "ShapesVQADataModule", "ShapesVQADataset", "testbed_llava",
]
