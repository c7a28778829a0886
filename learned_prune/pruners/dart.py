"""DART: pruning by token duplication (Wen et al., EMNLP 2025, arXiv 2502.11494).

"Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More".
Official code ZichenWen1/DART; read in its fork xqy1111111/DART,
``llava/model/language_model/modeling_llama_self.py`` (``DART.forward``, ``DART.get_retained_image_token``),
run with ``--pruned_layer 2 --pivot_image_token 4 --pivot_text_token 4``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.state import PruneState, Selection
from .base import Pruner, resolve_keep
from .indices import mask_indices


@dataclass
class DART(Pruner):
    """Keep pivot tokens and, per pivot, the visual tokens least similar to it (least duplicated).

    At ``llm:K`` (K=2): pivots are the ``image_pivots`` visual and ``text_pivots`` instruction tokens
    (the prompt after the image) with the largest L1 norm of layer K-1's post-RoPE keys (key-value
    heads concatenated; repeating them for grouped-query attention scales every norm alike).
    Similarities are cosines of the hidden states entering layer K (layer K-1's output) passed
    through the model's final norm. Pivot by pivot, the not-yet-chosen visual tokens
    least similar to the pivot are added; image pivots are kept, text pivots are not. Original RoPE
    positions are kept (gaps); no attention weights are needed.

    ``pivot_order="official"`` visits the pivots in the order the official code does: it iterates
    ``list(set(image_pivot_positions + text_pivot_positions))``, where positions are token indices
    in the unpadded prompt; for CPython ints that order is fixed by the index values (hash-table
    slots), so it is reproduced by building the same Python set per sample. ``"norm"`` visits the
    image pivots then the text pivots, each by decreasing key norm.

    ``budget``: ``"exact"`` (default) keeps exactly ``keep`` visual tokens: the ``keep -
    image_pivots`` slots are shared over the pivots, the first pivots visited taking one more when
    they do not divide evenly. ``"official"`` gives every pivot ``min(keep, n - image_pivots) //
    (image_pivots + text_pivots)`` tokens (a ratio: ``floor(n * keep / 8)``), so "128" keeps
    4 + 8 * 16 = 132.

    Departures: ``budget="exact"`` is the default because ``keep`` is the project-wide budget — the
    number of visual tokens that reach the later layers, equal across the methods a table compares;
    the official count ``4 + 8 * (keep // 8)`` misses it by -3..+4 tokens (+4, i.e. 25%, at keep=16). The selection
    rule is the same under both budgets. Samples of a batch are handled independently (the official
    code asserts batch size 1). Fewer text pivots are used when a prompt has fewer than
    ``text_pivots`` instruction tokens (the official ``topk`` would fail).
    """

    layer: int = 2
    image_pivots: int = 4
    text_pivots: int = 4
    budget: str = "exact"
    pivot_order: str = "official"

    def sites(self, adapter) -> list[str]:
        return [f"llm:{self.layer}"]

    def prepare(self, adapter) -> None:
        if not 1 <= self.layer < adapter.num_layers:
            raise ValueError(f"DART layer={self.layer}: needs 1 <= layer < {adapter.num_layers}")
        if self.budget not in ("exact", "official"):
            raise ValueError(f"DART budget must be 'exact' or 'official', got {self.budget!r}")
        if self.pivot_order not in ("official", "norm"):
            raise ValueError(f"DART pivot_order must be 'official' or 'norm', got {self.pivot_order!r}")

    def counts(self, state: PruneState) -> tuple[torch.Tensor, torch.Tensor]:
        """(image pivots kept, slots the pivots share) per sample, each (B,)."""
        n, n0 = state.n_visual, state.n_visual_original
        k = resolve_keep(self.keep, n0).clamp(max=n)  # also rejects a count above the visual tokens
        if self.budget == "official":
            per = self.image_pivots + self.text_pivots
            n_img = torch.minimum(n, torch.full_like(n, self.image_pivots))
            if isinstance(self.keep, float):
                return n_img, (n0.double() * self.keep / per).floor().long() * per
            return n_img, torch.minimum(k, n - n_img) // per * per  # min(retain, n - pivots) // 8, as for NeXT
        n_img = torch.minimum(k, torch.full_like(k, self.image_pivots))
        return n_img, k - n_img

    def select(self, state: PruneState) -> Selection:
        vpos, vvalid = state.visual_pos, state.visual_valid
        keys = state.keys()  # (B, H_kv, L, hd) post-RoPE keys of layer K-1
        norm = keys.transpose(1, 2).flatten(2).abs().sum(-1).float()  # L1 norm, heads concatenated
        feats = state.final_norm(state.hidden).float()  # final norm of layer K-1's output
        text = state.instruction_mask
        n_txt = min(self.text_pivots, int(text.sum(1).min()))
        txt_pos = norm.masked_fill(~text, float("-inf")).topk(n_txt, dim=1).indices
        n_img, rest = self.counts(state)
        order = None
        if self.pivot_order == "official":
            index = state.valid.long().cumsum(1) - 1  # token index in the unpadded prompt
            img_piv = pivot_indices(torch.gather(norm, 1, vpos), vvalid, self.image_pivots)
            img_at = torch.gather(index, 1, torch.gather(vpos, 1, img_piv))
            order = set_order(img_at, torch.gather(index, 1, txt_pos))
        gather = lambda x, i: torch.gather(x, 1, i.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
        return Selection(indices=duplication_select(
            torch.gather(norm, 1, vpos), gather(feats, vpos), vvalid, gather(feats, txt_pos), n_img + rest,
            self.image_pivots, order=order, n_img=n_img,
        ))


def pivot_indices(key_norm: torch.Tensor, valid: torch.Tensor, image_pivots: int) -> torch.Tensor:
    """The image pivots: visual tokens with the largest key norm, by decreasing norm, (B, P_img)."""
    return key_norm.float().masked_fill(~valid, float("-inf")).topk(min(image_pivots, key_norm.shape[1]), 1).indices


def set_order(image_at: torch.Tensor, text_at: torch.Tensor) -> torch.Tensor:
    """Per sample, the order in which ``list(set(image_at + text_at))`` lists the pivots, as indices
    into the concatenation [image pivots, text pivots], (B, P)."""
    rows = []
    for img, txt in zip(image_at.tolist(), text_at.tolist()):
        where = {v: j for j, v in enumerate(img + txt)}
        rows.append([where[v] for v in list(set(img + txt))])
    return torch.tensor(rows, dtype=torch.long, device=image_at.device).view(image_at.shape[0], -1)


def duplication_select(
    key_norm: torch.Tensor,
    feats: torch.Tensor,
    valid: torch.Tensor,
    text_pivot_feats: torch.Tensor,
    k: torch.Tensor,
    image_pivots: int = 4,
    order: torch.Tensor | None = None,
    n_img: torch.Tensor | None = None,
) -> torch.Tensor:
    """DART's selection on visual tokens, batched: indices (B, max k), sorted, -1 padded.

    ``key_norm`` (B, N) ranks visual pivots; ``feats`` (B, N, D) and ``text_pivot_feats`` (B, T, D)
    give cosine similarities; each pivot in turn adds its least-similar unchosen visual tokens, the
    ``k - n_img`` slots shared over the pivots, earlier pivots taking one more when they do not
    divide evenly. ``order`` (B, P) permutes the pivots [image by key norm, text] into visiting order
    (default: that order); ``n_img`` (B,) image pivots are kept (default ``min(k, image_pivots)``).
    """
    B, N = key_norm.shape
    feats = F.normalize(feats.float(), dim=-1)
    if n_img is None:
        n_img = torch.minimum(k, torch.full_like(k, image_pivots))
    img_piv = pivot_indices(key_norm, valid, image_pivots)
    ar = torch.arange(img_piv.shape[1], device=k.device)[None]
    taken = ~valid | _mark(img_piv, ar < n_img[:, None], N)
    piv = torch.cat([torch.gather(feats, 1, img_piv.unsqueeze(-1).expand(-1, -1, feats.shape[-1])),
                     F.normalize(text_pivot_feats.float(), dim=-1)], 1)
    sim = piv @ feats.transpose(1, 2)  # (B, P, N)
    if order is not None:
        sim = torch.gather(sim, 1, order.to(sim.device).unsqueeze(-1).expand(-1, -1, N))
    n_piv = piv.shape[1]
    rest = (k - n_img).clamp_min(0)
    for j in range(n_piv):
        share = rest // n_piv + (j < rest % n_piv).long()
        share = torch.minimum(share, (~taken).sum(1))
        m = int(share.max())
        if m == 0:
            continue
        pick = (-sim[:, j].masked_fill(taken, float("inf"))).topk(m, dim=1).indices
        ok = torch.arange(m, device=k.device)[None] < share[:, None]
        taken = taken | _mark(pick, ok, N)
    return mask_indices(taken & valid)


def _mark(index: torch.Tensor, ok: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) bool, True at ``index`` where ``ok``."""
    out = torch.zeros(index.shape[0], n + 1, dtype=torch.bool, device=index.device)
    out.scatter_(1, torch.where(ok, index, n), True)
    return out[:, :n]
