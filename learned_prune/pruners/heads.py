"""Learned heads by method name, and ``load_head(folder)`` for exported head folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atp import ATPHead
from .bavit import BAViTHead
from .dyvte import DyVTEHead
from .lora import load_adapter
from .lvpruning import LVPruningHead
from .learned import CONFIG_NAME, WEIGHTS_NAME, LearnedHead

HEADS: dict[str, type[LearnedHead]] = {"atp": ATPHead, "bavit": BAViTHead, "lvpruning": LVPruningHead,
                                    "dyvte": DyVTEHead}


def is_adaptive(name: str) -> bool:
    """True for a head folder whose method sets its own kept count (evaluated once, at its mean)."""
    cfg = Path(name) / CONFIG_NAME
    if not cfg.is_file():
        return False
    method = json.loads(cfg.read_text()).get("method")
    return method in HEADS and HEADS[method].adaptive


def load_head(folder: str | Path, **overrides: Any) -> LearnedHead:
    """Rebuild an exported head: ``config.json`` gives the method and hyper-parameters,
    ``model.safetensors`` the weights. ``overrides`` change hyper-parameters that do not affect the
    weights (e.g. ``target``). When the head is installed, the backbone's sizes and a fingerprint of
    its weights are checked against the training backbone's; ``check_backbone=False`` skips the
    weights check (for a backbone known to be equivalent)."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not an exported head: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = json.loads(cfg_path.read_text())
    method = config.get("method")
    if method not in HEADS:
        raise ValueError(f"{folder}: unknown head method {method!r}; known: {sorted(HEADS)}")
    if "keep" in overrides and HEADS[method].adaptive and not HEADS[method].accepts_keep:
        raise ValueError(f"{folder}: {method} heads choose their kept count per instance; "
                         "they take no `keep` (their training target sets the mean)")
    check_backbone = bool(overrides.pop("check_backbone", True))
    hparams = {**config["hparams"], **overrides}
    head = HEADS[method](**hparams)
    head.load_weights(folder)
    head.lora = load_adapter(folder)
    head.backbone = dict(config.get("backbone") or {})
    head.check_backbone = check_backbone
    head.eval()
    return head
