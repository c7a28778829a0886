"""LoRA adapters on the LLM of a frozen backbone, through peft (Hu et al., ICLR 2022, arXiv 2106.09685).

ATP's fine-tuned variant trains low-rank adapters beside the pruning head so the LLM can adapt to
seeing fewer tokens. Here the adapters are injected in place with ``peft.inject_adapter_in_model``
(the model stays an HF LLaVA, so the engine's hooks still find its layers), only into the language
model, and saved peft-style as ``adapter_config.json`` + ``adapter_model.safetensors`` beside the
head. A loaded head installs its adapters when it is installed on a model and removes them — the
original ``nn.Linear`` modules back in place, bit for bit — when the ``with`` block exits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


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
    """Put every wrapped linear layer back (the base ``nn.Linear``, its weights unchanged)."""
    lm = language_model(model)
    for name, layer in lora_layers(lm):
        parent_name, _, child = name.rpartition(".")
        parent = lm.get_submodule(parent_name) if parent_name else lm
        setattr(parent, child, layer.get_base_layer())


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
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    cfg = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in asdict(settings).items() if k != "enabled"}
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "applies_to": "language_model", **cfg}, indent=2))


def load_adapter(folder: str | Path) -> tuple[LoraSettings, dict[str, torch.Tensor]] | None:
    """``(settings, state)`` of a folder's adapter, or None when it has none."""
    folder = Path(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        return None
    if not (folder / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{folder} has {ADAPTER_WEIGHTS} but no {ADAPTER_CONFIG}")
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    settings = LoraSettings(enabled=True, r=cfg["r"], alpha=cfg["alpha"], dropout=cfg.get("dropout", 0.0),
                            target_modules=cfg["target_modules"])
    return settings, load_file(str(folder / ADAPTER_WEIGHTS))
