"""LoRA adapters on the LLM of a frozen backbone, through peft (Hu et al., ICLR 2022, arXiv 2106.09685).

ATP's fine-tuned variant trains low-rank adapters beside the pruning head so the LLM can adapt to
seeing fewer tokens. Here the adapters are injected in place with ``peft.inject_adapter_in_model``
(the model stays an HF LLaVA, so the engine's hooks still find its layers), only into the language
model, and saved as ``adapter_config.json`` + ``adapter_model.safetensors`` beside the head, in
peft's own format: ``LoraConfig.save_pretrained``'s keys, ``target_modules`` a pattern that matches the
language model's layers only, weights under the names a ``PeftModel`` of the whole LLaVA gives them, so
``peft.PeftModel.from_pretrained(model, head_folder)`` loads them too. A loaded head installs its adapters
when it is installed on a model and removes them — the original ``nn.Linear`` modules back in place,
bit for bit — when the ``with`` block exits.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .checked_io import read_json, read_weights

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LM_PATH = "model.language_model"  # where language_model() finds the decoder in an HF LLaVA
PEFT_PREFIX = f"base_model.model.{LM_PATH}."  # the names a PeftModel of the whole LLaVA saves its adapters under
_TARGETS = re.compile(r"^\.\*language_model\.\*\\\.\((.+)\)$")  # target_modules_pattern()'s form


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (``module.lora`` in the configs)."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Sequence[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def peft_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none")

    def target_modules_pattern(self) -> str:
        """``target_modules`` as the regular expression peft matches against the whole LLaVA's module names:
        the named layers of the language model only (the vision tower has ``q_proj``/``v_proj`` too)."""
        return r".*language_model.*\.(" + "|".join(re.escape(t) for t in self.target_modules) + ")"


def language_model(model: nn.Module) -> nn.Module:
    """The decoder of an HF LLaVA / LLaVA-NeXT (``model.model.language_model``)."""
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None)
    if lm is None:
        raise ValueError(f"{type(model).__name__} has no language_model; LoRA here targets HF LLaVA models")
    return lm


def lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def add_lora(model: nn.Module, settings: LoraSettings, state: dict[str, torch.Tensor] | None = None) -> list[nn.Parameter]:
    """Inject LoRA adapters into ``model``'s language model; load ``state`` if given.

    Returns the adapter parameters (trainable). The base weights are untouched.
    """
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    lm = language_model(model)
    if lora_layers(lm):
        raise RuntimeError("this model already carries LoRA adapters; remove them first (remove_lora)")
    names = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in settings.target_modules if t not in names]
    if missing:
        raise ValueError(f"LoRA target_modules {missing} are not linear layers of the LLM; it has {sorted(names)}")
    inject_adapter_in_model(settings.peft_config(), lm)
    if state is not None:
        result = set_peft_model_state_dict(lm, state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            remove_lora(model)
            raise ValueError(f"adapter weights do not fit this model (unexpected {unexpected[:4]})")
    params = [p for n, p in lm.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def remove_lora(model: nn.Module) -> None:
    """Put every wrapped linear layer back (the base ``nn.Linear``, its weights unchanged) and drop the
    ``peft_config`` peft set on the language model (else a later injection warns of "multiple adapters")."""
    lm = language_model(model)
    for name, layer in lora_layers(lm):
        parent_name, _, child = name.rpartition(".")
        parent = lm.get_submodule(parent_name) if parent_name else lm
        setattr(parent, child, layer.get_base_layer())
    lm.__dict__.pop("peft_config", None)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of ``model``'s language model, peft key names."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(language_model(model))


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model without its adapters (e.g. the unpruned teacher in distillation)."""
    layers = [m for _, m in lora_layers(language_model(model))]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def save_adapter(folder: str | Path, state: dict[str, torch.Tensor], settings: LoraSettings) -> None:
    """Write ``state`` (:func:`lora_state_dict`'s names) and ``settings`` in peft's format (module docstring)."""
    from peft import LoraConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()},
              str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
               target_modules=settings.target_modules_pattern()).save_pretrained(str(folder))


def _target_names(value: Any, path: Path) -> list[str]:
    """The layer names of an adapter config's ``target_modules``: a list, or the pattern this module writes."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    found = _TARGETS.match(value) if isinstance(value, str) else None
    if found:
        return [re.sub(r"\\(.)", r"\1", t) for t in found.group(1).split("|")]
    raise ValueError(f"{path}: target_modules {value!r} is neither a list of layer names nor the pattern "
                     "this library writes (.*language_model.*\\.(q_proj|v_proj)); export the head again")


def load_adapter(folder: str | Path) -> tuple[LoraSettings, dict[str, torch.Tensor]] | None:
    """``(settings, state)`` of a folder's adapter, or None when it has none. The config and weights are
    checked (valid JSON, the keys LoRA needs, a readable file, finite weights); failures name the file."""
    folder = Path(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        return None
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has {ADAPTER_WEIGHTS} but no {ADAPTER_CONFIG}")
    cfg = read_json(path, "LoRA adapter config")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg['peft_type']!r} is not LORA; only LoRA adapters are applied")
    values = {"r": cfg.get("r"), "alpha": cfg.get("lora_alpha", cfg.get("alpha")),
              "target_modules": cfg.get("target_modules")}
    missing = [("lora_alpha" if k == "alpha" else k) for k, v in values.items() if v is None]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(map(repr, missing))}: a LoRA adapter config needs r, lora_alpha "
                         "and target_modules (peft's keys); export the head again or add them")
    settings = LoraSettings(enabled=True, r=int(values["r"]), alpha=values["alpha"],
                            dropout=cfg.get("lora_dropout", cfg.get("dropout", 0.0)),
                            target_modules=_target_names(values["target_modules"], path))
    state = read_weights(folder / ADAPTER_WEIGHTS, "LoRA adapter weights")
    return settings, {_lm_key(k): v for k, v in state.items()}


def _lm_key(key: str) -> str:
    """A saved adapter weight's name relative to the language model (peft's whole-model names, or already so)."""
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
