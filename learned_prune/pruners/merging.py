"""Bipartite soft matching (ToMe, Bolya et al., ICLR 2023, arXiv 2210.09461), for merging pruners.

Vectorised over the batch: :func:`merge_to_batched` merges (B, N, D) tokens with per-sample valid
lengths ``n`` and targets, with no Python loop over samples, in as few bipartite steps as the
schedule allows (at most half of the tokens merge per step: 144 -> 64 takes 2 steps, 576 -> 64
takes 4; :func:`merge_schedule` computes every step's per-sample merge counts up front). Each step
is a fixed handful of kernels over the whole batch, whatever B: one ``bmm`` of the A/B cosine
scores on strided views (A = even, B = odd positions), a row ``max`` and a stable ``argsort``
ranking the edges, one ``index_select`` compacting the survivors (unmerged A tokens and all B
tokens, in their order) into the next step's (B, N', D) buffer, one ``index_select`` +
``index_add_`` adding the merged A tokens onto their B tokens' rows, and a per-row multiply/divide
for ``merge_wavg`` (by 1 on A rows, which is exact; skipped in the first step, where every size is
1). The arithmetic is the one-sample loop's op for op (same normalisation, same weighted sums in
the same order), so a sample merged alone reproduces it to the bit, ties included. When the metric
is the tokens themselves (AIM) one buffer serves as both, and a separate metric (ToMe's keys) is
not merged in the last step. Padded entries (beyond a sample's ``n``) never score or merge, and
come back as index -1 with zero values.

:func:`bipartite_merge` and :func:`merge_to` keep the original one-sample API as thin wrappers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _merge_step(
    x: torch.Tensor,
    metric: torch.Tensor | None,
    size: torch.Tensor,
    slot: torch.Tensor,
    n: torch.Tensor,
    r: torch.Tensor,
    unit: bool = False,
    need_metric: bool = True,
    counts: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batched ToMe step on tokens ``x`` (B, N, D) with valid lengths ``n`` (B,).

    Sample b merges ``r[b]`` (already clamped to ``n[b] // 2``) of its A tokens (even positions
    among its valid ones) into B tokens (odd positions), by size-weighted average. ``metric``
    (B, N, Dm) is a separate metric (merged the same way), or None when the metric is ``x`` itself.
    ``unit``: every size is 1 (the first step), so the weighting multiplications are skipped.
    ``need_metric=False`` (the last step) skips merging a separate metric (returned as None).
    ``counts``: ``(min n, min r, max r, max (n - r))`` when the caller knows them (no device syncs).
    The arithmetic is the one-sample step's op for op (multiplying or dividing by 1 is exact), so
    the results match it to the bit. Returns the compacted ``(x, metric, size, slot, n)``.
    """
    B, N = size.shape
    dev = x.device
    if counts is None:
        counts = (int(n.min()), int(r.min()), int(r.max()), int((n - r).max()))
    nmin, rmin, rmax, Nn = counts
    padded, uneven = nmin < N, rmin != rmax

    # cosine scores of every A token against every B token, padded B columns masked out
    m = F.normalize((x if metric is None else metric).float(), dim=-1)
    scores = torch.bmm(m[:, 0::2], m[:, 1::2].transpose(1, 2))
    if padded:
        valid = torch.arange(N, device=dev) < n[:, None]
        scores.masked_fill_(~valid[:, None, 1::2], float("-inf"))
    best, dst = scores.max(-1)  # (B, NA): each A token's most similar B token (the first on ties)
    if padded:
        best.masked_fill_(~valid[:, 0::2], float("-inf"))

    # the r best edges of each sample, in rank order (a stable argsort, as ToMe's on CPU)
    top = best.argsort(dim=-1, descending=True, stable=True)[:, :rmax]  # (B, rmax) A indices
    sel = (torch.arange(rmax, device=dev) < r[:, None]) if uneven else True
    merged = torch.zeros_like(best, dtype=torch.bool).scatter_(1, top, sel)

    # survivors keep their order: drop the merged A tokens and compact each row into (B, Nn)
    if padded:
        keep = valid.clone()
        keep[:, 0::2] &= ~merged
    else:
        keep = torch.ones(B, N, dtype=torch.bool, device=dev)
        keep[:, 0::2] = ~merged
    new_pos = keep.cumsum(1) - 1
    if padded or uneven:
        pos = torch.zeros(B, Nn + 1, dtype=torch.long, device=dev)
        pos.scatter_(1, torch.where(keep, new_pos, Nn), torch.arange(N, device=dev).expand(B, N))
        pos = pos[:, :Nn]  # old position of each new row (dropped rows went to column Nn)
        rows = (pos + torch.arange(0, B * N, N, device=dev)[:, None]).reshape(-1)
    else:  # every row keeps Nn tokens: the kept flat rows are already in (B, Nn) order
        rows = keep.view(-1).nonzero().view(-1)
        pos = rows.view(B, Nn) % N if B > 1 else rows.view(B, Nn)

    # merged A tokens (old flat row 2*top) in edge-rank order, and the new flat row of their B token
    src = 2 * top
    dst_new = new_pos.gather(1, 2 * dst.gather(1, top) + 1)
    if B > 1:
        src = src + torch.arange(0, B * N, N, device=dev)[:, None]
        dst_new = dst_new + torch.arange(0, B * Nn, Nn, device=dev)[:, None]
    src, dst_new = (src[sel], dst_new[sel]) if uneven else (src.view(-1), dst_new.view(-1))

    # sizes: B rows add up the sizes merged into them; slots: the old slot of each new row
    size_flat = size.reshape(-1)
    old_size = size_flat.index_select(0, rows)
    new_size = old_size.index_add(0, dst_new, size_flat.index_select(0, src))
    new_slot = pos if unit else slot.reshape(-1).index_select(0, rows).view(B, Nn)
    if not unit:
        is_b = (pos % 2 == 1).view(-1)
        w = size_flat.to(x.dtype)
        mult = torch.where(is_b, old_size, 1).to(x.dtype)  # A rows: x 1 (exact)
        div = torch.where(is_b, new_size, 1)  # A rows: / 1 (exact)
    else:  # all sizes 1: the weights are 1, and kept A rows still have size 1
        div = new_size

    def wavg(t: torch.Tensor) -> torch.Tensor:
        # merge_wavg, as the one-sample step: (x_b * w_b + sum of x_a * w_a) / size_b on B rows
        flat = t.reshape(B * N, -1)
        out = flat.index_select(0, rows)
        add = flat.index_select(0, src)
        if not unit:
            out.mul_(mult.to(t.dtype)[:, None])
            add.mul_(w.to(t.dtype).index_select(0, src)[:, None])
        out.index_add_(0, dst_new, add)
        out.div_(div.to(t.dtype)[:, None])
        return out.view(B, Nn, -1)

    new_x = wavg(x)
    new_m = wavg(metric) if metric is not None and need_metric else None
    return new_x, new_m, new_size.view(B, Nn), new_slot, n - r


def merge_schedule(
    n: torch.Tensor, target: torch.Tensor, first_steps: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Tokens merged per step for each sample, (B,) per step, as the one-sample loop would do it.

    ``first_steps`` (each (B,) or an int) are AIM's fixed first steps, cut at ``target``; then ToMe
    steps of at most half of the tokens until every sample reaches its target. Steps where no sample
    merges anything are left out.
    """
    n = n.long().clone()
    target = target.long().to(n.device)
    steps: list[torch.Tensor] = []
    for r in first_steps or []:
        r = torch.as_tensor(r, device=n.device).long().expand_as(n)
        r = torch.minimum(torch.minimum(r, n - target), n // 2).clamp_min(0)
        if bool((r > 0).any()):
            steps.append(r)
            n = n - r
    while True:
        r = torch.minimum(n - target, n // 2).clamp_min(0)
        if not bool((r > 0).any()):
            return steps
        steps.append(r)
        n = n - r


def merge_to_batched(
    x: torch.Tensor,
    metric: torch.Tensor | None,
    target: torch.Tensor,
    n: torch.Tensor | None = None,
    first_steps: list[torch.Tensor] | None = None,
    size: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge each sample's first ``n[b]`` tokens of ``x`` (B, N, D) down to ``target[b]`` tokens.

    ``metric`` (B, N, Dm) is the matching metric, or None to match on ``x`` itself (AIM).
    ``first_steps``: see :func:`merge_schedule`. ``size`` (B, N): the tokens' current sizes (default 1).
    Returns ``values`` (B, max target, D) in ``x.dtype`` (size-weighted averages; zeros on padding)
    and ``slots`` (B, max target): each survivor's original position (its B token's for a merged
    token), increasing, padded with -1.
    """
    B, N = x.shape[:2]
    dev = x.device
    n = torch.full((B,), N, dtype=torch.long, device=dev) if n is None else n.long().to(dev)
    target = torch.as_tensor(target, device=dev).long().expand(B)
    target = torch.minimum(target, n)
    unit = size is None
    size = torch.ones(B, N, device=dev) if size is None else size
    slot = torch.arange(N, device=dev).expand(B, N)
    steps = merge_schedule(n, target, first_steps)
    if steps:  # (min n, min r, max r, max n after) of every step, fetched in one go
        rs = torch.stack(steps)
        ns = n[None] - torch.cumsum(rs, 0) + rs
        counts = torch.stack([ns.amin(1), rs.amin(1), rs.amax(1), (ns - rs).amax(1)], 1).tolist()
    for i, r in enumerate(steps):
        first, last = i == 0, i == len(steps) - 1
        x, metric, size, slot, n = _merge_step(
            x, metric, size, slot, n, r, unit=unit and first, need_metric=not last, counts=counts[i]
        )
    k = int(target.max()) if B else 0
    ok = torch.arange(k, device=dev)[None] < n[:, None]
    values = x[:, :k]
    if bool((n < k).any()):
        values = values.masked_fill(~ok[..., None], 0)
    return values, torch.where(ok, slot[:, :k], -1)


def bipartite_merge(
    x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, slot: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe step on one sample: merge ``r`` tokens of set A (even positions) into set B (odd).

    Each A token proposes its most similar B token (cosine of ``metric``); the ``r`` best edges
    merge by size-weighted average (``merge_wavg``). A merged token keeps its B token's ``slot``.
    Returns the new ``(x, metric, size, slot)`` with the survivors in original order.
    (A one-sample wrapper of the batched :func:`_merge_step`.)
    """
    N = x.shape[0]
    r = min(r, N // 2)
    if r <= 0:
        return x, metric, size, slot
    n, rr = torch.tensor([N], device=x.device), torch.tensor([r], device=x.device)
    new_x, new_m, new_s, new_slot, _ = _merge_step(x[None], metric[None], size[None], slot[None], n, rr)
    return new_x[0], new_m[0], new_s[0], new_slot[0]


def merge_to(x: torch.Tensor, metric: torch.Tensor, target: int, first_steps: list[int] | None = None):
    """Merge one sample's tokens down to ``target`` with repeated bipartite steps.

    ``first_steps`` fixes the token counts removed by the first steps (AIM's two-step schedule);
    later steps merge at most half of the tokens each, as ToMe allows. Returns (values, slots).
    (A one-sample wrapper of :func:`merge_to_batched`.)
    """
    values, slots = merge_to_batched(x[None], metric[None], torch.tensor([target]), first_steps=first_steps)
    return values[0], slots[0]
