"""Bipartite soft matching (ToMe, Bolya et al., ICLR 2023, arXiv 2210.09461), for merging pruners."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bipartite_merge(
    x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, slot: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe step on one sample: merge ``r`` tokens of set A (even positions) into set B (odd).

    Each A token proposes its most similar B token (cosine of ``metric``); the ``r`` best edges
    merge by size-weighted average (``merge_wavg``). A merged token keeps its B token's ``slot``.
    Returns the new ``(x, metric, size, slot)`` with the survivors in original order.
    """
    n = x.shape[0]
    r = min(r, n // 2)
    if r <= 0:
        return x, metric, size, slot
    m = F.normalize(metric.float(), dim=-1)
    a, b = torch.arange(0, n, 2, device=x.device), torch.arange(1, n, 2, device=x.device)
    scores = m[a] @ m[b].T
    best, dst = scores.max(-1)
    order = best.argsort(descending=True)
    merged_a, kept_a = order[:r], order[r:]
    w = size[:, None].to(x.dtype)
    xb, mb, sb = x[b] * w[b], metric[b] * w[b].to(metric.dtype), size[b].clone()
    xb = xb.index_add(0, dst[merged_a], x[a[merged_a]] * w[a[merged_a]])
    mb = mb.index_add(0, dst[merged_a], metric[a[merged_a]] * w[a[merged_a]].to(metric.dtype))
    sb = sb.index_add(0, dst[merged_a], size[a[merged_a]])
    xb, mb = xb / sb[:, None].to(x.dtype), mb / sb[:, None].to(metric.dtype)
    keep_a = a[kept_a]
    new_x = torch.cat([x[keep_a], xb])
    new_m = torch.cat([metric[keep_a], mb])
    new_s = torch.cat([size[keep_a], sb])
    new_slot = torch.cat([slot[keep_a], slot[b]])
    order = new_slot.argsort()
    return new_x[order], new_m[order], new_s[order], new_slot[order]


def merge_to(x: torch.Tensor, metric: torch.Tensor, target: int, first_steps: list[int] | None = None):
    """Merge one sample's tokens down to ``target`` with repeated bipartite steps.

    ``first_steps`` fixes the token counts removed by the first steps (AIM's two-step schedule);
    later steps merge at most half of the tokens each, as ToMe allows. Returns (values, slots).
    """
    size = torch.ones(x.shape[0], device=x.device)
    slot = torch.arange(x.shape[0], device=x.device)
    for r in first_steps or []:
        if x.shape[0] <= target:
            break
        x, metric, size, slot = bipartite_merge(x, metric, size, slot, min(r, x.shape[0] - target))
    while x.shape[0] > target:
        x, metric, size, slot = bipartite_merge(x, metric, size, slot, x.shape[0] - target)
    return x, slot
