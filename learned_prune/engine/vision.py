"""Vision-tower signals for the ``vision`` site, computed from the hidden states the tower already
returns to the backbone (the engine asks it for all of them): [CLS] attention rows and keys rebuilt
from a layer's own projections (the tower keeps its SDPA attention), per-tile features, and where
each visual token of the LLM's sequence comes from (tile, patch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .state import PruneState


@dataclass
class VisionCapture:
    """What the engine keeps of one call of ``get_image_features``: the number of visual features it
    gave, every hidden state of the tower (None when no pruner acts at the vision site), the number of
    encoded tiles, the ``image_sizes`` argument (LLaVA-NeXT), per image its feature tensor (the
    object ``generate()`` repeats for beam search) and its number of tiles, and the pixel values of
    every encoded tile (T, C, H, W) as the tower read them (None when no pruner acts at the vision site)."""

    n_features: int
    hidden_states: tuple[torch.Tensor, ...] | None
    n_tiles: int
    image_sizes: Any
    features: list = field(default_factory=list)
    tiles: list[int] = field(default_factory=list)
    pixels: torch.Tensor | None = None


def stack_tiles(pixel_values: Any, tiles: list[int]) -> torch.Tensor | None:
    """``get_image_features``' pixel values as one (T, C, H, W) tensor of encoded tiles (LLaVA-NeXT's padded
    (N, max_tiles, C, H, W) input keeps each image's first ``tiles[i]`` tiles); None for anything else."""
    if not isinstance(pixel_values, torch.Tensor):
        return None
    if pixel_values.dim() == 5:
        return torch.cat([p[:n] for p, n in zip(pixel_values, tiles)])
    return pixel_values


def tile_pixels(state: "PruneState") -> torch.Tensor:
    """Pixel values of every encoded tile, (T, C, H, W), as the vision tower read them."""
    v = _vision(state)
    if v.pixels is None:
        raise ValueError("the pixel values of this forward pass were not captured (get_image_features got no tensor)")
    return v.pixels


def _vision(state: "PruneState") -> VisionCapture:
    if state.site != "vision":
        raise ValueError(f"vision-tower signals are only available at the 'vision' site, not {state.site}")
    if not state.adapter.signals:
        raise ValueError(f"the vision tower of a {state.adapter.family} backbone gives no signals to pruners: "
                         f"{state.adapter.no_signal}")
    if state.vision is None:
        raise ValueError("no image was encoded in this forward pass: vision signals need pixel_values")
    return state.vision


def token_patch_index(state: "PruneState") -> torch.Tensor:
    """Flat vision-patch index (tile * P + patch) of each current visual token, (B, Nv); -1 for newlines."""
    if "patch_index" not in state.cache:
        v = _vision(state)
        sources = state.adapter.token_sources(v.n_tiles, v.image_sizes).to(state.visual_pos.device)
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


def _layer_input(state: "PruneState", layer: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """(encoder layer ``layer``, its normed input ``layer_norm1(h)``) for every tile."""
    v = _vision(state)
    layers = state.adapter.vision_layers()
    n = len(layers)
    if not -n <= layer < n:
        raise ValueError(f"vision layer {layer} out of range for a tower with {n} layers")
    block = layers[layer % n]
    return block, block.layer_norm1(v.hidden_states[layer % n])


def tile_cls_attention(state: "PruneState", layer: int = -2, heads: str = "mean") -> torch.Tensor:
    """[CLS]->patch attention of vision encoder layer ``layer`` for every encoded tile, (T, P) float32.

    ``heads``: ``"mean"`` or ``"sum"`` over the attention heads. The row is rebuilt from the layer's
    own ``layer_norm1``, ``q_proj`` and ``k_proj`` (softmax of the scaled [CLS] query against all
    keys), so the tower keeps its SDPA attention; it equals ``attentions[layer][:, :, 0, 1:]`` of an
    eager run with ``output_attentions=True``.
    """
    key = ("tile_cls_attention", layer, heads)
    if key not in state.cache:
        block, x = _layer_input(state, layer)
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
        block, x = _layer_input(state, layer)
        attn = block.self_attn
        T, N, _ = x.shape
        state.cache[key] = attn.k_proj(x).view(T, N, attn.num_heads, attn.head_dim).mean(2)
    return state.cache[key]


def encode_pixels(state: "PruneState", pixels: torch.Tensor) -> torch.Tensor:
    """The vision tower re-run on ``pixels`` (N, C, H, W), H and W multiples of the patch size, with its
    position embeddings interpolated to that grid; the features at the backbone's feature layer(s)
    after its select strategy ('default' drops [CLS]), as LLaVA feeds its projector, (N, tokens, Dv)."""
    a = state.adapter
    tower = a.vision_tower
    out = tower(pixels.to(tower.dtype), output_hidden_states=True, interpolate_pos_encoding=True)
    layers = [a.feature_layer] if isinstance(a.feature_layer, int) else list(a.feature_layer)
    feats = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
    return feats[:, 1:] if a.select_strategy == "default" else feats


def tile_hidden(state: "PruneState", layer: int | None = None) -> torch.Tensor:
    """Vision hidden states of every tile, [CLS] first, (T, N, Dv), at hidden-state index ``layer``
    (default: the backbone's feature layer, the one LLaVA feeds its projector)."""
    v = _vision(state)
    layer = state.adapter.feature_layer if layer is None else layer
    if not isinstance(layer, int):
        raise ValueError("vision features need a single feature layer")
    return v.hidden_states[layer]


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
        adapter = state.adapter
        P = adapter.patch_grid[0] * adapter.patch_grid[1]
        if adapter.is_next:
            from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

            pins, size = adapter.config.image_grid_pinpoints, adapter.vision_config.image_size
            images = []
            for s, n in zip(v.image_sizes, adapter.tiles_per_image(v.image_sizes)):
                grid = tuple(int(g) for g in get_anyres_image_grid_shape(s, pins, size))
                images.append((n, grid, adapter.token_sources(n, s[None]).numel()))
        else:
            images = [(1, None, P)] * v.n_tiles
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
    return _per_token(state, tile_hidden(state, layer)[:, 1:])


def vision_keys(state: "PruneState", layer: int = -1) -> torch.Tensor:
    """Head-mean keys of vision encoder layer ``layer`` per visual token, (B, Nv, head_dim); zeros for newlines."""
    return _per_token(state, tile_keys(state, layer)[:, 1:])
