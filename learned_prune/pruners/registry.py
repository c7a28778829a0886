"""Name -> pruner class, and ``load_pruner``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .aim import AIMMerge
from .base import Compose, PrunerBase
from .cdpruner import CDPruner
from .dart import DART
from .divprune import DivPrune
from .downsample import Downsample
from .fastervlm import FasterVLM
from .fastv import FastV
from .no_pruning import NoPruning
from .pool import PoolPruner
from .pyramiddrop import PyramidDrop
from .random_subset import RandomPruner
from .sparsevlm import SparseVLM
from .tome import ToMe
from .transprune import TransPrune
from .visionzip import VisionZip
from .vtc_cls import VTCCLS

PRUNERS: dict[str, type] = {
    "none": NoPruning,
    "random": RandomPruner,
    "pool": PoolPruner,
    "downsample": Downsample,
    "fastv": FastV,
    "fastervlm": FasterVLM,
    "divprune": DivPrune,
    "dart": DART,
    "visionzip": VisionZip,
    "vtc_cls": VTCCLS,
    "pyramiddrop": PyramidDrop,
    "tome": ToMe,
    "aim_merge": AIMMerge,
    "sparsevlm": SparseVLM,
    "transprune": TransPrune,
    "cdpruner": CDPruner,
}


def looks_like_path(name: str) -> bool:
    """True when ``name`` is written as a file path (``checkpoints/atp-tiny``, ``./h``, ``~/h``), not a
    registry name (registry names hold no path separator)."""
    return "/" in name or "\\" in name or name.startswith((".", "~"))


def register_pruner(name: str, cls: type) -> type:
    """Add a pruner class under ``name`` (one line per method)."""
    if name in PRUNERS and PRUNERS[name] is not cls:
        raise ValueError(f"a pruner named {name!r} is already registered ({PRUNERS[name].__name__})")
    PRUNERS[name] = cls
    return cls


def load_pruner(name: str | list | PrunerBase, **kwargs: Any) -> PrunerBase:
    """Build a pruner from a registry name, a head folder, a pruner object, or a list of these (applied in order).

    ``load_pruner("fastv", layer=2, keep=64)``; ``load_pruner(["fastv", "random"], keep=0.5)``
    gives each the same kwargs; unknown names and unknown arguments raise with the valid choices.
    """
    if isinstance(name, PrunerBase):
        return name  # already a pruner (a registry class instance, or a learned head)
    if isinstance(name, (list, tuple)):
        return Compose([load_pruner(n, **kwargs) for n in name])
    if name not in PRUNERS and (Path(name).is_dir() or looks_like_path(str(name))):
        from .heads import load_head  # learned heads exported as folders (a missing one fails naming the path)

        return load_head(name, **kwargs)
    if name not in PRUNERS:
        raise KeyError(f"unknown pruner {name!r}; registered: {sorted(PRUNERS)} (or pass a head folder)")
    cls = PRUNERS[name]
    try:
        return cls(**kwargs)
    except TypeError as e:
        import dataclasses

        fields = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
        raise TypeError(f"{name}: {e}; valid arguments: {fields}") from None
