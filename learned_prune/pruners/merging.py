"""Bipartite soft matching (ToMe, Bolya et al., ICLR 2023, arXiv 2210.09461), for merging pruners.

One step is ToMe's ``bipartite_soft_matching`` (facebookresearch/ToMe, ``tome/merge.py``) without
a protected class token: the tokens alternate into sets A (even positions) and B (odd), each A token
proposes its most similar B token (cosine of the metric; the first on ties), the ``r`` best edges
(a stable descending sort) merge, and the output is ``[unmerged A tokens in edge-rank order, all B
tokens in order]``, so the next step's A/B split is taken on that order. Merging is ToMe's
``merge_wavg`` (``mode="wavg"``: size-weighted averages, sizes carried across steps) or AIM's
``scatter_reduce(..., reduce="mean")`` (``mode="mean"``: a plain mean of the B token and the A
tokens merged into it this step, whatever they merged before; LaVi-Lab/AIM
``llava/model/token_merge.py``).

Vectorised over the batch: :func:`merge_to_batched` merges (B, N, D) tokens with per-sample valid
lengths ``n`` and targets, a fixed handful of kernels per step whatever B (a ``bmm`` of the A/B
scores, a row ``max``, a stable ``argsort``, one gather into the next step's order and one
``index_add_`` of the merged tokens). Padded entries (beyond a sample's ``n``) never score or
merge and come back as source -1 with zero values. :class:`MergingPruner` is the base of the pre-LLM
merging pruners (ToMe, AIM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.state import PruneState, Selection
from .base import Pruner, resolve_keep

MODES = ("wavg", "mean")


def _merge_step(x, metric, size, source, n, r, mode, counts=None):
    """One batched step on tokens ``x`` (B, N, D) with valid lengths ``n`` (B,): sample b merges
    ``r[b]`` (at most ``n[b] // 2``) of its A tokens into B tokens. ``metric`` (B, N, Dm) or None
    (match on ``x``) is merged alongside. ``size`` (B, N) float: tokens each row stands for
    (``"wavg"``). ``source`` (B, N): the original index of each row's B-most token. ``counts``:
    ``(max(n - r), max(r))`` when the caller knows them (no device syncs).
    Returns ``(x, metric, size, source, n)`` in the step's output order."""
    B, N = x.shape[:2]
    dev = x.device
    NA, NB = (N + 1) // 2, N // 2
    m = F.normalize((x if metric is None else metric).float(), dim=-1)
    scores = torch.bmm(m[:, 0::2], m[:, 1::2].transpose(1, 2))  # (B, NA, NB)
    valid_a = torch.arange(NA, device=dev) * 2 < n[:, None]
    valid_b = torch.arange(NB, device=dev) * 2 + 1 < n[:, None]
    scores.masked_fill_(~valid_b[:, None, :], float("-inf"))
    best, dst = scores.max(-1)  # each A token's most similar B token (the first on ties)
    best.masked_fill_(~valid_a, float("-inf"))
    edge = best.argsort(dim=-1, descending=True, stable=True)  # (B, NA) A indices, best edge first

    # the new order: the unmerged A tokens in edge-rank order, then every B token
    n_a, n_b = (n + 1) // 2, n // 2
    unm = n_a - r
    Nn, rmax = counts if counts is not None else (int((n - r).max()), int(r.max()))
    j = torch.arange(Nn, device=dev)[None]
    is_unm, is_b = j < unm[:, None], (j >= unm[:, None]) & (j < (unm + n_b)[:, None])
    a_pos = edge.gather(1, (r[:, None] + j).clamp(max=NA - 1))
    old = torch.where(is_unm, 2 * a_pos, torch.where(is_b, 2 * (j - unm[:, None]) + 1, 0))  # (B, Nn)
    idle = (r == 0)[:, None]  # a sample that merges nothing keeps its order (ToMe returns early)
    old = torch.where(idle, j.clamp(max=N - 1), old)
    is_unm = torch.where(idle, j < n[:, None], is_unm)

    # merged A tokens (the r best edges) and the new row of their B token
    src_a = edge[:, :rmax]
    take = torch.arange(rmax, device=dev)[None] < r[:, None]
    src = (2 * src_a + torch.arange(0, B * N, N, device=dev)[:, None])[take]  # flat old rows
    dst_new = (unm[:, None] + dst.gather(1, src_a) + torch.arange(0, B * Nn, Nn, device=dev)[:, None])[take]
    rows = (old + torch.arange(0, B * N, N, device=dev)[:, None]).reshape(-1)

    def gather(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B * N, -1).index_select(0, rows)

    new_size = gather(size).view(-1).index_add(0, dst_new, size.reshape(-1).index_select(0, src))
    if mode == "mean":
        count = torch.ones(B * Nn, device=dev).index_add_(0, dst_new, torch.ones(src.numel(), device=dev))

    def merge(t: torch.Tensor) -> torch.Tensor:
        if mode == "wavg":  # ToMe's merge_wavg: merge(x * size, "sum") / merge(size, "sum")
            w = size.reshape(-1, 1).to(t.dtype)
            flat = t.reshape(B * N, -1) * w
            out = flat.index_select(0, rows).index_add_(0, dst_new, flat.index_select(0, src))
            return (out / new_size[:, None].to(t.dtype)).view(B, Nn, -1)
        flat = t.reshape(B * N, -1)  # scatter_reduce "mean" (include_self): (x_b + sum x_a) / (1 + count)
        out = flat.index_select(0, rows).index_add_(0, dst_new, flat.index_select(0, src))
        return (out / count[:, None].to(t.dtype)).view(B, Nn, -1)

    new_x = merge(x)
    new_m = None if metric is None else merge(metric)
    new_source = torch.where(is_unm | is_b, source.gather(1, old), -1)
    return new_x, new_m, new_size.view(B, Nn), new_source, n - r


def merge_schedule(n: torch.Tensor, target: torch.Tensor, aim: bool = False) -> list[torch.Tensor]:
    """Tokens merged per step for each sample, (B,) per step.

    ToMe: at most half of the tokens per step, until the target. AIM: ``N // 2`` then ``N // 4``
    (its default, leaving 25%), continued with ``N // 8``, ``N // 16``, ... as the further steps
    its code carries commented out, each cut at the target and at half of the tokens (halving once
    ``N // 2**i`` is 0). Steps where no sample merges anything are left out.
    """
    n0 = n.long().clone()
    n = n0.clone()
    target = target.long().to(n.device)
    steps: list[torch.Tensor] = []
    i = 1
    while True:
        r = torch.minimum(n - target, n // 2)
        if aim:
            planned = n0 // (2**i)
            r = torch.minimum(r, torch.where(planned > 0, planned, n // 2))
        r = r.clamp_min(0)
        if not bool((r > 0).any()):
            return steps
        steps.append(r)
        n = n - r
        i += 1


def merge_to_batched(
    x: torch.Tensor,
    metric: torch.Tensor | None,
    target: torch.Tensor,
    n: torch.Tensor | None = None,
    mode: str = "wavg",
    aim_schedule: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge each sample's first ``n[b]`` tokens of ``x`` (B, N, D) down to ``target[b]`` tokens.

    ``metric`` (B, N, Dm) is the matching metric, or None to match on ``x`` itself (AIM). ``mode``:
    ``"wavg"`` (ToMe) or ``"mean"`` (AIM). ``aim_schedule``: AIM's step sizes (:func:`merge_schedule`).
    Returns ``values`` (B, max target, D) in ``x.dtype``, in the last step's output order (zeros on
    padding), and ``sources`` (B, max target): the original index of each output token's B-most
    member (itself when it never merged into anything), -1 on padding.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    B, N = x.shape[:2]
    dev = x.device
    n = torch.full((B,), N, dtype=torch.long, device=dev) if n is None else n.long().to(dev)
    target = torch.minimum(torch.as_tensor(target, device=dev).long().expand(B), n)
    size = torch.ones(B, N, device=dev)
    ar = torch.arange(N, device=dev).expand(B, N)
    source = torch.where(ar < n[:, None], ar, -1)
    steps = merge_schedule(n, target, aim_schedule)
    if steps:  # every step's (max n after, max r), fetched in one go
        rs = torch.stack(steps)
        counts = torch.stack([(n[None] - rs.cumsum(0)).amax(1), rs.amax(1)], 1).tolist()
    for i, r in enumerate(steps):
        x, metric, size, source, n = _merge_step(x, metric, size, source, n, r, mode, counts[i])
    k = int(target.max()) if B else 0
    ok = torch.arange(k, device=dev)[None] < n[:, None]
    values = x[:, :k].masked_fill(~ok[..., None], 0)
    return values, torch.where(ok, source[:, :k], -1)


def bipartite_merge(
    x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, slot: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe step on one sample (``merge_wavg``): merge ``r`` A tokens (even positions) into B
    tokens (odd). Returns the new ``(x, metric, size, slot)`` in ToMe's output order
    ``[unmerged A in edge-rank order, B]``; a merged token keeps its B token's ``slot``."""
    N = x.shape[0]
    r = min(r, N // 2)
    if r <= 0:
        return x, metric, size, slot
    n, rr = torch.tensor([N], device=x.device), torch.tensor([r], device=x.device)
    out = _merge_step(x[None], metric[None], size[None].float(), slot[None], n, rr, "wavg")
    return out[0][0], out[1][0], out[2][0].to(size.dtype), out[3][0]


def merge_to(x: torch.Tensor, metric: torch.Tensor | None, target: int, aim: bool = False):
    """Merge one sample's tokens down to ``target`` (ToMe, or AIM's schedule and plain mean with
    ``aim=True``). Returns (values, slots) sorted by slot: each token's original position (its
    B-most member's)."""
    values, slots = merge_to_batched(x[None], metric if metric is None else metric[None], torch.tensor([target]),
                                     mode="mean" if aim else "wavg", aim_schedule=aim)
    order = slots[0].argsort()
    return values[0][order], slots[0][order]


@dataclass
class MergingPruner(Pruner):
    """Base of the pre-LLM merging pruners (:class:`~.tome.ToMe`, :class:`~.aim.AIMMerge`): merge each
    sample's visual tokens down to ``keep`` with :func:`merge_to_batched`, the whole batch at once (no
    Python loop over samples); the merged tokens fill the first visual slots in the last step's output
    order, the order the LLM reads (positions re-packed). Subclasses set ``mode`` and ``aim_schedule``
    (class constants, not fields) and the matching metric (:meth:`_merge_inputs`)."""

    site: str = "vision"
    mode = "wavg"
    aim_schedule = False

    def _merge_inputs(self, state: PruneState) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover
        """(tokens, metric or None to match on the tokens themselves)."""
        raise NotImplementedError

    def select(self, state: PruneState) -> Selection:
        n = state.n_visual
        k = resolve_keep(self.keep, state.n_visual_original).clamp(max=n)
        x, metric = self._merge_inputs(state)
        vals, source = merge_to_batched(x, metric, k, n=n, mode=self.mode, aim_schedule=self.aim_schedule)
        ar = torch.arange(source.shape[1], device=source.device).expand_as(source)
        index = torch.where(source >= 0, ar, -1)  # the first k visual slots, in the merged order
        return Selection(indices=index, values=vals, values_space="llm", info={"source": source})
