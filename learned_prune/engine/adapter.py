"""Where the engine finds things inside a model: the family adapters (:mod:`.families`), one per model family.

``adapter_for(model)`` picks the adapter by ``model.config.model_type``; ``LlavaAdapter(model)`` is kept
for older callers and now returns the adapter of any known family.
"""

from __future__ import annotations

from torch import nn

from .families import FAMILIES, FamilyAdapter, adapter_for


def LlavaAdapter(model: nn.Module) -> FamilyAdapter:  # noqa: N802 - the old class name, kept as a factory
    """The family adapter of ``model`` (the name predates the families; use :func:`adapter_for`)."""
    return adapter_for(model)


__all__ = ["FAMILIES", "FamilyAdapter", "LlavaAdapter", "adapter_for"]
