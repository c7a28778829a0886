"""Reading a head folder's files with checks: every failure names the file and says what is wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; unreadable or invalid JSON fails naming the file, the line and the fix."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the {what} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                         "restore the file or export the head again") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the {what} ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the {what} must be a JSON object, got {type(value).__name__}")
    return value


def read_weights(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked: a damaged file, or NaN/Inf in any tensor, fails naming
    the file (and the tensors), so a broken head never loads and silently prunes nonsense."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the {what}, not a valid safetensors file ({e}); restore the file "
                         "or export the head again") from None
    bad = {k: v for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())}
    if bad:
        counts = ", ".join(f"{k} ({int(v.isnan().sum())} NaN, {int(v.isinf().sum())} Inf)"
                           for k, v in list(bad.items())[:4])
        raise ValueError(f"{path}: the {what} hold non-finite values in {len(bad)} tensor(s): {counts}"
                         f"{' ...' if len(bad) > 4 else ''}. A head trained to NaN (diverged) or a damaged file "
                         "prunes meaninglessly; export it again from a checkpoint with finite weights")
    return state
