"""SparseVLM: text-guided visual-token sparsification with recycling (Zhang et al., ICML 2025, arXiv 2410.04417).

"SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference"; code
Gumpest/SparseVLMs, main branch with its default ``USE_VERSION=1_0`` (the same selection as its
``v1.5`` branch): ``LlamaDynamicvitModel.forward`` in ``modelling_sparse_llama.py``, the schedule
and top-k in ``score.py``, DPC-kNN in ``utils.cluster_and_merge``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine.state import LayerTrace, PruneState, Selection
from .base import Pruner, resolve_keep
from .indices import pad_rows
from .stages import scale_layers

_KEY = "sparsevlm_raters"
# score.py (USE_VERSION=1_0): top-k counts at layers 2/6/15 of 576 visual tokens, per RETAIN_TOKN preset
PRESETS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}


def pool_size(n_deleted: int, recycle: float) -> int:
    """Deleted tokens recycled at a stage: the top ``int(recycle * n_deleted) + 1`` by score."""
    return int(n_deleted * recycle) + 1 if recycle > 0 and n_deleted > 0 else 0


def n_clusters(n_pool: int) -> int:
    """Merged tokens made from a recycling pool of ``n_pool``: ``int(n_pool / 10) + 1``."""
    return int(n_pool / 10) + 1 if n_pool > 0 else 0


def after_stage(n: int, k: int, recycle: float) -> int:
    """Visual tokens leaving a stage that keeps ``k`` of ``n``: the kept ones plus the merged ones."""
    return k + n_clusters(pool_size(n - k, recycle))


def preset_final(schedule: tuple[int, ...], recycle: float = 0.3, n: int = 576) -> int:
    """Visual tokens that reach the layers after the last stage when ``schedule`` runs on ``n`` tokens."""
    for k in schedule:
        n = after_stage(n, min(k, n - 1), recycle)
    return n


def dpc_knn_merge(x: torch.Tensor, n_clusters: int, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of ``x`` (n, D) with DPC-kNN and mean-pool each cluster.

    Distances are Euclidean / sqrt(D); density = exp(-mean squared distance to the ``k`` nearest
    rows, the row itself included; ``k`` defaults to ``n_clusters``); distance indicator = distance to
    the nearest denser row (the largest distance for the densest); the ``n_clusters`` rows with the
    largest density x indicator are the centres, in that order; every row joins its nearest centre and
    a cluster's token is its members' sum / (count + 1e-6). Returns (merged (c, D), centres (c,)).
    """
    n, c = x.shape[0], n_clusters
    xf = x.float()
    d = torch.cdist(xf[None], xf[None])[0] / x.shape[-1] ** 0.5
    knn = d.topk(min(k or c, n), dim=-1, largest=False).values
    density = torch.exp(-(knn**2).mean(-1))
    denser = density[None, :] > density[:, None]  # [i, j]: row j is denser than row i
    delta = torch.where(denser, d, d.max()).amin(-1)
    centres = (delta * density).topk(c).indices
    assign = d[centres].argmin(0)
    assign[centres] = torch.arange(c, device=x.device)
    merged = torch.zeros(c, x.shape[-1], device=x.device).index_add_(0, assign, xf)
    count = torch.zeros(c, device=x.device).index_add_(0, assign, torch.ones(n, device=x.device))
    return (merged / (count[:, None] + 1e-6)).to(x.dtype), centres


@dataclass
class SparseVLM(Pruner):
    """Progressive pruning by the attention of text *raters*, with the best deleted tokens recycled.

    Raters are chosen once, from the input embeddings: with V the visual and T the text embeddings
    after the image (the prompt's tail, template included), ``m = softmax(V T^T over text).mean(over
    visual)``, unscaled; the text tokens with ``m`` above its mean over the text are raters. At each
    official layer l of ``layers`` (2/6/15 of 32) a visual token's score is layer l's own softmax
    attention from the raters, averaged over heads and raters; the top ``k`` visual tokens stay, and of
    the deleted ones the top ``int(0.3 d) + 1`` by score (``recycle``) are clustered with DPC-kNN
    (:func:`dpc_knn_merge`) into ``int(pool / 10) + 1`` tokens, placed after the kept visual tokens.
    Layer l's output is pruned, so the engine site is ``llm:l+1`` (with ``layer="previous"``):
    ``llm:3/7/16`` on any LLM deeper than 16 layers. Positions are re-packed
    (``repack_positions=True``), as in this code version (v2.0 keeps them and turns merging off).
    Merged tokens are ordinary visual tokens at later stages.

    Counts: ``score.py`` gives a preset's top-k counts (192: 300/200/110, 128: 303/110/36, 96:
    238/48/26, 64: 66/30/17), each capped at ``n - 1``; merged tokens come on top, so on 576 tokens the
    presets leave 113/39/27/18 visual tokens after the last stage. Under the project's budget rule
    (``keep`` = visual tokens reaching the layers after the last stage) the preset is the one whose
    final fraction is nearest to ``keep / n`` (or ``preset``); earlier stages keep its counts times
    ``keep / final``; the last stage keeps the largest ``k`` whose kept + merged tokens do not exceed
    ``keep`` (exactly ``keep`` whenever it is reachable). At ``keep`` = a preset's final count on 576
    tokens every stage equals the official one.

    Departures: rater rows of attention are rebuilt from q/k (SDPA stays on; the official code
    materialises full attention matrices); arithmetic in float32; DPC-kNN density has no random
    1e-6 noise (ties: neither row is denser); samples of a batch are handled one by one (the
    official code assumes one). A stage whose count reaches all current tokens keeps them all instead
    of ``n - 1`` (so that ``keep=1.0`` is the unpruned model, an engine invariant). Where the official
    code has no answer: LLMs of at most 16 layers get the sites ``l + 1`` scaled by depth (4 layers:
    ``llm:1/2/3``; 8: ``llm:1/2/4``); no rater above the mean (all text tokens rate); no text after the
    image (the last token rates); a budget below the merged tokens of an all-deleting last stage keeps
    ``keep - 1`` tokens and one cluster; LLaVA-NeXT (the official code assumes LLaVA-1.5's 576 tokens):
    every image token, row-end newlines included, is a visual token.
    """

    layers: tuple[int, ...] = (2, 6, 15)
    recycle: float = 0.3
    preset: int | None = None
    repack_positions: bool | None = field(default=True, kw_only=True)

    def _layers(self, depth: int) -> list[int]:
        """The site layers (official layer + 1), scaled when the LLM is not deeper than the last."""
        sites = [l + 1 for l in self.layers]
        return sites if max(sites) < depth else scale_layers(depth, sites)

    def sites(self, adapter) -> list[str]:
        return [f"llm:{k}" for k in self._layers(adapter.num_layers)]

    def observe_layers(self, adapter) -> list[int]:
        return [0]

    def prepare(self, adapter) -> None:
        if len(self.layers) != 3:
            raise ValueError(f"SparseVLM layers={self.layers}: the schedule has 3 stages")
        self._layers(adapter.num_layers)
        if not 0 <= self.recycle < 1:
            raise ValueError(f"SparseVLM recycle={self.recycle}: must lie in [0, 1)")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"SparseVLM preset={self.preset}: choose one of {sorted(PRESETS)}")

    def observe(self, layer: int, trace: LayerTrace, state: PruneState) -> None:
        """Layer 0: choose the raters from the embeddings (``trace.h_in``) and keep them in ``state.extras``."""
        text = state.instruction_mask
        vpos, vvalid = state.visual_pos, state.visual_valid
        h = trace.h_in.float()
        v = torch.gather(h, 1, vpos[..., None].expand(*vpos.shape, h.shape[-1]))
        logits = v @ h.transpose(1, 2)  # (B, Nv, L), unscaled
        rel = logits.masked_fill(~text[:, None], float("-inf")).softmax(-1).nan_to_num(0)
        rel = (rel * vvalid[..., None]).sum(1) / vvalid.sum(1, keepdim=True).clamp_min(1)
        mean = rel.sum(1, keepdim=True) / text.sum(1, keepdim=True).clamp_min(1)
        raters = text & (rel > mean)
        state.extras[_KEY] = torch.where(raters.any(1, keepdim=True), raters, text)

    def raters(self, state: PruneState) -> torch.Tensor:
        """(B, L) bool: the rater tokens in the current sequence (chosen at layer 0)."""
        if _KEY not in state.extras:
            raise RuntimeError("SparseVLM raters are chosen while layer 0 runs; run the model inside the pruner")
        return state.extras[_KEY] & state.valid

    def stage_counts(self, keep: int, n_orig: int, n: int, stage: int) -> tuple[int, int]:
        """(top-k count, merged-token cap) of one sample at ``stage`` with ``n`` current visual tokens."""
        if self.preset is not None:
            schedule = PRESETS[self.preset]
        else:
            schedule = min(PRESETS.values(), key=lambda s: abs(preset_final(s, self.recycle) / 576 - keep / n_orig))
        if stage < len(schedule) - 1:
            k = max(1, round(schedule[stage] * keep / preset_final(schedule, self.recycle)))
            return (n, 0) if k >= n else (k, n)
        if keep >= n:
            return n, 0
        for k in range(min(keep, n - 1), -1, -1):
            if after_stage(n, k, self.recycle) <= keep:
                return k, n
        return keep - 1, 1

    def select(self, state: PruneState) -> Selection:
        stage = self._layers(state.llm_depth).index(state.layer)
        keep = resolve_keep(self.keep, state.n_visual_original)
        queries = self.raters(state)
        if not bool(queries.any(1).all()):  # no text after the image: the last prompt token rates
            idx = torch.arange(queries.shape[1], device=queries.device).expand_as(queries)
            last = idx == torch.where(state.prompt_valid, idx, -1).amax(1, keepdim=True)
            queries = torch.where(queries.any(1, keepdim=True), queries, last)
        score = state.attention(queries, layer="previous").float()
        hidden = state.visual_hidden
        slots, values = [], []
        for b in range(score.shape[0]):
            n = int(state.n_visual[b])
            k, cap = self.stage_counts(int(keep[b]), int(state.n_visual_original[b]), n, stage)
            if k >= n:
                slots.append(torch.arange(n, device=score.device))
                values.append(hidden[b, :n])
                continue
            s = score[b, :n]
            kept = s.topk(k).indices.sort().values
            deleted = torch.ones(n, dtype=torch.bool, device=s.device)
            deleted[kept] = False
            deleted = deleted.nonzero()[:, 0]
            pool = deleted[s[deleted].topk(pool_size(deleted.numel(), self.recycle)).indices]
            c = min(n_clusters(pool.numel()), cap)
            parts = [hidden[b, kept]]
            if c > 0:
                parts.append(dpc_knn_merge(hidden[b, pool], c)[0])
            # merged tokens go after the kept ones: they take the c last slots of the kept + free ones
            slot = torch.cat([kept, deleted[deleted.numel() - c :]]).sort().values
            slots.append(slot)
            values.append(torch.cat(parts))
        return Selection(indices=pad_rows(slots), values=pad_rows(values, fill=0))
