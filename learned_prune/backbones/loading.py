"""``load_backbone``: an HF LLaVA-1.5 / LLaVA-NeXT model and its processor, by hub id or local folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor, PreTrainedModel, ProcessorMixin

from .tiny import tiny_llava

_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
}


def _default_dtype(device: str | torch.device | None) -> torch.dtype:
    return torch.bfloat16 if device is not None and str(device).startswith("cuda") else torch.float32


def load_backbone(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
    local_files_only: bool | None = None,
    **kwargs: Any,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load ``(model, processor)`` in eval mode.

    ``name_or_path``: a local folder written by ``save_pretrained`` (model + processor), an HF hub
    id already in the local cache (this library never downloads: set ``local_files_only=False``
    yourself to allow it), or ``"tiny"`` / ``"tiny-next"`` for a random in-code :func:`tiny_llava`.
    SDPA attention by default; bf16 on CUDA, fp32 otherwise. Extra ``kwargs`` go to ``from_pretrained``.
    """
    name = str(name_or_path)
    if name in ("tiny", "tiny-next"):
        model, processor = tiny_llava("llava" if name == "tiny" else "llava_next", attn_implementation=attn_implementation)
        return model.to(device or "cpu"), processor
    is_local = Path(name).is_dir()
    if local_files_only is None:
        local_files_only = True
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local_files_only)
    except OSError as e:
        hint = "the folder has no config.json" if is_local else (
            "it is not in the local HF cache and this library does not download; "
            "fetch it once with `huggingface-cli download` or pass a local folder"
        )
        raise FileNotFoundError(f"cannot load backbone {name!r}: {hint}") from e
    if config.model_type not in _CLASSES:
        raise ValueError(f"{name!r} is a {config.model_type!r} model; supported: {sorted(_CLASSES)}")
    import transformers

    cls = getattr(transformers, _CLASSES[config.model_type])
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = cls.from_pretrained(
        name,
        dtype=dtype or _default_dtype(device),
        attn_implementation=attn_implementation,
        local_files_only=local_files_only,
        **kwargs,
    )
    processor = AutoProcessor.from_pretrained(name, local_files_only=local_files_only)
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"
    model.eval()
    if device is not None:
        model.to(device)
    return model, processor
