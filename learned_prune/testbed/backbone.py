"""The skeleton of the embedded default backbone: a random tiny LLaVA that knows the ShapesVQA words."""

from __future__ import annotations

from typing import Any

from ..backbones import tiny_llava
from .scenes import VOCAB


def testbed_llava(family: str = "llava", **kwargs: Any) -> tuple[Any, Any]:
    """:func:`~learned_prune.backbones.tiny_llava` with the ShapesVQA vocabulary (``module=backbone`` trains
    it into ``checkpoints/tiny-llava-shapes``; tests that train on ShapesVQA build their models with it)."""
    return tiny_llava(family, vocab=VOCAB, **kwargs)
