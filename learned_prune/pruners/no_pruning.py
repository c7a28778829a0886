"""``none``: the unpruned reference, run through the same engine."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.state import PruneState, Selection
from .base import PrunerBase


@dataclass
class NoPruning(PrunerBase):
    """Keeps every visual token: the unpruned reference, run through the same engine."""

    site: str = "vision"

    def sites(self, adapter) -> list[str]:
        return []

    def select(self, state: PruneState) -> Selection:  # pragma: no cover - never called
        raise RuntimeError("NoPruning has no site")
