"""Learned heads by method name, and ``load_head(folder)`` for exported head folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .atp import ATPHead
from .bavit import BAViTHead
from .dyvte import DyVTEHead
from .flashsloth import FlashSlothHead
from .lora import load_adapter
from .lvpruning import LVPruningHead
from .quecc import QueCCHead
from .checked_io import read_json
from .learned import CONFIG_NAME, WEIGHTS_NAME, LearnedHead

HEADS: dict[str, type[LearnedHead]] = {"atp": ATPHead, "bavit": BAViTHead, "lvpruning": LVPruningHead,
                                    "dyvte": DyVTEHead, "flashsloth": FlashSlothHead, "quecc": QueCCHead}


def is_adaptive(name: str) -> bool:
    """True for a head folder whose method sets its own kept count (evaluated once, at its mean)."""
    cfg = Path(name) / CONFIG_NAME
    if not cfg.is_file():
        return False
    method = read_head_config(Path(name)).get("method")
    return method in HEADS and HEADS[method].adaptive


def read_head_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` of an exported head, checked: valid JSON, a known ``method`` and ``hparams``.
    Every failure names the file and what is wrong (a backbone folder is told apart from a broken head)."""
    path = folder / CONFIG_NAME
    config = read_json(path, "head config")
    if "method" not in config:
        hint = (f"it is a backbone's config ({config['model_type']!r}): load it with load_backbone({str(folder)!r})"
                if "model_type" in config else "an exported head's config names its `method` and `hparams`")
        raise ValueError(f"{path} names no `method`, so {folder} is not an exported pruning head; {hint}")
    if config["method"] not in HEADS:
        raise ValueError(f"{path}: unknown head method {config['method']!r}; known: {sorted(HEADS)}")
    if not isinstance(config.get("hparams"), dict):
        raise ValueError(f"{path}: `hparams` must be a mapping of the {config['method']} head's constructor "
                         f"arguments, got {config.get('hparams')!r}; re-export the head")
    return config


def load_head(folder: str | Path, **overrides: Any) -> LearnedHead:
    """Rebuild an exported head: ``config.json`` gives the method and hyper-parameters,
    ``model.safetensors`` the weights. ``overrides`` change hyper-parameters that do not affect the
    weights (e.g. ``target``). When the head is installed, the backbone's sizes and a fingerprint of
    its weights are checked against the training backbone's; ``check_backbone=False`` skips the
    weights check (for a backbone known to be equivalent)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no head folder at {folder} (from {Path.cwd()}): give the folder an export wrote "
                                f"(e.g. checkpoints/atp-tiny), or a registry name")
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not an exported head: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = read_head_config(folder)
    method = config["method"]
    if "keep" in overrides and HEADS[method].adaptive and not HEADS[method].accepts_keep:
        raise ValueError(f"{folder}: {method} heads choose their kept count per instance; "
                         "they take no `keep` (their training target sets the mean)")
    check_backbone = bool(overrides.pop("check_backbone", True))
    hparams = {**config["hparams"], **overrides}
    try:
        head = HEADS[method](**hparams)
    except TypeError as e:
        raise TypeError(f"{cfg_path}: the hparams do not fit the {method} head ({e}); re-export the head, "
                        "or correct the argument") from None
    head.load_weights(folder)
    head.lora = load_adapter(folder)
    head.backbone = dict(config.get("backbone") or {})
    head.check_backbone = check_backbone
    head.eval()
    return head
