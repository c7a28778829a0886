"""Training aids of the testbed backbone recipe: the probes' attribute loss, a 2-D sin-cos
initialisation of the tower's position table, and position jitter. All training-only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .draw import SHAPES
from .scenes import COLOR_NAMES, SIZE_NAMES

N_COLORS, N_SHAPES, N_SIZES = len(COLOR_NAMES), len(SHAPES), len(SIZE_NAMES)


def attribute_loss(logits: torch.Tensor, attrs: torch.Tensor, centres: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """CE on colour/shape/size (-100 ignored) + MSE on the centre (x10) where ``present``; logits
    (..., colours + shapes + sizes + 2) against attrs (..., 3) and centres (..., 2)."""
    a, b, c = N_COLORS, N_COLORS + N_SHAPES, N_COLORS + N_SHAPES + N_SIZES
    loss = logits.new_zeros(())
    for (lo, hi), target in zip(((0, a), (a, b), (b, c)), attrs.unbind(-1)):
        if bool((target != -100).any()):
            loss = loss + F.cross_entropy(logits[..., lo:hi].flatten(0, -2), target.flatten(), ignore_index=-100)
    if bool(present.any()):
        loss = loss + 10 * ((logits[..., c:c + 2] - centres) ** 2).sum(-1)[present].mean()
    return loss


def jittered_positions(ids: torch.Tensor, image_token_id: int, jitter: int) -> torch.Tensor:
    """Position ids (B, L) with the image-question distance of each sample moved by a random gap.

    Each sample draws a gap g in [-J, J] (J = ``jitter``): the tokens after the image move by g. A
    negative g also compresses the image's positions evenly into n - |g| slots (visual token j moves
    by -ceil(j |g| / n)), as re-packing does after dropping |g| of n tokens spread over the image, so
    the image and the question never share a position. Without it a from-scratch backbone learns the
    one distance it always sees (``benchmarks/position_gap.py``).
    """
    J = jitter
    B, L = ids.shape
    idx = torch.arange(L, device=ids.device).expand(B, L)
    is_image = ids == image_token_id
    first = torch.where(is_image, idx, L).amin(1, keepdim=True)
    last = torch.where(is_image, idx, -1).amax(1, keepdim=True)
    n = is_image.sum(1, keepdim=True).clamp_min(1)
    gap = torch.randint(-J, J + 1, (B, 1), device=ids.device).clamp_min(-(n - 1))
    inside = torch.where(gap < 0, -(((idx - first).clamp_min(0) * -gap + n - 1) // n), 0)  # -ceil(j|g|/n)
    return idx + torch.where(is_image, inside, 0) + torch.where(idx > last, gap, 0)


def sincos_position_init(tower: nn.Module, scale: float = 0.5) -> None:
    """Set a CLIP tower's patch position embeddings to a 2-D sin-cos table ([CLS]: zeros).

    A learned-from-scratch table starts as noise; this one gives neighbouring patches similar codes
    from step 0 (MAE-style fixed 2-D embeddings, used here as an initialisation and then trained).
    """
    weight = tower.embeddings.position_embedding.weight
    n, d = weight.shape
    g = int(round((n - 1) ** 0.5))
    if g * g != n - 1 or d % 4:
        return  # not a square grid with a [CLS] slot: keep the default initialisation
    yy, xx = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij")
    q = d // 4
    omega = 1.0 / (100 ** (torch.arange(q, dtype=torch.float32) / q))
    parts = []
    for coord in (xx.flatten(), yy.flatten()):
        angle = coord[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    with torch.no_grad():
        weight[0].zero_()
        weight[1:] = torch.cat(parts, 1).to(weight.dtype) * scale

