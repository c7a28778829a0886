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
        k = resolve_keep(self.keep, state.n_visual_original).clamp(max=state.n_visual)
        keys = state.keys()  # (B, H_kv, L, hd) post-RoPE keys of layer K-1
        norm = keys.transpose(1, 2).flatten(2).abs().sum(-1).float()  # L1 norm, heads concatenated
        block = state.engine.adapter.lm.layers[self.layer - 1]
        feats = block.input_layernorm(seq.prev_input).float()
        text = state.instruction_mask
        n_txt = min(self.text_pivots, int(text.sum(1).min()))
        txt_pos = norm.masked_fill(~text, float("-inf")).topk(n_txt, dim=1).indices
        gather = lambda x, i: torch.gather(x, 1, i.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
        return Selection(indices=duplication_select(
            torch.gather(norm, 1, vpos), gather(feats, vpos), vvalid, gather(feats, txt_pos), k, self.image_pivots
        ))


def duplication_select(
    key_norm: torch.Tensor,
    feats: torch.Tensor,
    valid: torch.Tensor,
    text_pivot_feats: torch.Tensor,
    k: torch.Tensor,
    image_pivots: int = 4,
) -> torch.Tensor:
    """DART's selection on visual tokens, batched: indices (B, max k), sorted, -1 padded.

    ``key_norm`` (B, N) ranks visual pivots; ``feats`` (B, N, D) and ``text_pivot_feats`` (B, T, D)
    give cosine similarities; each pivot in turn adds its least-similar unchosen visual tokens.
    """
    B, N = key_norm.shape
    feats = F.normalize(feats.float(), dim=-1)
    n_img = torch.minimum(k, torch.full_like(k, image_pivots))
    img_piv = key_norm.float().masked_fill(~valid, float("-inf")).topk(min(image_pivots, N), dim=1).indices
    ar = torch.arange(img_piv.shape[1], device=k.device)[None]
    taken = ~valid | _mark(img_piv, ar < n_img[:, None], N)
    piv = torch.cat([torch.gather(feats, 1, img_piv.unsqueeze(-1).expand(-1, -1, feats.shape[-1])),
                     F.normalize(text_pivot_feats.float(), dim=-1)], 1)
    sim = piv @ feats.transpose(1, 2)  # (B, P, N)
    n_piv = piv.shape[1]
    rest = k - n_img
    for j in range(n_piv):
        share = rest // n_piv + (j < rest % n_piv).long()
        m = int(share.max())
        if m == 0:
            continue
        pick = (-sim[:, j].masked_fill(taken, float("inf"))).topk(m, dim=1).indices
        ok = torch.arange(m, device=k.device)[None] < share[:, None]
        taken = taken | _mark(pick, ok, N)
    chosen = taken & valid
    big = N + 1
    idx = torch.where(chosen, torch.arange(N, device=k.device)[None], torch.full_like(key_norm, big, dtype=torch.long))
    idx = idx.sort(1).values[:, : int(chosen.sum(1).max())]
    return torch.where(idx == big, torch.full_like(idx, -1), idx)


def _mark(index: torch.Tensor, ok: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) bool, True at ``index`` where ``ok``."""
    out = torch.zeros(index.shape[0], n + 1, dtype=torch.bool, device=index.device)
    out.scatter_(1, torch.where(ok, index, n), True)
    return out[:, :n]
