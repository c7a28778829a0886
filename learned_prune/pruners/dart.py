"""DART: pruning by token duplication (Wen et al., EMNLP 2025, arXiv 2502.11494).

"Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More".
Facts from the official scripts (`--pruned_layer 2 --pivot_image_token 4 --pivot_text_token 4`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.state import PruneState, Selection
from .base import Pruner, resolve_keep


@dataclass
class DART(Pruner):
    """Keep pivot tokens and, per pivot, the visual tokens least similar to it (least duplicated).

    At ``llm:K`` (K=2): pivots are the ``image_pivots`` visual and ``text_pivots`` instruction tokens
    with the largest L1 norm of layer K-1's post-RoPE keys (heads concatenated). Then, pivot by
    pivot, the unchosen visual tokens with the lowest cosine similarity to it are added; text pivots
    are not kept. Similarities use layer K-1's RMS-normed input states (the states its keys come
    from). Original RoPE positions are kept; no attention weights are needed.
    Departure: the budget is met exactly — the remaining ``keep - image_pivots`` slots are spread
    over the pivots — where the official code keeps ``4 + 8 * (keep // 8)`` tokens.
    """

    layer: int = 2
    image_pivots: int = 4
    text_pivots: int = 4

    def sites(self, adapter) -> list[str]:
        return [f"llm:{self.layer}"]

    def prepare(self, adapter) -> None:
        if not 1 <= self.layer < adapter.num_layers:
            raise ValueError(f"DART layer={self.layer}: needs 1 <= layer < {adapter.num_layers}")

    def select(self, state: PruneState) -> Selection:
        seq, vpos, vvalid = state.seq, state.visual_pos, state.visual_valid
        B, Nv = vpos.shape
        k = resolve_keep(self.keep, state.n_visual_original).clamp(max=state.n_visual)
        keys = state.keys()  # (B, H_kv, L, hd)
        norm = keys.transpose(1, 2).flatten(2).abs().sum(-1).float()  # (B, L) L1 norm, heads concatenated
        block = state.engine.adapter.lm.layers[self.layer - 1]
        feats = F.normalize(block.input_layernorm(seq.prev_input).float(), dim=-1)  # (B, L, D)
        vis_norm = torch.gather(norm, 1, vpos).masked_fill(~vvalid, float("-inf"))
        n_img = torch.minimum(k, torch.full_like(k, self.image_pivots))
        img_piv = vis_norm.topk(min(self.image_pivots, Nv), dim=1).indices  # among visual tokens
        text = state.instruction_mask
        n_txt = min(self.text_pivots, int(text.sum(1).min()))
        txt_piv = norm.masked_fill(~text, float("-inf")).topk(n_txt, dim=1).indices if n_txt else vpos[:, :0]
        ar = torch.arange(img_piv.shape[1], device=vpos.device)[None]
        taken = ~vvalid | _mark(img_piv, ar < n_img[:, None], Nv)
        piv_pos = torch.cat([torch.gather(vpos, 1, img_piv), txt_piv], 1)  # sequence positions of pivots
        piv_feats = torch.gather(feats, 1, piv_pos.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        vis_feats = torch.gather(feats, 1, vpos.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        sim = piv_feats @ vis_feats.transpose(1, 2)  # (B, P, Nv)
        n_piv = piv_pos.shape[1]
        rest = k - n_img
        for j in range(n_piv):
            share = rest // n_piv + (j < rest % n_piv).long()  # (B,)
            m = int(share.max())
            if m == 0:
                continue
            s = sim[:, j].masked_fill(taken, float("inf"))
            pick = (-s).topk(m, dim=1).indices
            ok = torch.arange(m, device=vpos.device)[None] < share[:, None]
            taken = taken | _mark(pick, ok, Nv)
        chosen = taken & vvalid
        big = Nv + 1
        idx = torch.where(chosen, torch.arange(Nv, device=vpos.device)[None], torch.full_like(vpos, big))
        idx = idx.sort(1).values[:, : int(chosen.sum(1).max())]
        return Selection(indices=torch.where(idx == big, torch.full_like(idx, -1), idx))


def _mark(index: torch.Tensor, ok: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) bool, True at ``index`` where ``ok``."""
    out = torch.zeros(index.shape[0], n + 1, dtype=torch.bool, device=index.device)
    out.scatter_(1, torch.where(ok, index, n), True)
    return out[:, :n]
