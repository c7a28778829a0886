"""The engine as a context manager: an HF LLaVA run with pruning sites for the duration of a ``with`` block.

This file ties the parts together; each has one job: :mod:`.sites` (which pruner acts where),
:mod:`.hooks` (install / remove), :mod:`.inputs` (which input rows are visual, images repeated by
generate()), :mod:`.loop` (the decoder loop and its KV-cache bookkeeping), :mod:`.cache` (which
caches it takes, and a filled cache following the engine), :mod:`.outputs` (hidden states,
attentions and the loss on the output rows), :mod:`.apply` (hard gather / soft mask), :mod:`.state`
(what a pruner sees), :mod:`.protocol` (what the engine calls on a pruner), :mod:`.segment`
(decoder layers run on given hidden states).

Hard mode gathers the kept tokens (they keep their RoPE position ids unless the pruner re-packs
them; later layers get matching RoPE tables, masks and shorter KV caches); soft mode multiplies
keep-probabilities into an additive log-mask on the keys of later layers (DynamicViT), so gradients
reach a predictor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .families import adapter_for
from .hooks import Capture, Hooks
from .loop import CacheLayout
from .masks import mask_kind
from .protocol import PrunerProtocol
from .sites import observer_table, parse_site, site_table

MODES = ("hard", "soft")

__all__ = ["Engine", "MODES", "parse_site"]


class Engine:
    """Install ``pruners`` on ``model`` for the duration of a ``with`` block.

    ``mode="hard"`` removes tokens (inference); ``mode="soft"`` keeps them and masks keys with
    log keep-probabilities (training). After a prefill, ``kept_tokens`` maps each site to the
    per-sample count of visual tokens it let through, ``output_index`` (B, L') maps rows of the
    output back to input positions and ``output_valid`` (B, L') marks real (non-padding) rows; the
    hidden states and attentions a forward returns (``output_hidden_states`` / ``output_attentions``)
    hold the same rows (:mod:`.outputs`).

    Several pruners at one site act in the order given, each on the visual tokens the previous one
    left (soft mode: keep-probabilities multiply); a ratio ``keep`` still refers to the original
    count, and ``kept_tokens[site]`` is the count after the last of them. One pruner object may
    appear only once (a learned head keeps the state of its last forward).
    """

    def __init__(self, model: nn.Module, pruners: list[Any], mode: str = "hard", soft_eps: float = 1e-6) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.adapter = adapter_for(model)
        self.model = model
        self.pruners = list(pruners)
        self.mode = mode
        self.soft_eps = soft_eps
        for p in self.pruners:
            if not isinstance(p, PrunerProtocol):
                raise TypeError(f"{type(p).__name__} is not a pruner: derive it from learned_prune.pruners.base.PrunerBase "
                                "(sites/prepare/select, with no-op defaults for the rest)")
        protocol: list[PrunerProtocol] = list(self.pruners)
        if len({id(p) for p in protocol}) != len(protocol):
            raise ValueError(
                "the same pruner object is listed twice: a pruner (a learned head in particular) keeps the state of "
                "its last forward, so two places cannot share it. Build a second one (load_pruner(...) again, or "
                "copy.deepcopy(pruner)) to apply the same method twice."
            )
        for p in protocol:
            self.adapter.check_needs(p)  # a family without the signal it reads: refused by name
            p.prepare(self.adapter)
        self._protocol = protocol
        self.sites = site_table(protocol, self.adapter)  # layer -> [(pruner, site)]
        self.observers = observer_table(protocol, self.adapter)  # layer -> pruners watching it run
        self.capture = Capture()
        self.cache_layout: CacheLayout | None = None
        self.kept_tokens: dict[str, torch.Tensor] = {}
        self.output_index: torch.Tensor | None = None
        self.output_valid: torch.Tensor | None = None
        self._hooks = Hooks(self)

    def __enter__(self) -> "Engine":
        mask_kind(self.adapter.lm.config._attn_implementation, self.mode)  # refuse an attention the engine cannot mask
        self._hooks.install()
        try:
            for p in self._protocol:  # e.g. a head's LoRA adapters, removed again on exit
                p.attach(self.adapter)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in self._protocol:
            p.release(self.adapter)
        self._hooks.remove()
        self.cache_layout = None
