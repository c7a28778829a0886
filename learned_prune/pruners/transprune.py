"""TransPrune: token transition variation + instruction-guided attention (Li et al., CVPR 2026, arXiv 2507.20630).

Code liaolea/TransPrune, ``llava/model/modeling_llama_transprune.py``
(``LlamaDecoderLayer_TransPrune.compute_transf_weight``, ``LlamaModel.transprune_rank_drop``), run with
``--accmulating_layer_list [7..12] --pruning_layer_list [7,9,12] --image_token_ratio_list [0.875,0.625,0.125]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..engine.state import LayerTrace, PruneState, Selection
from .base import Pruner
from .indices import topk_selection
from .stages import scale_layer, scale_layers, stage_counts

_KEY = "transprune_ttv"


def transition_variation(x_in: torch.Tensor, x_out: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """TTV of one sub-layer: (|x_out| / |x_in|) * softmax over tokens of (1 - cos(x_in, x_out)), (B, L).

    ``x_in`` is the sub-layer's normed input, ``x_out`` its branch output before the residual add;
    the softmax runs over each sample's ``valid`` tokens (text and image alike), 0 elsewhere.
    """
    x_in, x_out = x_in.float(), x_out.float()
    ratio = x_out.norm(dim=-1) / x_in.norm(dim=-1).clamp_min(1e-6)
    change = (1 - F.cosine_similarity(x_in, x_out, dim=-1)).masked_fill(~valid, float("-inf"))
    return (ratio * change.softmax(-1)).masked_fill(~valid, 0)


@dataclass
class TransPrune(Pruner):
    """Progressive pruning by how much each token's representation *moves* through the layers, plus
    how much the instruction attends to it.

    Token transition variation (TTV, :func:`transition_variation`) is taken for both sub-layers of a
    decoder layer: ``input_layernorm(h)`` against the attention output, and
    ``post_attention_layernorm(h + attn)`` against the MLP output (each branch before its residual
    add); the two are added and summed over the accumulating layers — paper layers 7..12 (1-based,
    i.e. the layers just before the sites ``llm:7..llm:12``), scaled by depth. Instruction-guided
    attention (IGA) is the softmax attention of every instruction token (the prompt after the image)
    onto each visual token, mean over heads then over queries, computed with the projections of the
    layer the tokens enter next (``score_layer="current"``). At each pruning site ``llm:7/9/12``
    (scaled) the score is ``TTV / (sum TTV + 1e-8) + IGA / (sum IGA + 1e-8)`` over the visual tokens;
    the top-k are kept in sequence order, the accumulated TTV follows the kept tokens, and positions
    are re-packed to be contiguous (``repack_positions=True``; decoding continues after the shortened
    prompt).

    Departures:

    - Stage counts follow the project's budget rule (:func:`.schedule.stage_counts`): ``keep``
      tokens reach the layers after the last stage and earlier stages keep the paper's proportions
      0.875/0.625/0.125 of that; for ``keep=0.125`` of 576 tokens these are the official 504/360/72.
      The official code floors ``n * ratio`` at each stage instead, which differs by a token when
      ``n * ratio`` is fractional.
    - IGA rows are rebuilt from the layer's q/k projections of the instruction rows only (SDPA stays
      on; no attention matrix is materialised) — the same softmax rows the official code computes.
    - ``score_layer="previous"`` (option) takes IGA from the layer *before* each site, with the keys
      captured during its forward pass: cheaper (no extra k_proj over the whole sequence per stage),
      not the official next-layer attention.
    - A batch is scored per sample (the official code runs one sample at a time; its TTV softmax
      would span the whole batch).
    """

    accumulate: tuple[int, int] = (7, 12)
    layers: tuple[int, ...] = (7, 9, 12)
    ratios: tuple[float, ...] = (0.875, 0.625, 0.125)
    score_layer: str = "current"
    repack_positions: bool | None = field(default=True, kw_only=True)

    def _layers(self, depth: int) -> list[int]:
        return scale_layers(depth, self.layers)

    def sites(self, adapter) -> list[str]:
        return [f"llm:{k}" for k in self._layers(adapter.num_layers)]

    def observe_layers(self, adapter) -> list[int]:
        """0-based layers whose TTV accumulates: paper layers ``accumulate`` (1-based), scaled by depth,
        from at most the layer before the first site to the layer before the last site."""
        n = adapter.num_layers
        sites = self._layers(n)
        first = min(max(0, scale_layer(self.accumulate[0], n) - 1), sites[0] - 1)
        last = sites[-1] - 1  # the paper's lists end together (12); scaled, the last site may have moved up
        if self.accumulate[1] < self.layers[-1]:
            last = min(last, max(first, scale_layer(self.accumulate[1], n) - 1))
        return list(range(first, last + 1))

    def prepare(self, adapter) -> None:
        if len(self.layers) != len(self.ratios):
            raise ValueError("TransPrune needs one ratio per pruning layer")
        if self.score_layer not in ("previous", "current"):
            raise ValueError(f"TransPrune score_layer must be 'current' or 'previous', got {self.score_layer!r}")
        self._layers(adapter.num_layers)

    def observe(self, layer: int, trace: LayerTrace, state: PruneState) -> None:
        """Add this layer's TTV (both sub-layers) to each token's running sum in ``state.extras``."""
        p = state.token_keep_prob
        valid = state.prompt_valid if p is None else state.prompt_valid & (p > 0)
        ttv = transition_variation(trace.attn_in, trace.attn_out, valid)
        ttv = ttv + transition_variation(trace.mlp_in, trace.mlp_out, valid)
        state.extras[_KEY] = state.extras.get(_KEY, torch.zeros_like(ttv)) + ttv

    def score(self, state: PruneState) -> torch.Tensor:
        """``TTV / sum(TTV) + IGA / sum(IGA)`` over each sample's visual tokens, (B, Nv)."""
        alive = state.visual_valid if state.keep_prob is None else state.visual_valid & (state.keep_prob > 0)
        ttv = torch.gather(state.extras[_KEY], 1, state.visual_pos).masked_fill(~alive, 0)
        iga = state.attention("instruction", layer=self.score_layer).float().masked_fill(~alive, 0)
        return ttv / (ttv.sum(1, keepdim=True) + 1e-8) + iga / (iga.sum(1, keepdim=True) + 1e-8)

    def select(self, state: PruneState) -> Selection:
        stage = self._layers(state.llm_depth).index(state.layer)
        k = stage_counts(self.keep, state.n_visual_original, self.ratios)[stage].clamp(max=state.n_visual)
        return Selection(indices=topk_selection(self.score(state), state.visual_valid, k))
