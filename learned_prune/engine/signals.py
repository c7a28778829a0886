"""Signals pruners ask for, computed from just the rows they need (SDPA stays on everywhere).

LLM attention rows are rebuilt from a layer's own ``input_layernorm``, ``q_proj`` and RoPE for
the requested query rows only, against keys captured from that layer's ``k_proj`` during the
forward pass (layer K-1) or projected once (layer K). Vision signals are computed from the
hidden states the vision tower already returns to the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

if TYPE_CHECKING:  # pragma: no cover
    from .state import PruneState


def _row_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = mask.sum(1)
    r = max(int(counts.max()), 1)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :r]
    valid = torch.arange(r, device=mask.device)[None] < counts[:, None]
    return order, valid


def _query_mask(state: "PruneState", queries: str | torch.Tensor) -> torch.Tensor:
    seq = state.seq
    if isinstance(queries, torch.Tensor):
        return queries.bool() & seq.valid
    L = seq.valid.shape[1]
    if queries == "last":
        idx = torch.arange(L, device=seq.valid.device).expand_as(seq.valid)
        last = torch.where(seq.prompt_valid, idx, torch.full_like(idx, -1)).amax(1, keepdim=True)
        return idx == last  # the last prompt token (teacher-forced answers excluded)
    if queries == "instruction":
        mask = seq.instruction_mask()
        if bool((mask.sum(1) == 0).any()):  # no text after the image: fall back to the last token
            return mask | _query_mask(state, "last") & (mask.sum(1, keepdim=True) == 0)
        return mask
    raise ValueError(f"queries must be 'last', 'instruction' or a (B, L) bool mask, got {queries!r}")


def _layer_inputs(state: "PruneState", layer: str) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(layer index, its input hidden states, its k_proj output) for ``layer`` in {previous, current}."""
    lm = state.engine.adapter.lm
    seq = state.seq
    if layer == "previous":
        if state.layer < 1 or seq.prev_input is None:
            raise ValueError(f"attention of the previous layer needs a site llm:K with K >= 1, got {state.site}")
        idx, x, k = state.layer - 1, seq.prev_input, seq.prev_keys
    elif layer == "current":
        idx, x, k = state.layer, seq.hidden, None
    else:
        raise ValueError(f"layer must be 'previous' or 'current', got {layer!r}")
    if k is None:
        block = lm.layers[idx]
        k = block.self_attn.k_proj(block.input_layernorm(x))
    return idx, x, k


def _rope_keys(state: "PruneState", k: torch.Tensor, attn) -> torch.Tensor:
    B, L = k.shape[:2]
    k = k.view(B, L, -1, attn.head_dim).transpose(1, 2)
    cos, sin = state.engine.adapter.lm.rotary_emb(k, state.seq.pos)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k


def previous_layer_keys(state: "PruneState") -> torch.Tensor:
    """Post-RoPE keys of layer K-1, (B, H_kv, L, head_dim)."""
    idx, _, k = _layer_inputs(state, "previous")
    return _rope_keys(state, k, state.engine.adapter.lm.layers[idx].self_attn)


def llm_attention(state: "PruneState", queries: str | torch.Tensor, layer: str) -> torch.Tensor:
    """Head-mean softmax attention from the chosen query rows onto each visual token, (B, Nv)."""
    lm = state.engine.adapter.lm
    seq = state.seq
    idx, x, k = _layer_inputs(state, layer)
    block = lm.layers[idx]
    attn = block.self_attn
    qmask = _query_mask(state, queries)
    qpos, qvalid = _row_positions(qmask)
    B, R = qpos.shape
    rows = torch.gather(x, 1, qpos.unsqueeze(-1).expand(B, R, x.shape[-1]))
    q = attn.q_proj(block.input_layernorm(rows)).view(B, R, -1, attn.head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(q, torch.gather(seq.pos, 1, qpos))
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    keys = _rope_keys(state, k, attn)
    keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
    scores = (q.float() @ keys.float().transpose(-1, -2)) * attn.scaling  # (B, H, R, L)
    L = keys.shape[2]
    allowed = seq.valid[:, None, :] & (torch.arange(L, device=q.device)[None, None] <= qpos[:, :, None])
    allowed = allowed | ~qvalid[:, :, None]  # padded query rows: harmless values, weighted by 0 below
    if seq.keep_prob is not None:
        scores = scores + torch.log(seq.keep_prob.float() + state.engine.soft_eps)[:, None, None, :]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = scores.softmax(-1).mean(1)  # (B, R, L)
    probs = torch.where(qvalid[..., None], probs, 0).sum(1) / qvalid.sum(1, keepdim=True).clamp_min(1)
    out = torch.gather(probs, 1, state.visual_pos)
    return out.masked_fill(~state.visual_valid, 0).to(x.dtype)


# ---- vision tower signals --------------------------------------------------------------------
def _vision(state: "PruneState") -> dict:
    if state.site != "vision":
        raise ValueError(f"vision-tower signals are only available at the 'vision' site, not {state.site}")
    v = state.engine._vision
    if v is None:
        raise ValueError("no image was encoded in this forward pass: vision signals need pixel_values")
    return v


def token_patch_index(state: "PruneState") -> torch.Tensor:
    """Flat vision-patch index (tile * P + patch) of each current visual token, (B, Nv); -1 for newlines."""
    if "patch_index" not in state.cache:
        v = _vision(state)
        sources = state.engine.adapter.token_sources(v["n_tiles"], v["image_sizes"]).to(state.visual_pos.device)
        n0 = state.n_visual_original
        start = torch.cumsum(n0, 0) - n0
        flat = (start[:, None] + state.visual_source).clamp(max=sources.numel() - 1)
        idx = sources[flat]
        state.cache["patch_index"] = torch.where(state.visual_valid, idx, torch.full_like(idx, -1))
    return state.cache["patch_index"]


def _per_token(state: "PruneState", per_patch: torch.Tensor) -> torch.Tensor:
    """Map a (n_tiles, P, ...) per-patch tensor onto the current visual tokens, zeros for newlines."""
    flat = per_patch.reshape(-1, *per_patch.shape[2:])
    idx = token_patch_index(state)
    out = flat[idx.clamp_min(0)]
    keep = (idx >= 0).view(*idx.shape, *([1] * (out.dim() - 2)))
    return out * keep.to(out.dtype)


def _layer_index(state: "PruneState", layer: int) -> int:
    n = len(state.engine.adapter.vision_layers())
    if not -n <= layer < n:
        raise ValueError(f"vision layer {layer} out of range for a tower with {n} layers")
    return layer % n


def tile_cls_attention(state: "PruneState", layer: int = -2, heads: str = "mean") -> torch.Tensor:
    """[CLS]->patch attention of vision encoder layer ``layer`` for every encoded tile, (T, P) float32.

    ``heads``: ``"mean"`` or ``"sum"`` over the attention heads. The row is rebuilt from the layer's
    own ``layer_norm1``, ``q_proj`` and ``k_proj`` (softmax of the scaled [CLS] query against all
    keys), so the tower keeps its SDPA attention; it equals ``attentions[layer][:, :, 0, 1:]`` of an
    eager run with ``output_attentions=True``.
    """
    key = ("tile_cls_attention", layer, heads)
    if key not in state.cache:
        v = _vision(state)
        li = _layer_index(state, layer)
        block = state.engine.adapter.vision_layers()[li]
        x = block.layer_norm1(v["hidden_states"][li])  # the input of encoder layer li
        attn = block.self_attn
        T, N, _ = x.shape
        q = attn.q_proj(x[:, :1]).view(T, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(T, N, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = ((q.float() @ k.float().transpose(-1, -2)) * attn.scale).softmax(-1)[:, :, 0, 1:]  # (T, H, P)
        state.cache[key] = probs.mean(1) if heads == "mean" else probs.sum(1)
    return state.cache[key]


def cls_attention(state: "PruneState", layer: int = -2) -> torch.Tensor:
    """[CLS]->patch attention of vision encoder layer ``layer``, head mean, per visual token (B, Nv)."""
    probs = tile_cls_attention(state, layer)
    return _per_token(state, probs).to(state.hidden.dtype)


def tile_keys(state: "PruneState", layer: int = -1) -> torch.Tensor:
    """Head-mean keys of vision encoder layer ``layer`` for every token of every tile, [CLS] first, (T, N, head_dim)."""
    key = ("tile_keys", layer)
    if key not in state.cache:
        v = _vision(state)
        li = _layer_index(state, layer)
        block = state.engine.adapter.vision_layers()[li]
        x = block.layer_norm1(v["hidden_states"][li])
        attn = block.self_attn
        T, N, _ = x.shape
        state.cache[key] = attn.k_proj(x).view(T, N, attn.num_heads, attn.head_dim).mean(2)
    return state.cache[key]


def tile_hidden(state: "PruneState", layer: int | None = None) -> torch.Tensor:
    """Vision hidden states of every tile, [CLS] first, (T, N, Dv), at hidden-state index ``layer``
    (default: the backbone's feature layer, the one LLaVA feeds its projector)."""
    v = _vision(state)
    layer = state.engine.adapter.feature_layer if layer is None else layer
    if not isinstance(layer, int):
        raise ValueError("tile_hidden needs a single feature layer")
    return v["hidden_states"][layer]


@dataclass(frozen=True)
class ImageTiles:
    """One image of a sample: its tiles among the encoded ones and its tokens among the sample's visual tokens.

    ``first_tile``: index of its base tile (LLaVA-NeXT: the global view; its crops follow), ``n_tiles``:
    1 + number of crops, ``grid``: (rows, cols) of the crop tiles (None for LLaVA-1.5), ``start`` and
    ``count``: where its tokens (patches and newline tokens) stand among the sample's visual tokens.
    """

    first_tile: int
    n_tiles: int
    grid: tuple[int, int] | None
    start: int
    count: int


def image_tiles(state: "PruneState") -> list[list[ImageTiles]]:
    """For each sample, its images in order (:class:`ImageTiles`), from the image sizes and grid pinpoints."""
    if "image_tiles" not in state.cache:
        v = _vision(state)
        adapter = state.engine.adapter
        P = adapter.patch_grid[0] * adapter.patch_grid[1]
        if adapter.is_next:
            from transformers.models.llava_next.modeling_llava_next import (
                get_anyres_image_grid_shape,
                image_size_to_num_patches,
            )

            pins, size = adapter.config.image_grid_pinpoints, adapter.vision_config.image_size
            images = []
            for s in v["image_sizes"]:
                n = image_size_to_num_patches(image_size=s, grid_pinpoints=pins, patch_size=size)
                grid = tuple(int(g) for g in get_anyres_image_grid_shape(s, pins, size))
                images.append((n, grid, adapter.token_sources(n, s[None]).numel()))
        else:
            images = [(1, None, P)] * v["n_tiles"]
        out: list[list[ImageTiles]] = []
        it, tile = iter(images), 0
        for n_b in state.n_visual_original.tolist():
            sample, start = [], 0
            while start < n_b:
                n, grid, count = next(it)
                sample.append(ImageTiles(tile, n, grid, start, count))
                tile, start = tile + n, start + count
            out.append(sample)
        state.cache["image_tiles"] = out
    return state.cache["image_tiles"]


def vision_features(state: "PruneState", layer: int | None = None) -> torch.Tensor:
    """Pre-projector patch features at hidden-state index ``layer`` (default: the backbone's feature layer)."""
    v = _vision(state)
    layer = state.engine.adapter.feature_layer if layer is None else layer
    if not isinstance(layer, int):
        raise ValueError("vision_features needs a single feature layer")
    return _per_token(state, v["hidden_states"][layer][:, 1:])


def vision_keys(state: "PruneState", layer: int = -1) -> torch.Tensor:
    """Head-mean keys of vision encoder layer ``layer`` per visual token, (B, Nv, head_dim); zeros for newlines."""
    return _per_token(state, tile_keys(state, layer)[:, 1:])
