"""DyVTE: dynamic visual-token exit (Wu et al., NeurIPS 2025, arXiv 2411.19628; code DoubtedSteam/DyVTE).

"Accelerating Multimodal Large Language Models via Dynamic Visual-Token Exit and the Empirical
Findings". One small router per decoder layer decides, from the text tokens' states, whether the
visual tokens are still needed; at inference the first layer whose router says *exit* removes all
visual tokens for the rest of the LLM (one exit per sample).

From the official code (read, not compared by a test): a router is ``Linear(2C, width) -> GELU -> Linear(width, 2)`` (no biases)
over ``[mean of the instruction tokens' states (after the image, without the last token), the last
prompt token's state]``; exit when the exit logit beats the stay logit (``threshold=0.5`` on the
softmax); routers are trained as classifiers on labels the frozen model makes itself
(:class:`~learned_prune.modules.dyvte.DyVTEModule`). Departures: a router sits at every site
``llm:1 .. llm:L-1`` (the official code also evaluates one after the last layer, where an exit
saves nothing); ``width`` defaults to 2C rather than a fixed 2048, which would dwarf a small LLM;
the batch need not be one sample (each sample exits on its own); ``min_layer`` can forbid early
exits; ``threshold`` may be one value per router (an early exit saves more and costs more, so the
trade-off need not be the same at every layer; the shipped head's values are chosen on
validation). :class:`VisualExit` (all visual tokens removed from a fixed layer on) makes the
training labels and is a baseline of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.state import PruneState, Selection
from .base import PrunerBase
from .learned import LearnedHead


def router_features(hidden: torch.Tensor, instruction: torch.Tensor, prompt_valid: torch.Tensor) -> torch.Tensor:
    """``[mean of the instruction states without the last prompt token, the last prompt token's state]``, (B, 2D).

    ``instruction`` (B, L) marks the prompt's text after the image; ``prompt_valid`` (B, L) the
    prompt's tokens (the last True is the token that predicts the answer).
    """
    L = hidden.shape[1]
    idx = torch.arange(L, device=hidden.device).expand(hidden.shape[0], L)
    last = torch.where(prompt_valid, idx, -1).amax(1)
    instr = instruction & (idx != last[:, None])
    w = instr.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * w).sum(1) / w.sum(1).clamp_min(1)
    last_state = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.clamp_min(0)]
    return torch.cat([mean, last_state], -1)


class Router(nn.Module):
    """Exit/stay logits (B, 2) from router features (B, 2C): ``w2(GELU(w1(x)))``, no biases."""

    def __init__(self, hidden_size: int, width: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(2 * hidden_size, width, bias=False)
        self.w2 = nn.Linear(width, 2, bias=False)
        nn.init.xavier_uniform_(self.w1.weight)
        nn.init.xavier_uniform_(self.w2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.gelu(self.w1(x)))


def _check_threshold(threshold: float | Sequence[float], num_layers: int) -> float | list[float]:
    """One exit-probability threshold for every router (a float) or one per site ``llm:1 .. llm:L-1`` (a list)."""
    if isinstance(threshold, (int, float)):
        values, out = [float(threshold)], float(threshold)
    else:
        values = out = [float(t) for t in threshold]
        if len(values) != num_layers - 1:
            raise ValueError(f"DyVTE threshold={values}: give one float for every router (e.g. 0.5), or one per router "
                             f"site llm:1..llm:{num_layers - 1} ({num_layers - 1} values), got {len(values)}")
    bad = [t for t in values if not 0 < t < 1]
    if bad:
        raise ValueError(f"DyVTE threshold={threshold}: exit probability thresholds must lie in (0, 1), got {bad}")
    return out


def _drop_visual(state: PruneState, drop: torch.Tensor) -> Selection:
    """Keep every visual token of the samples where ``drop`` (B,) is False and none where it is True."""
    valid = state.visual_valid
    idx = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    keep = valid & ~drop[:, None]
    if state.mode == "soft":
        return Selection(keep_prob=keep.to(state.hidden.dtype))
    return Selection(indices=torch.where(keep, idx, -1))


class DyVTEHead(LearnedHead):
    """One router per decoder layer; the first that says *exit* removes all visual tokens from there on."""

    method = "dyvte"
    display_name = "DyVTE"
    sized_for_llm = True
    adaptive = True  # the exit layer, hence the compute, varies per instance

    def __init__(self, hidden_size: int, num_layers: int, width: int | None = None,
                 threshold: float | Sequence[float] = 0.5, min_layer: int = 1) -> None:
        super().__init__()
        if not 1 <= min_layer < num_layers:
            raise ValueError(f"DyVTE min_layer={min_layer}: needs 1 <= min_layer < {num_layers}")
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.width = width or 2 * hidden_size
        self.threshold, self.min_layer = _check_threshold(threshold, num_layers), min_layer
        self.routers = nn.ModuleDict({str(k): Router(hidden_size, self.width) for k in range(1, num_layers)})
        self.exit_layer: torch.Tensor | None = None  # (B,) of the last forward; num_layers = no exit

    def sites(self, adapter: Any) -> list[str]:
        return [f"llm:{k}" for k in range(self.min_layer, self.num_layers)]

    def layer_threshold(self, layer: int) -> float:
        """The exit-probability threshold of the router at site ``llm:layer``."""
        return self.threshold if isinstance(self.threshold, float) else self.threshold[layer - 1]

    def exit_logits(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """(B, 2) stay/exit logits of the router at site ``llm:layer``."""
        with torch.autocast(features.device.type, enabled=False):
            return self.routers[str(layer)](features.float())

    def select(self, state: PruneState) -> Selection:
        if state.layer == self.min_layer or self.exit_layer is None or len(self.exit_layer) != len(state.valid):
            self.exit_layer = torch.full((len(state.valid),), self.num_layers, device=state.valid.device)
        feats = router_features(state.hidden.detach(), state.instruction_mask, state.prompt_valid)
        p_exit = self.exit_logits(state.layer, feats).softmax(-1)[:, 1]
        has_visual = state.n_visual > 0
        exit_now = (p_exit > self.layer_threshold(state.layer)) & has_visual
        self.exit_layer = torch.where(exit_now, torch.full_like(self.exit_layer, state.layer), self.exit_layer)
        return _drop_visual(state, exit_now)

    def budget_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DyVTE has no budget term (its routers are classifiers); returns 0 and the exit statistics."""
        zero = self.routers[str(self.min_layer)].w2.weight.new_zeros(())
        if self.exit_layer is None:
            return zero, {}
        e = self.exit_layer.float()
        logs = {"exit_layer_mean": e.mean(), "exit_rate": (e < self.num_layers).float().mean()}
        for k in range(self.min_layer, self.num_layers):
            logs[f"exit_frac/llm:{k}"] = (e == k).float().mean()
        return zero, logs


@dataclass
class VisualExit(PrunerBase):
    """Remove every visual token from LLM layer ``layer`` on (DyVTE's exit at a fixed layer).

    DyVTE's training labels compare the frozen model with and without this exit; on its own it is
    the non-adaptive baseline a learned exit has to beat.
    """

    layer: int = 4
    repack_positions: bool = False

    def sites(self, adapter: Any) -> list[str]:
        return [f"llm:{self.layer}"]

    def prepare(self, adapter: Any) -> None:
        if not 1 <= self.layer < adapter.num_layers:
            raise ValueError(f"VisualExit layer={self.layer}: needs 1 <= layer < {adapter.num_layers}")

    def select(self, state: PruneState) -> Selection:
        return _drop_visual(state, torch.ones(len(state.visual_valid), dtype=torch.bool, device=state.visual_valid.device))
