"""Turning scores, picks or masks into a Selection's indices: (B, k) positions among the visual tokens,
sorted (sequence order), padded with -1 where a sample keeps fewer."""

from __future__ import annotations

import torch


def sorted_picks(picks: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The first ``k[b]`` entries of each row of ``picks`` (B, K), sorted, the rest -1, (B, K)."""
    ok = torch.arange(picks.shape[1], device=picks.device)[None] < k[:, None]
    big = torch.iinfo(picks.dtype).max
    picks = torch.where(ok, picks, torch.full_like(picks, big)).sort(dim=1).values
    return torch.where(picks == big, torch.full_like(picks, -1), picks)


def topk_selection(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Indices (B, max k) of the k highest scores per sample, in sequence order, padded with -1."""
    scores = scores.float().masked_fill(~valid, float("-inf"))
    return sorted_picks(scores.topk(int(k.max()), dim=1).indices, k)


def mask_indices(mask: torch.Tensor) -> torch.Tensor:
    """Indices (B, max kept) of the True entries of ``mask`` (B, N), in order, padded with -1."""
    N = mask.shape[1]
    big = N + 1
    idx = torch.where(mask, torch.arange(N, device=mask.device)[None], torch.full_like(mask, big, dtype=torch.long))
    idx = idx.sort(1).values[:, : int(mask.sum(1).max())]
    return torch.where(idx == big, torch.full_like(idx, -1), idx)


def pad_rows(rows: list[torch.Tensor], fill: float = -1, width: int = 0) -> torch.Tensor:
    """Stack 1-D (or (n, D)) tensors of different lengths into (B, max n[, D]), padded with ``fill``;
    at least ``width`` wide."""
    n = max([r.shape[0] for r in rows] + [width])
    ref = rows[0]
    out = torch.full((len(rows), n, *ref.shape[1:]), fill, dtype=ref.dtype, device=ref.device)
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
    return out
