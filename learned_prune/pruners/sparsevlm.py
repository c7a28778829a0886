"""SparseVLM: text-guided visual-token sparsification with recycling (Zhang et al., ICML 2025, arXiv 2410.04417).

"SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference";
code Gumpest/SparseVLMs (v1.5 schedule in ``score.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.state import PruneState, Selection
from .base import Pruner
from .schedule import scale_layers, stage_counts

# v1.5 per-stage counts of 576 for the "192 / 128 / 64 average tokens" settings (layers 2/6/15)
SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}


def dpc_knn_merge(x: torch.Tensor, n_clusters: int, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of ``x`` (n, D) with DPC-kNN and mean-pool each cluster.

    Density = exp(-mean squared distance to the k nearest neighbours); distance indicator = distance
    to the nearest denser point; the ``n_clusters`` points with the largest density x indicator are
    centres; every point joins its nearest centre. Returns (merged (c, D), centre indices (c,)).
    """
    n = x.shape[0]
    if n <= n_clusters:
        return x, torch.arange(n, device=x.device)
    d = torch.cdist(x.float(), x.float()) / max(x.shape[-1], 1) ** 0.5
    knn = d.topk(min(k + 1, n), largest=False).values[:, 1:]
    density = torch.exp(-(knn**2).mean(1)) + torch.rand(n, generator=torch.Generator().manual_seed(0)) * 1e-6
    denser = density[None, :] > density[:, None]
    delta = torch.where(denser, d, torch.full_like(d, float("inf"))).amin(1)
    delta = torch.where(torch.isinf(delta), d.max(), delta)
    centres = (density * delta).topk(n_clusters).indices
    assign = d[:, centres].argmin(1)
    assign[centres] = torch.arange(n_clusters)
    merged = torch.zeros(n_clusters, x.shape[-1], dtype=x.dtype, device=x.device)
    merged.index_add_(0, assign, x)
    merged = merged / torch.bincount(assign, minlength=n_clusters).clamp_min(1)[:, None].to(x.dtype)
    return merged, centres


@dataclass
class SparseVLM(Pruner):
    """At layers 2/6/15 (scaled by depth) keep the visual tokens most attended by text *raters*, and
    recycle the best deleted ones into merged tokens.

    As the official code: raters are the instruction tokens whose mean relevance to the visual tokens,
    ``softmax(V T^T, over text).mean(over visual)``, is above average; a visual token's score is the
    head- and rater-mean attention it receives at layer K-1. Of the tokens deleted at a stage, the top
    ``recycle`` (30%) by score are clustered with DPC-kNN into ``n // 10 + 1`` merged tokens. Stage
    counts follow the v1.5 schedule of the nearest preset, scaled so that ``keep`` tokens reach the
    layers after the last stage (the project's budget rule); recycled tokens count in the budget.
    Original RoPE positions are kept (v2.0). Departures: only the rater rows of attention are
    computed (the official SDPA path materialises full attention matrices, +23% peak memory); merged
    tokens sit in the slot of their cluster centre.
    """

    layers: tuple[int, ...] = (2, 6, 15)
    recycle: float = 0.3

    def _layers(self, adapter) -> list[int]:
        return scale_layers(adapter.num_layers, self.layers)

    def sites(self, adapter) -> list[str]:
        return [f"llm:{k}" for k in self._layers(adapter)]

    def prepare(self, adapter) -> None:
        self._layers(adapter)
        if not 0 <= self.recycle < 1:
            raise ValueError(f"SparseVLM recycle={self.recycle}: must lie in [0, 1)")

    def _shape(self, n_visual: torch.Tensor) -> tuple[int, ...]:
        ratio = float(resolve_ratio(self.keep, n_visual))
        preset = min(SCHEDULES, key=lambda p: abs(SCHEDULES[p][-1] / 576 - ratio))
        return SCHEDULES[preset]

    def raters(self, state: PruneState) -> torch.Tensor:
        """(B, L) bool: instruction tokens whose relevance to the visual tokens is above average."""
        text = state.instruction_mask
        h = state.hidden.float()
        vis = state.visual_hidden.float()
        logits = vis @ h.transpose(1, 2) / h.shape[-1] ** 0.5  # (B, Nv, L)
        logits = logits.masked_fill(~text[:, None, :], float("-inf"))
        rel = logits.softmax(-1).nan_to_num(0)
        rel = (rel * state.visual_valid[..., None]).sum(1) / state.visual_valid.sum(1, keepdim=True).clamp_min(1)
        mean = rel.sum(1, keepdim=True) / text.sum(1, keepdim=True).clamp_min(1)
        chosen = text & (rel > mean)
        return torch.where(chosen.any(1, keepdim=True), chosen, text)

    def select(self, state: PruneState) -> Selection:
        adapter = state.engine.adapter
        layers = self._layers(adapter)
        stage = layers.index(state.layer)
        counts = stage_counts(self.keep, state.n_visual_original, self._shape(state.n_visual_original))
        k = counts[stage].clamp(max=state.n_visual)
        score = state.attention(self.raters(state), layer="previous").float()
        score = score.masked_fill(~state.visual_valid, float("-inf"))
        B = score.shape[0]
        hidden = state.visual_hidden
        kmax = int(k.max())
        index = torch.full((B, kmax), -1, dtype=torch.long, device=score.device)
        values = hidden.new_zeros(B, kmax, hidden.shape[-1])
        for b in range(B):
            n, kb = int(state.n_visual[b]), int(k[b])
            order = score[b, :n].argsort(descending=True)
            deleted = order[kb:]
            n_rec = int(self.recycle * deleted.numel()) if self.recycle > 0 else 0
            n_merge = min(n_rec // 10 + 1, kb - 1) if n_rec > 0 else 0
            keep = order[: kb - n_merge]
            slots, vals = [keep], [hidden[b, keep]]
            if n_merge > 0:
                pool = deleted[:n_rec]
                merged, centres = dpc_knn_merge(hidden[b, pool], n_merge)
                slots.append(pool[centres])
                vals.append(merged)
            s, v = torch.cat(slots), torch.cat(vals)
            index[b, : s.numel()], values[b, : s.numel()] = s, v
        return Selection(indices=index, values=values)


def resolve_ratio(keep: int | float, n_visual: torch.Tensor) -> float:
    return keep if isinstance(keep, float) else keep / max(int(n_visual.max()), 1)
