"""``load_backbone``: an HF LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL model and its processor, by hub id or local folder."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor, PreTrainedModel, ProcessorMixin

from .tiny import tiny_llava

_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}
TINY = {"tiny": "llava", "tiny-next": "llava_next", "tiny-qwen2_5_vl": "qwen2_5_vl", "tiny-llava_onevision": "llava_onevision"}


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
    yourself to allow it), or ``"tiny"`` / ``"tiny-next"`` / ``"tiny-qwen2_5_vl"`` for a random in-code
    :func:`tiny_llava`. A Qwen-VL processor loads for images only when its video processor cannot
    (it needs torchvision).
    SDPA attention by default; bf16 on CUDA, fp32 otherwise. Extra ``kwargs`` go to ``from_pretrained``.
    """
    name = str(name_or_path)
    if name in TINY:
        model, processor = tiny_llava(TINY[name], attn_implementation=attn_implementation)
        return model.to(device or "cpu"), processor
    if local_files_only is None:
        local_files_only = True
    _check_local(name)
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local_files_only)
    except OSError as e:
        if Path(name).is_dir():
            raise ValueError(f"cannot load backbone {name!r}: {Path(name) / 'config.json'} cannot be read "
                             f"({e})") from e
        raise FileNotFoundError(
            f"cannot load backbone {name!r}: there is no folder {name} here ({Path.cwd()}), and no hub id {name!r} "
            "in the local HF cache (this library does not download: fetch it once with `huggingface-cli download "
            f"{name}`), so check the path or pass a local folder"
        ) from e
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
    processor = _processor(name, config.model_type, local_files_only)
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"
    model.eval()
    if device is not None:
        model.to(device)
    return model, processor


# Families whose HF processor also builds a video processor (torchvision): their image-only processors.
IMAGE_ONLY = {"qwen2_5_vl": (".tiny_qwen", "QwenImageProcessor"),
              "llava_onevision": (".tiny_onevision", "OneVisionImageProcessor")}


def _processor(name: str, model_type: str, local_files_only: bool) -> ProcessorMixin:
    """``AutoProcessor``; for Qwen-VL, whose full processor also builds a video processor (torchvision), the
    image-only :class:`~.tiny_qwen.QwenImageProcessor` from the folder's image processor and tokenizer when
    the full one cannot load (AutoProcessor then falls back to the tokenizer alone)."""
    try:
        processor = AutoProcessor.from_pretrained(name, local_files_only=local_files_only)
    except (ImportError, ValueError, AttributeError):
        if model_type not in IMAGE_ONLY:
            raise
        processor = None
    if model_type in IMAGE_ONLY and getattr(processor, "image_processor", None) is None:
        from transformers import AutoImageProcessor, AutoTokenizer

        module, cls = IMAGE_ONLY[model_type]
        kwargs = {}
        path = Path(name) / "processor_config.json"
        if path.is_file():  # the processor's own settings (token counts, strategies)
            kwargs = {k: v for k, v in json.loads(path.read_text()).items()
                      if k in ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")}
        image_only = getattr(importlib.import_module(module, __package__), cls)
        processor = image_only(AutoImageProcessor.from_pretrained(name, local_files_only=local_files_only),
                               AutoTokenizer.from_pretrained(name, local_files_only=local_files_only), **kwargs)
    return processor


def _check_local(name: str) -> None:
    """Refuse, naming the path, a local path that does not exist (a hub id never starts with ``/``, ``.``
    or ``~`` nor has more than one ``/``) and a folder that is not an HF model: a pruning head's folder,
    or one without a readable config.json."""
    path = Path(name).expanduser()
    if not path.exists():
        if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
            raise FileNotFoundError(f"cannot load backbone {name!r}: no such folder ({path.absolute()}); give the "
                                    "folder a save_pretrained wrote, or a hub id in the local HF cache")
        return  # a hub id (or a relative folder of the same form, which then fails with both explanations)
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        raise FileNotFoundError(f"cannot load backbone {name!r}: {path} is not a model folder (it needs the "
                                "config.json, weights and processor files save_pretrained writes)")
    try:
        values = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot load backbone {name!r}: {config} is not valid JSON ({e})") from None
    if isinstance(values, dict) and "method" in values and "model_type" not in values:
        trained_on = (values.get("backbone") or {}).get("name_or_path")
        raise ValueError(f"{name} is a pruning head's folder ({values['method']}), not a backbone: load it with "
                         f"load_pruner({name!r}); its backbone is {trained_on!r}")
