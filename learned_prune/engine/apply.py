"""Applying a pruner's :class:`~.selection.Selection` to the token sequence: hard gather or soft mask.

Hard mode removes the visual tokens the selection leaves out (kept tokens may be overwritten with
merged ``values``; positions may be re-packed); soft mode multiplies keep-probabilities into the
sequence, which the decoder loop turns into an additive log-mask on the keys of later layers.
"""

from __future__ import annotations

from typing import Callable

import torch

from .selection import Selection
from .tokens import TokenSequence, compact_index


def key_logmask(seq: TokenSequence, eps: float) -> torch.Tensor | None:
    """Soft mode: the additive key mask (B, L), ``log(keep_prob + eps)`` on visual tokens, 0 on text; else None."""
    if seq.keep_prob is None:
        return None
    return torch.where(seq.is_visual, torch.log(seq.keep_prob + eps), torch.zeros_like(seq.keep_prob))


def soft_mask(seq: TokenSequence, vpos: torch.Tensor, vvalid: torch.Tensor, sel: Selection) -> TokenSequence:
    """Multiply the selection's keep-probabilities (or the 0/1 of its indices) into ``seq.keep_prob``."""
    B, L = seq.valid.shape
    if sel.values is not None:
        raise ValueError("merging pruners (Selection.values) have no soft mode; train with a selecting pruner")
    if sel.keep_prob is not None:
        p = sel.keep_prob.to(seq.hidden.dtype)
    else:  # a hard choice used in soft mode: exact 0/1 probabilities
        p = torch.zeros(vpos.shape, dtype=seq.hidden.dtype, device=vpos.device)
        idx = sel.indices
        p.scatter_(1, idx.clamp_min(0), (idx >= 0).to(p.dtype))
    full = torch.ones(B, L, dtype=p.dtype, device=p.device)
    full = full.scatter(1, vpos, torch.where(vvalid, p, torch.ones_like(p)))
    seq.keep_prob = full if seq.keep_prob is None else seq.keep_prob * full
    return seq


def hard_gather(
    seq: TokenSequence,
    vpos: torch.Tensor,
    vvalid: torch.Tensor,
    sel: Selection,
    repack: bool,
    project: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[TokenSequence, torch.Tensor, torch.Tensor]:
    """Keep the selected visual tokens (and every text token) of ``seq``.

    ``vpos``/``vvalid`` (B, Nv): where the visual tokens stand. ``repack``: shift later positions down
    over the removed tokens. ``project`` maps ``values_space="vision"`` values into the LLM's space.
    Returns the shorter sequence, the gather index (B, L') into ``seq``'s rows and the tokens removed
    per sample (B,) when re-packing (zeros otherwise: the offset of later RoPE positions).
    """
    if sel.indices is None:
        raise ValueError("the pruner returned keep-probabilities in hard mode; hard mode needs indices")
    idx = sel.indices.to(vpos.device)
    ok = idx >= 0
    if bool((idx >= vvalid.sum(1, keepdim=True)).any()):
        raise ValueError("a Selection index points past the sample's visual tokens")
    slot = torch.gather(vpos, 1, idx.clamp_min(0))  # sequence positions of kept tokens
    B, L = seq.valid.shape
    keep_visual = torch.zeros(B, L + 1, dtype=torch.bool, device=vpos.device)
    keep_visual.scatter_(1, torch.where(ok, slot, L), True)  # padded entries land in a spare column
    keep = ~seq.is_visual | keep_visual[:, :L]
    if sel.values is not None:
        values = project(sel.values) if sel.values_space == "vision" else sel.values
        values = values.to(seq.hidden.dtype)
        hidden = seq.hidden.clone()
        cur = torch.gather(hidden, 1, slot.unsqueeze(-1).expand(*slot.shape, hidden.shape[-1]))
        values = torch.where(ok.unsqueeze(-1), values, cur)
        hidden.scatter_(1, slot.unsqueeze(-1).expand(*slot.shape, hidden.shape[-1]), values)
        seq.hidden = hidden
    dropped = seq.is_visual & ~keep & seq.valid
    removed = dropped.sum(1)
    if repack:
        shift = dropped.long().cumsum(1)
        seq.pos = seq.pos - (shift if seq.pos.dim() == 2 else shift[..., None])  # M-RoPE: every id alike
    index, slot_valid = compact_index(keep)
    return seq.gather(index, slot_valid), index, (removed if repack else torch.zeros_like(removed))
