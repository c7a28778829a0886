"""Decoder layers run on given hidden states: the public entry point for passes that re-run part of the LLM.

DyVTE's label pass compares the model with and without the visual tokens from layer l on: the layers
before l are the same in both runs, so the run without them starts from the full run's hidden states
entering layer l (``output_hidden_states=True`` of a plain forward) and takes only the kept rows
through layers l..L-1. :func:`run_layers` does that with the engine's own masks (for the model's
attention implementation), no hooks, no KV cache and no pruning sites.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .families import adapter_for
from .masks import build_mask, mask_kind
from .tokens import compact_index, gather_rows


@dataclass
class SegmentOutput:
    """What :func:`run_layers` returns: the hidden states leaving the last layer run (B, L', D), the
    row of the input each slot holds (B, L') and which slots hold a real row (B, L'; the others are
    left padding)."""

    hidden: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor


def run_layers(
    model: nn.Module,
    hidden: torch.Tensor,
    valid: torch.Tensor,
    start: int = 0,
    end: int | None = None,
    keep: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    final_norm: bool = False,
) -> SegmentOutput:
    """Run decoder layers ``start .. end - 1`` of ``model``'s LLM on ``hidden`` (B, L, D), the hidden states
    entering layer ``start``.

    ``valid`` (B, L): real rows (False on padding). ``keep`` (B, L), optional: the rows to run (the
    others are dropped before layer ``start``, as a hard prune there would; padding is always dropped).
    ``position_ids`` (B, L): RoPE positions of the input rows (a multimodal-RoPE family also takes HF's
    (3, B, L) ids); default: a row's index in the input sequence, as in a plain forward without position ids. ``final_norm``: apply the LLM's final norm
    to the output (then ``model.lm_head(out.hidden)`` gives the logits). ``end`` defaults to the depth.
    Runs under the caller's grad mode; the model needs no engine installed.
    """
    adapter = adapter_for(model)
    lm = adapter.lm
    end = adapter.num_layers if end is None else end
    if not 0 <= start <= end <= adapter.num_layers:
        raise ValueError(f"run_layers: need 0 <= start <= end <= {adapter.num_layers}, got start={start}, end={end}")
    rows = valid.bool() if keep is None else valid.bool() & keep.bool()
    index, slot_valid = compact_index(rows)
    h = gather_rows(hidden, index)
    B, L = rows.shape
    pos = gather_rows(adapter.prefill_positions(position_ids, B, L, index.device), index)
    kind = mask_kind(lm.config._attn_implementation, "hard")
    mask = build_mask(slot_valid, None, h.shape[1], h.dtype, kind)
    rope = adapter.rope(h, pos)
    for block in lm.layers[start:end]:
        h = block(h, attention_mask=mask, position_ids=adapter.layer_position_ids(pos), past_key_values=None,
                  use_cache=False, position_embeddings=rope)
    return SegmentOutput(hidden=lm.norm(h) if final_norm else h, index=index, valid=slot_valid)
