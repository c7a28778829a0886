"""LVPruning: language-guided visual token pruning (Sun et al., NAACL Findings 2025, arXiv 2501.13652).

"LVPruning: An Effective yet Simple Language-Guided Vision Token Pruning Approach for Multi-modal
Large Language Models". No official code is public; this follows the paper:

* after three LLM layers (the paper: 1, 8 and 16 of 32, i.e. early, a quarter and half of the
  depth; scaled by depth here) a *decision module* reads the hidden states: 2 cross-attention
  blocks (8 heads) with the visual tokens as queries and all text tokens as keys and values,
  ``O = softmax(QK^T/sqrt(d)) V + Q``, then an FFN ``[LN, Linear(C, 2C), SiLU, Linear(2C, C), LN]``,
  and a linear map to 2 logits (keep, drop) per visual token;
* training (soft mode): hard Gumbel-softmax decisions with straight-through gradients, applied as
  attention masks on the keys of later layers and cumulative across modules (the engine multiplies
  them); loss = LM loss + MSE between each module's mean cumulative keep fraction and its target
  ratio (paper: 0.5 / 0.3 / 0.1 of the original visual tokens);
* inference (hard mode): top-k of the keep-minus-drop logit per module, the tokens keeping their
  original position ids. The ratios can be changed at test time without retraining: ``keep`` sets
  the count after the last module, and earlier modules are shifted by the same amount, as the
  paper's ``[rho, rho - 0.2, rho - 0.4]`` schedules are.

Choices where the paper is silent: a LayerNorm on the module's queries and keys/values (LLM hidden
states carry large outlier channels); the FFN sits on a residual branch; the text keys are the
prompt's non-visual tokens (in a teacher-forced training pass the answer tokens are left out, so
training reads what inference reads); the ratio loss is taken per sample, then averaged, as in
DynamicViT; ``heads`` falls back to the largest divisor of the LLM width not above 8.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.state import PruneState, Selection
from .base import resolve_keep, topk_selection
from .learned import LearnedHead
from .stages import scale_layers

PAPER_LAYERS = (1, 8, 16)  # of a 32-layer LLM
PAPER_RATIOS = (0.5, 0.3, 0.1)


class CrossBlock(nn.Module):
    """Visual queries attend to the text tokens: ``O = Attn(Q, T, T) + Q``, then ``O + FFN(O)``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim),
                                 nn.LayerNorm(dim))

    def forward(self, q: torch.Tensor, text: torch.Tensor, text_pad: torch.Tensor) -> torch.Tensor:
        o = self.attn(q, text, text, key_padding_mask=text_pad, need_weights=False)[0] + q
        return o + self.ffn(o)


class DecisionModule(nn.Module):
    """Keep/drop logits (B, Nv, 2) for the visual tokens, given the text tokens."""

    def __init__(self, dim: int, heads: int, blocks: int = 2) -> None:
        super().__init__()
        self.norm_q, self.norm_t = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(CrossBlock(dim, heads) for _ in range(blocks))
        self.out = nn.Linear(dim, 2)
        nn.init.zeros_(self.out.weight)
        with torch.no_grad():  # start by keeping everything (keep logit above drop): training prunes from there
            self.out.bias.copy_(torch.tensor([2.0, 0.0]))

    def forward(self, visual: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
        q, t = self.norm_q(visual), self.norm_t(text)
        pad = ~text_valid
        pad = pad & pad.sum(1, keepdim=True).lt(pad.shape[1])  # a sample without text attends to padding rather than NaN
        for block in self.blocks:
            q = block(q, t, pad)
        return self.out(q)


def _heads_for(dim: int, want: int = 8) -> int:
    return max(h for h in range(1, want + 1) if dim % h == 0)


class LVPruningHead(LearnedHead):
    """Three cross-attention decision modules in the LLM; Gumbel masks in training, top-k at inference."""

    method = "lvpruning"
    display_name = "LVPruning"
    sized_for_llm = True

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        layers: list[int] | None = None,
        ratios: list[float] | None = None,
        heads: int | None = None,
        blocks: int = 2,
        tau: float = 1.0,
        keep: int | float | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.layers = list(layers) if layers else scale_layers(num_layers, PAPER_LAYERS)
        self.ratios = [float(r) for r in (ratios or PAPER_RATIOS)]
        if len(self.ratios) != len(self.layers):
            raise ValueError(f"LVPruning: {len(self.layers)} layers {self.layers} need as many ratios, got {self.ratios}")
        if any(not 1 <= k < num_layers for k in self.layers) or self.layers != sorted(set(self.layers)):
            raise ValueError(f"LVPruning layers {self.layers}: need increasing layers in [1, {num_layers})")
        if any(not 0 < r <= 1 for r in self.ratios) or self.ratios != sorted(self.ratios, reverse=True):
            raise ValueError(f"LVPruning ratios {self.ratios}: need non-increasing fractions in (0, 1]")
        self.heads = heads or _heads_for(hidden_size)
        if hidden_size % self.heads:
            raise ValueError(f"LVPruning heads={self.heads} must divide the LLM hidden size {hidden_size}")
        self.blocks, self.tau, self.keep = blocks, tau, keep
        self.modules_by_site = nn.ModuleDict({str(k): DecisionModule(hidden_size, self.heads, blocks)
                                              for k in self.layers})
        self._kept: dict[str, torch.Tensor] = {}

    # ---- pruner protocol -----------------------------------------------------------------
    def sites(self, adapter: Any) -> list[str]:
        return [f"llm:{k}" for k in self.layers]

    def logits(self, state: PruneState) -> torch.Tensor:
        """(B, Nv, 2) keep/drop logits of the decision module at this site."""
        text_valid = state.prompt_valid & ~state.is_visual
        module = self.modules_by_site[str(state.layer)]
        with torch.autocast(state.hidden.device.type, enabled=False):
            return module(state.visual_hidden.float(), state.hidden.float(), text_valid)

    def stage_ratios(self) -> list[float]:
        """Target kept fractions per module: the training ratios, shifted so the last equals ``keep``
        when ``keep`` is a ratio (counts are handled per sample in :meth:`select`)."""
        if self.keep is None or not isinstance(self.keep, float):
            return self.ratios
        shift = self.keep - self.ratios[-1]
        return [min(1.0, r + shift) for r in self.ratios]

    def select(self, state: PruneState) -> Selection:
        logits = self.logits(state)
        valid = state.visual_valid
        stage = self.layers.index(state.layer)
        n0 = state.n_visual_original
        if state.mode == "soft":
            if self.training:
                d = F.gumbel_softmax(logits, tau=self.tau, hard=True, dim=-1)[..., 0]
            else:  # deterministic soft pass (e.g. validation in soft mode): the argmax decision
                d = (logits[..., 0] > logits[..., 1]).to(logits.dtype)
            d = d.masked_fill(~valid, 0)
            prev = state.keep_prob
            cum = d * prev.float() if prev is not None else d
            self._kept[state.site] = (cum * valid).sum(1) / n0.clamp_min(1)
            return Selection(keep_prob=d)
        # hard: top-k by the keep-minus-drop logit
        if self.keep is not None and not isinstance(self.keep, float):  # a count: shift by counts
            last = resolve_keep(self.keep, n0)
            k = last + (n0.double() * (self.ratios[stage] - self.ratios[-1])).round().long()
        else:
            k = (n0.double() * self.stage_ratios()[stage]).round().long()
        k = k.clamp(min=1).minimum(state.n_visual)
        self._kept[state.site] = k.float() / n0.clamp_min(1)
        return Selection(indices=topk_selection(logits[..., 0] - logits[..., 1], valid, k))

    def budget_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean over modules of the per-sample squared error between kept fraction and target ratio."""
        if not self._kept:
            raise RuntimeError("budget_loss() needs a forward pass with the head installed")
        losses, logs = [], {}
        for k, ratio in zip(self.layers, self.ratios):
            site = f"llm:{k}"
            if site not in self._kept:
                continue
            frac = self._kept[site]
            losses.append(((frac - ratio) ** 2).mean())
            logs[f"kept_frac/{site}"] = frac.mean().detach()
        last = self._kept.get(f"llm:{self.layers[-1]}")
        if last is not None:
            logs["budget_error"] = (last.mean() - self.ratios[-1]).abs().detach()
        return torch.stack(losses).mean(), logs
