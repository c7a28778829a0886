"""Transitional re-export: the token sequence moved to :mod:`.tokens`, the masks to :mod:`.masks`.

Kept only until ``learned_prune/modules/dyvte.py`` stops importing ``build_mask``/``compact_index``
from here (it should call :func:`learned_prune.engine.segment.run_layers`); then delete this file.
"""

from .masks import build_mask, mask_kind
from .tokens import TokenSequence, compact_index

Sequence = TokenSequence  # the old name, which shadowed collections.abc.Sequence

__all__ = ["Sequence", "TokenSequence", "build_mask", "compact_index", "mask_kind"]
