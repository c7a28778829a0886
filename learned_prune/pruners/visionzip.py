"""VisionZip: dominant + contextual visual tokens (Yang et al., CVPR 2025, arXiv 2412.04467).

"VisionZip: Longer is Better but Not Necessary in Vision Language Models"; code dvlab-research/VisionZip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.signals import token_patch_index, cls_feature
from ..engine.state import PruneState, Selection
from .base import Pruner, resolve_keep

# The paper's splits for LLaVA-1.5 (Table 8): 192 = 162 + 30, 128 = 108 + 20, 64 = 54 + 10.
DOMINANT_FRACTION = 54 / 64


@dataclass
class VisionZip(Pruner):
    """Keep ``dominant`` tokens by [CLS] attention (the [CLS] token itself always among them) and
    merge the rest into ``keep - dominant`` contextual tokens, before the projector.

    As the official code: dominant = the [CLS] token plus the top ``dominant-1`` patches by
    head-summed [CLS] attention of the penultimate vision layer; the remaining patches are
    L2-normalised by their last-layer keys, every ``step``-th becomes a target, every other one is
    assigned to its most similar target, and a contextual token is ``target + mean(assigned)``.
    The split follows the paper's ratio (54/64 dominant). Departures: the [CLS] feature takes the slot
    of the first non-kept patch and contextual tokens sit in their target's slot, so the LLM sees
    raster order instead of [CLS, dominant..., contextual...]; [CLS] rows are computed from q/k, so
    SDPA stays on.
    """

    site: str = "vision"
    dominant: int | None = None

    def select(self, state: PruneState) -> Selection:
        k = resolve_keep(self.keep, state.n_visual_original).clamp(max=state.n_visual)
        feats = state.vision_features()  # (B, Nv, Dv) pre-projector, as LLaVA feeds its projector
        attn = state.cls_attention(-2).float().masked_fill(~state.visual_valid, float("-inf"))
        keys = F.normalize(state.vision_keys(-1).float(), dim=-1)
        cls = cls_feature(state)
        is_patch = _patch_tokens(state)  # LLaVA-NeXT newline tokens carry no vision features
        B, Nv, _ = feats.shape
        kmax = int(k.max())
        values = feats.new_zeros(B, kmax, feats.shape[-1])
        index = torch.full((B, kmax), -1, dtype=torch.long, device=feats.device)
        for b in range(B):
            n, kb = int(state.n_visual[b]), int(k[b])
            dom = self.dominant if self.dominant is not None else max(1, round(kb * DOMINANT_FRACTION))
            dom = min(dom, kb)
            ctx = kb - dom
            top = attn[b, :n].topk(max(dom - 1, 0)).indices  # [CLS] is the dominant set's first member
            is_dom = torch.zeros(n, dtype=torch.bool, device=feats.device)
            is_dom[top] = True
            rest = (~is_dom & is_patch[b, :n]).nonzero()[:, 0]
            slots, vals = [top], [feats[b, top]]
            if ctx > 0 and rest.numel() > 1:
                step = max(1, rest.numel() // ctx)
                tgt = rest[::step][:ctx]
                others = rest[~torch.isin(rest, tgt)]
                assign = (keys[b, others] @ keys[b, tgt].T).argmax(-1)
                summed = torch.zeros(tgt.numel(), feats.shape[-1], device=feats.device, dtype=feats.dtype)
                summed.index_add_(0, assign, feats[b, others])
                count = torch.bincount(assign, minlength=tgt.numel()).clamp_min(1)
                has = torch.bincount(assign, minlength=tgt.numel()) > 0
                ctx_vals = feats[b, tgt] + torch.where(has[:, None], summed / count[:, None], torch.zeros_like(summed))
                slots.append(tgt)
                vals.append(ctx_vals)
            used = torch.cat(slots)
            if dom >= 1:  # the [CLS] token, in the first slot no other kept token uses
                free = torch.ones(n, dtype=torch.bool, device=feats.device)
                free[used] = False
                if bool(free.any()):
                    slots.append(free.nonzero()[:1, 0])
                    vals.append(cls[b : b + 1])
            s, v = torch.cat(slots), torch.cat(vals)
            index[b, : s.numel()], values[b, : s.numel()] = s, v
        return Selection(indices=index, values=values, values_space="vision")


def _patch_tokens(state: PruneState) -> torch.Tensor:
    return token_patch_index(state) >= 0
