"""Independent references built from plain HF modules, for the engine's invariants."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def hf_hidden(model, batch: dict, layer: int) -> torch.Tensor:
    """Hidden states entering decoder layer ``layer`` of the plain HF model (0 = merged embeddings)."""
    out = model(**batch, output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer]


@torch.no_grad()
def hf_tail_logits(model, hidden: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, start: int) -> torch.Tensor:
    """Run the plain HF decoder layers ``start..`` (+ norm + lm_head) on given hidden states/positions."""
    lm = model.model.language_model
    layers, n = lm.layers, lm.config.num_hidden_layers
    try:
        lm.layers = nn.ModuleList(list(layers)[start:])
        lm.config.num_hidden_layers = n - start
        out = lm(inputs_embeds=hidden, position_ids=pos, attention_mask=valid.long(), use_cache=False)
    finally:
        lm.layers = layers
        lm.config.num_hidden_layers = n
    return model.lm_head(out.last_hidden_state)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return torch.gather(x, 1, idx)
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def site_layer(pruner, model) -> int:
    from learned_prune.engine import parse_site
    from learned_prune.engine.adapter import LlavaAdapter

    sites = pruner.sites(LlavaAdapter(model))
    assert len(sites) == 1
    return parse_site(sites[0], len(model.model.language_model.layers)), sites[0]


@torch.no_grad()
def pooled_embeddings(model, batch: dict, rows: int, cols: int, h: int, w: int) -> torch.Tensor:
    """Projector(avg-pooled base-view patch features), (B, h*w, D): the pool baseline by hand."""
    pv = batch["pixel_values"]
    base = pv[:, 0] if pv.dim() == 5 else pv
    hs = model.model.vision_tower(base, output_hidden_states=True).hidden_states[-2][:, 1:]
    B, _, D = hs.shape
    grid = hs.reshape(B, rows, cols, D).permute(0, 3, 1, 2)
    pooled = nn.functional.adaptive_avg_pool2d(grid, (h, w)).flatten(2).transpose(1, 2)
    return model.model.multi_modal_projector(pooled)
