"""Shared base of learned pruning heads: an ``nn.Module`` that is also a pruner, and exports as a folder.

A head follows the one pruner protocol of :class:`~learned_prune.pruners.base.PrunerBase`
(``sites``/``prepare``/``select``; ``head(model)`` returns the engine, used as ``with head(model):``)
and records what its training losses need while it runs. It is never called as a layer: its
``forward`` raises. ``save_pretrained(folder)`` writes ``config.json`` (method, hyper-parameters,
backbone id, sizes and fingerprint, library version) and ``model.safetensors`` (the head's weights
only); :func:`learned_prune.pruners.heads.load_head` rebuilds it and refuses a backbone of other sizes.

The hyper-parameters in ``config.json`` are derived from the head's constructor: every argument of
``__init__`` is saved under its name, with the value the head keeps in the attribute of that name
(the resolved value: e.g. LVPruning's ``heads=None`` is saved as the head count it chose), so no
head lists its arguments a second time and an export does not depend on a default rule that might change.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .base import PrunerBase
from .checked_io import read_weights

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def backbone_signature(adapter: Any) -> dict[str, Any]:
    """The family and sizes a head depends on, recorded at export and checked at load (the family adapter's
    ``signature()``: a head refuses a backbone of another family by name)."""
    return adapter.signature()


_MISSING = object()
FINGERPRINT_TENSORS = 8  # parameters sampled, evenly spaced over the model's parameter list
FINGERPRINT_VALUES = 8  # values sampled from each


@torch.no_grad()
def backbone_fingerprint(model: nn.Module) -> list[float] | None:
    """A few weight values of ``model`` (evenly spaced parameters, evenly spaced entries of each),
    recorded at export and compared at install, so a head notices a backbone of the right sizes but
    other weights (e.g. a retrained one). LoRA weights are left out; None when the weights are
    partitioned (DeepSpeed ZeRO-3), where nothing can be read cheaply."""
    params = [p for n, p in model.named_parameters() if "lora_" not in n]
    if not params or any(p.numel() == 0 for p in params):
        return None
    pick = torch.linspace(0, len(params) - 1, FINGERPRINT_TENSORS).round().long().unique().tolist()
    values: list[float] = []
    for i in pick:
        flat = params[i].detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, FINGERPRINT_VALUES, device=flat.device).round().long()
        values += [round(float(v), 6) for v in flat[idx].float().cpu()]
    return values


def fingerprints_match(a: list[float], b: list[float]) -> bool:
    """Equal within bf16/fp16 rounding (a head trained in bf16 loads on the same weights in fp32)."""
    if len(a) != len(b):
        return False
    return bool(torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-2, atol=1e-4))


def _plain(value: Any) -> Any:
    """``value`` as JSON-ready Python: mappings become dicts, sequences (tuples, Hydra's ListConfig) lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


class LearnedHead(PrunerBase, nn.Module):
    """Base of learned heads: a pruner (:class:`PrunerBase`) whose parameters train.

    Subclasses set ``method`` and implement ``sites``, ``select`` and ``budget_loss``, and keep each
    constructor argument in an attribute of the same name (what :meth:`hparams` saves).
    """

    method: str = ""
    adaptive: bool = False  # True: the head picks its kept count per instance (evaluated at its mean)
    accepts_keep: bool = False  # an adaptive head that can also be given a budget `keep` at inference
    repack_positions: bool | None = False  # soft training never moves tokens; inference must match
    display_name: str = ""  # for messages, e.g. "ATP"
    sized_for_llm: bool = False  # True: built for an LLM of ``hidden_size`` x ``num_layers``, checked in prepare()

    def __init__(self) -> None:
        super().__init__()
        self.backbone: dict[str, Any] = {}  # signature of the backbone the head was built for
        self.check_backbone = True  # refuse a backbone whose weights differ from the training one
        self.lora: tuple[Any, dict[str, torch.Tensor]] | None = None  # (LoraSettings, weights) of a loaded head
        self._lora_attached = False

    # ---- pruner protocol (``head(model)`` is PrunerBase.__call__: the engine) ----------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"this {self.display_name or self.method or type(self).__name__} head is a pruner, not a layer: install it "
            "on a model with `with head(model): model(...)` (or head(model, mode='soft') in training)"
        )

    def prepare(self, adapter: Any) -> None:
        if self.sized_for_llm and (adapter.text_config.hidden_size != self.hidden_size
                                   or adapter.num_layers != self.num_layers):
            raise ValueError(
                f"this {self.display_name or self.method} head was built for an LLM with hidden size "
                f"{self.hidden_size} and {self.num_layers} layers, but the model has hidden size "
                f"{adapter.text_config.hidden_size} and {adapter.num_layers} layers"
            )
        have = backbone_signature(adapter)
        if self.backbone:
            diff = {k: (v, have[k]) for k, v in self.backbone.items() if k in have and have[k] != v}
            if diff:
                want = ", ".join(f"{k}={a}" for k, (a, _) in diff.items())
                got = ", ".join(f"{k}={b}" for k, (_, b) in diff.items())
                name = self.backbone.get("name_or_path", "its training backbone")
                raise ValueError(
                    f"this {self.method} head was trained on {name} ({want}) but the model has {got}; "
                    "load it on the backbone it was trained for, or train a head for this one"
                )
            self._check_fingerprint(adapter)
        else:
            self.backbone = {**have, "fingerprint": backbone_fingerprint(adapter.model)}

    def _check_fingerprint(self, adapter: Any) -> None:
        want = self.backbone.get("fingerprint")
        if not want or not self.check_backbone:
            return
        have = backbone_fingerprint(adapter.model)
        if have is not None and not fingerprints_match(want, have):
            name = self.backbone.get("name_or_path", "its training backbone")
            raise ValueError(
                f"this {self.method} head was trained on {name}, but this model's weights differ from that "
                "backbone's (same sizes, other weights: e.g. a retrained or fine-tuned backbone), so its "
                "selections would mean nothing here. Load the backbone it was trained on, train a head for "
                "this one, or pass check_backbone=False to load_pruner(...) to install it anyway"
            )

    def attach(self, adapter: Any) -> None:
        """Install the head's LoRA adapters (if it was exported with some) for one ``with`` block."""
        from .lora import add_lora, language_model, lora_layers

        if self.lora is None or lora_layers(language_model(adapter.model)):
            return  # no adapters, or the model already carries them (e.g. during training)
        settings, state = self.lora
        add_lora(adapter.model, settings, state)
        adapter.model.requires_grad_(False)
        self._lora_attached = True

    def release(self, adapter: Any) -> None:
        from .lora import remove_lora

        if self._lora_attached:
            remove_lora(adapter.model)
            self._lora_attached = False

    # ---- training hooks ------------------------------------------------------------------
    def budget_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # pragma: no cover - abstract
        """The budget/ratio loss of the last forward pass and the values worth logging."""
        raise NotImplementedError

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this head (``config.json`` "hparams"): every argument of
        ``type(self).__init__``, valued by the head's attribute of that name."""
        out = {}
        for name, param in inspect.signature(type(self).__init__).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            value = getattr(self, name, _MISSING)
            if value is _MISSING or isinstance(value, nn.Module):
                raise TypeError(f"{type(self).__name__} keeps no value for its constructor argument {name!r}: a head "
                                f"keeps each argument in the attribute of that name (config.json saves them)")
            out[name] = _plain(value)
        return out

    # ---- export / load -------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, extra: dict[str, Any] | None = None,
                        lora: tuple[Any, dict[str, torch.Tensor]] | None = None) -> Path:
        """Write the head folder; ``lora=(settings, weights)`` adds peft-style adapter files."""
        from ..version import __version__
        from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"method": self.method, "hparams": self.hparams(), "backbone": self.backbone,
                  "library_version": __version__, **(extra or {})}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"method": self.method})
        lora = lora or self.lora
        if lora is not None:
            save_adapter(folder, lora[1], lora[0])
        else:  # a stale adapter from an earlier export must not be applied to this head
            for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                (folder / name).unlink(missing_ok=True)
        return folder

    def load_weights(self, folder: str | Path) -> None:
        """Load ``folder/model.safetensors`` (checked by :func:`read_weights`) into this head."""
        path = Path(folder) / WEIGHTS_NAME
        state = read_weights(path, "head weights")
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shapes that do not match the config's hyper-parameters
            raise ValueError(f"{path}: weights do not fit this {self.method} head: {e}") from None
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not fit this {self.method} head "
                             f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
