"""ATP: adaptive token pruning with instance-wise learned thresholds (Ye et al., CVPR 2025, arXiv 2412.00447).

"ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models". No official code is public;
this follows the paper's description (its Section 3).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..engine.state import PruneState, Selection
from .indices import mask_indices
from .learned import LearnedHead
from .stages import fractional_layers


class ATPStage(nn.Module):
    """One ATP module (the paper's name) at one site: predicts a redundancy threshold and a spatial threshold for this instance."""

    def __init__(self, hidden_size: int, width: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(2 * hidden_size)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden_size + 2, width), nn.GELU(), nn.Linear(width, 2))
        self.fuse = nn.Parameter(torch.zeros(()))  # weight of the self score vs the cross score
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.constant_(self.mlp[-1].bias, 0.0)

    def forward(self, instr: torch.Tensor, vis: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.norm(torch.cat([instr, vis], -1)), stats], -1))


class ATPHead(LearnedHead):
    """ATP modules between decoder layers; a visual token survives if either branch keeps it.

    At each site (default: 1/8 and 7/16 of the depth — layers 4 and 14 of a 32-layer LLM, where
    the paper's visualisations show heavy pruning; the paper does not fix the layers):

    * **redundancy branch**: score = fusion of a *self* score (mean attention a visual token
      receives from the visual tokens) and a *cross* score (mean attention from the instruction
      tokens), both from layer K-1's q/k and scaled by the visual-token count so that uniform
      attention scores 1; the fusion weight is learned;
    * **spatial branch**: uniform grid sampling (every ``stride``-th row and column scores 1,
      others 0), keeping coarse coverage of the image;
    * each branch has a threshold predicted per instance by a small MLP from the mean instruction
      and visual hidden states (plus the mean and spread of the redundancy score).

    Training (soft mode): keep-probability ``max(sigmoid((s_red - t_red) * T), sigmoid((s_sp - t_sp) * T))``,
    cumulative over sites through the engine. Inference (hard mode): ``(s_red > t_red) | (s_sp > t_sp)``,
    so the kept count varies per instance. Budget loss: ``|mean kept fraction at the last site -
    target|`` plus ``layer_cost`` times the mean kept fraction of every site (the paper's budget
    penalty plus per-layer cost; its exact weights are not published).
    """

    method = "atp"
    display_name = "ATP"
    sized_for_llm = True
    adaptive = True

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        layers: list[int] | None = None,
        target: float = 0.2,
        temperature: float = 10.0,
        stride: int = 4,
        width: int = 64,
        layer_cost: float = 0.05,
    ) -> None:
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.layers = list(layers) if layers else fractional_layers(num_layers, (1 / 8, 7 / 16))
        if any(not 1 <= k < num_layers for k in self.layers):
            raise ValueError(f"ATP layers {self.layers}: need 1 <= layer < {num_layers}")
        if not 0 < target <= 1:
            raise ValueError(f"ATP target={target}: the kept fraction must lie in (0, 1]")
        self.target, self.temperature, self.stride, self.width = target, temperature, stride, width
        self.layer_cost = layer_cost
        self.modules_by_site = nn.ModuleDict({str(k): ATPStage(hidden_size, width) for k in self.layers})
        self._kept: dict[str, torch.Tensor] = {}

    def sites(self, adapter: Any) -> list[str]:
        return [f"llm:{k}" for k in self.layers]

    def spatial_score(self, state: PruneState) -> torch.Tensor:
        r, c = state.grid_coords.unbind(-1)  # (row, col) in the token's image grid (the family's layout)
        off = self.stride // 2
        return (((r - off) % self.stride == 0) & ((c - off) % self.stride == 0)).to(state.hidden.dtype)

    def scores(self, state: PruneState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(redundancy score, spatial score, thresholds) for the visual tokens at this site."""
        module = self.modules_by_site[str(state.layer)]
        valid = state.visual_valid
        n = valid.sum(1, keepdim=True).clamp_min(1).to(state.hidden.dtype)
        vis_mask = torch.zeros_like(state.valid)
        vis_mask.scatter_(1, state.visual_pos, valid)
        s_self = state.attention(vis_mask, layer="previous") * n
        s_cross = state.attention("instruction", layer="previous") * n
        w = torch.sigmoid(module.fuse)
        s_red = (w * s_self + (1 - w) * s_cross).masked_fill(~valid, 0)
        h = state.hidden.detach()
        instr = state.instruction_mask.unsqueeze(-1).to(h.dtype)
        prob = state.keep_prob
        vis_w = valid.unsqueeze(-1).to(h.dtype) * (prob.unsqueeze(-1).detach() if prob is not None else 1)
        instr_mean = (h * instr).sum(1) / instr.sum(1).clamp_min(1)
        vis_mean = (state.visual_hidden.detach() * vis_w).sum(1) / vis_w.sum(1).clamp_min(1e-6)
        r = s_red.detach()
        mean = (r * valid).sum(1) / n[:, 0]
        std = (((r - mean[:, None]) ** 2) * valid).sum(1).div(n[:, 0]).add(1e-6).sqrt()
        out = module(instr_mean.float(), vis_mean.float(), torch.stack([mean, std], -1).float())
        thresholds = torch.stack([1.0 + out[:, 0], torch.sigmoid(out[:, 1] + 2.0)], -1)  # start: above-mean + grid
        return s_red.float(), self.spatial_score(state).float(), thresholds

    def select(self, state: PruneState) -> Selection:
        s_red, s_sp, th = self.scores(state)
        valid = state.visual_valid
        T = self.temperature
        if state.mode == "soft":
            p = torch.maximum(torch.sigmoid((s_red - th[:, :1]) * T), torch.sigmoid((s_sp - th[:, 1:]) * T))
            p = p.masked_fill(~valid, 0)
            prev = state.keep_prob
            cum = p * prev if prev is not None else p
            self._kept[state.site] = (cum * valid).sum(1) / state.n_visual_original.clamp_min(1)
            return Selection(keep_prob=p)
        keep = ((s_red > th[:, :1]) | (s_sp > th[:, 1:])) & valid
        none_kept = ~keep.any(1)
        if bool(none_kept.any()):  # always keep at least the top redundancy token
            top = s_red.masked_fill(~valid, float("-inf")).argmax(1)
            keep[none_kept, top[none_kept]] = True
        self._kept[state.site] = keep.sum(1).float() / state.n_visual_original.clamp_min(1)
        return Selection(indices=mask_indices(keep))

    def budget_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self._kept:
            raise RuntimeError("budget_loss() needs a forward pass with the head installed")
        sites = [f"llm:{k}" for k in self.layers if f"llm:{k}" in self._kept]
        final = self._kept[sites[-1]].mean()
        loss = (final - self.target).abs() + self.layer_cost * sum(self._kept[s].mean() for s in sites)
        logs = {f"kept_frac/{s}": self._kept[s].mean().detach() for s in sites}
        logs["budget_error"] = (final - self.target).abs().detach()
        return loss, logs
