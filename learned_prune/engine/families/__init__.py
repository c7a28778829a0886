"""The model families the engine knows: one adapter file each, one line each in :data:`FAMILIES`.

Adding a family is one file here (a :class:`~.base.FamilyAdapter` subclass), one line below and a
tiny-config builder in ``learned_prune/backbones/`` for its tests (docs/design-notes.md walks through it).
"""

from __future__ import annotations

from torch import nn

from .base import NEEDS, FamilyAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter

FAMILIES: dict[str, type[FamilyAdapter]] = {  # HF config.model_type -> adapter
    "llava": LlavaAdapter,
    "llava_next": LlavaNextAdapter,
    "qwen2_5_vl": Qwen2_5_VLAdapter,
    "llava_onevision": LlavaOnevisionAdapter,
}


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter of ``model``'s family (by ``model.config.model_type``); raises naming the supported families."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    cls = FAMILIES.get(kind)
    if cls is None:
        raise TypeError(
            f"{type(model).__name__} (model_type={kind!r}) is not a model family the pruning engine knows; supported: "
            f"{sorted(FAMILIES)} (adding one: docs/design-notes.md, 'Adding a model family')"
        )
    return cls(model)


__all__ = ["FAMILIES", "NEEDS", "FamilyAdapter", "adapter_for"]
