"""The pruner API: a small dataclass per method with one ``select()`` to write.

A pruner is used as a context manager over an HF LLaVA model (the kvpress idiom)::

    pruner = FastV(keep=64)
    with pruner(model):                      # installs; always removed on exit
        out = model.generate(**inputs)

``keep`` is a count (``keep=64``) or a ratio of the visual tokens (``keep=0.111``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine import Engine, PruneState, PrunerProtocol, Selection
from .indices import topk_selection

__all__ = ["Compose", "Pruner", "PrunerBase", "resolve_keep", "topk_selection", "validate_keep"]


def validate_keep(keep: int | float) -> None:
    """Raise a clear error for a budget that can never be met."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be an int count or a float ratio, got {keep!r}")
    if isinstance(keep, int):
        if keep < 1:
            raise ValueError(f"keep={keep}: a budget must keep at least 1 visual token (use keep>=1 or a ratio in (0, 1])")
    elif not (0.0 < keep <= 1.0) or math.isnan(keep):
        raise ValueError(f"keep={keep}: a ratio budget must lie in (0, 1]; pass an int for a token count")


def resolve_keep(keep: int | float, n_visual: torch.Tensor) -> torch.Tensor:
    """Per-sample kept-token counts (B,) for budget ``keep`` given each sample's visual-token count.

    A ratio rounds to the nearest count (at least 1). A count larger than a sample's visual tokens
    is an error: it would silently mean "no pruning".
    """
    validate_keep(keep)
    n = n_visual.long()
    if isinstance(keep, float):
        return (n.double() * keep).round().long().clamp(min=1)
    too_many = n < keep
    if bool(too_many.any()):
        raise ValueError(
            f"keep={keep} exceeds the {int(n[too_many].min())} visual tokens of this input; "
            f"use keep<={int(n.min())} or a ratio such as keep={min(1.0, round(keep / max(int(n.max()), 1), 3))}"
        )
    return torch.full_like(n, keep)


class PrunerBase(PrunerProtocol):
    """Base of every pruner (training-free dataclasses, learned ``nn.Module`` heads, :class:`Compose`).

    The engine's contract, with its no-op defaults, is :class:`~learned_prune.engine.protocol.PrunerProtocol`
    (``sites``, ``prepare``, ``select``, ``repacks``, ``observe_layers``/``observe``, ``attach``/``release``).
    This class adds the one place that builds the context manager: ``with pruner(model):``.
    """

    def parts(self) -> list["PrunerBase"]:
        """The pruners the engine installs for this one: itself (:class:`Compose`: its members, in order)."""
        return [self]

    def __call__(self, model: nn.Module, mode: str = "hard") -> Engine:
        """An :class:`~learned_prune.engine.Engine` installing :meth:`parts` on ``model`` (enter it with ``with``)."""
        return Engine(model, self.parts(), mode=mode)


@dataclass
class Pruner(PrunerBase):
    """Base dataclass of training-free pruners: a budget and one ``score`` or ``select``.

    ``repack_positions`` (keyword-only, every method) overrides the site's position rule, e.g.
    ``load_pruner("fastervlm", keep=32, repack_positions=False)`` keeps the kept image tokens at their
    original RoPE positions instead of re-packing them as the official vision-site code does.
    """

    keep: int | float = 64
    repack_positions: bool | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        validate_keep(self.keep)

    def score(self, state: PruneState) -> torch.Tensor:  # pragma: no cover - abstract
        """Importance of each visual token (B, Nv); the top ``keep`` are kept."""
        raise NotImplementedError

    def select(self, state: PruneState) -> Selection:
        k = resolve_keep(self.keep, state.n_visual_original).clamp(max=state.n_visual)
        return Selection(indices=topk_selection(self.score(state), state.visual_valid, k))


class Compose(PrunerBase):
    """Several pruners applied in order on one model (e.g. DyVTE after FastV)."""

    def __init__(self, pruners: list[PrunerBase]) -> None:
        if not pruners:
            raise ValueError("Compose needs at least one pruner")
        self.pruners = list(pruners)

    def parts(self) -> list[PrunerBase]:
        return list(self.pruners)

    def sites(self, adapter: Any) -> list[str]:
        """Every member's sites, in order (the engine asks the members themselves)."""
        return [s for p in self.pruners for s in p.sites(adapter)]

    def __repr__(self) -> str:
        return f"Compose({self.pruners!r})"
