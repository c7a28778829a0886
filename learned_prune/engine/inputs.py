"""What the engine learns from the inputs of one LLaVA call: which rows are visual and which images fed them.

The inner LLaVA model's pre-hook calls :func:`visual_rows` on ``input_ids`` (or, without them, on
``inputs_embeds`` by HF's own rule: rows equal to the ``<image>`` token's embedding).
``generate()`` encodes the images once and, for beam search or ``num_return_sequences``, repeats
each prompt's images in the pre-encoded outputs: :func:`follow_expansion` repeats the engine's
record of them (tower hidden states, image sizes) the same way. With ``use_cache=False`` every
step re-reads the whole sequence, so a generated token that is the ``<image>`` id would look like a
placeholder: :func:`generated_image_tokens` finds such tokens, which the engine embeds as text, as
the cached path does.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .vision import VisionCapture


def visual_rows(
    image_token_id: int, embed: torch.nn.Module, ids: torch.Tensor | None, embeds: torch.Tensor | None, images: bool
) -> torch.Tensor | None:
    """(B, L) bool: the image placeholders of this call, or None when they cannot be known.

    From ``ids`` when given; else from ``embeds`` when images come with them (``images``), by HF's
    own rule (a row equal to the ``<image>`` token's embedding is a placeholder). ``embeds`` without
    images may already hold image features, so their visual rows are unknown (None).
    """
    if ids is not None:
        return ids == image_token_id
    if embeds is None or not images:
        return None
    token = embed(torch.full((), image_token_id, dtype=torch.long, device=embeds.device))
    return (embeds == token.to(embeds.dtype)).all(-1)


def follow_expansion(vision: VisionCapture, pooled: Any) -> VisionCapture:
    """The capture of the images behind ``pooled`` (the pre-encoded ``pooler_output`` as it reaches the forward).

    ``generate()`` repeats each prompt's image group for beam search and ``num_return_sequences``
    (the same tensor objects, in a longer list): each entry is matched to the image it repeats, and
    the tower hidden states (per tile) and image sizes are repeated in that order.
    """
    if not isinstance(pooled, (list, tuple)) or [id(t) for t in pooled] == [id(t) for t in vision.features]:
        return vision
    where = {id(t): i for i, t in enumerate(vision.features)}
    if any(id(t) not in where for t in pooled):
        raise RuntimeError(
            "the pre-encoded image features (mm_encoder_outputs) no longer hold the tensors the pruning engine saw "
            "encoded: pass pixel_values to generate()/the model inside the `with pruner(model):` block and let it "
            "encode the images there"
        )
    order = [where[id(t)] for t in pooled]
    start = [0]
    for n in vision.tiles:
        start.append(start[-1] + n)
    tiles = [vision.tiles[i] for i in order]
    tile_index = torch.cat([torch.arange(start[i], start[i + 1]) for i in order]) if order else torch.zeros(0).long()
    hidden = None
    if vision.hidden_states is not None:
        hidden = tuple(h[tile_index.to(h.device)] for h in vision.hidden_states)
    sizes = vision.image_sizes
    if isinstance(sizes, torch.Tensor):
        sizes = sizes[torch.tensor(order, device=sizes.device)]
    elif sizes is not None:
        sizes = [sizes[i] for i in order]
    pixels = None if vision.pixels is None else vision.pixels[tile_index.to(vision.pixels.device)]
    return replace(vision, n_features=sum(int(t.shape[0]) for t in pooled), hidden_states=hidden,
                   n_tiles=int(tile_index.numel()), image_sizes=sizes, features=list(pooled), tiles=tiles,
                   pixels=pixels)


def generated_image_tokens(
    visual: torch.Tensor, ids: torch.Tensor | None, prompt: torch.Tensor | None, n_features: int
) -> torch.Tensor | None:
    """(B, L) bool: ``<image>`` ids generated after ``prompt`` (the last prompt whose placeholders matched the
    images), when ``ids`` continue that prompt and its placeholders alone match the ``n_features`` image
    features; None otherwise (the caller then reports a mismatch)."""
    if ids is None or prompt is None or ids.dim() != 2 or prompt.shape[0] != ids.shape[0]:
        return None
    L0 = prompt.shape[1]
    if ids.shape[1] <= L0 or not torch.equal(ids[:, :L0], prompt.to(ids.device)):
        return None
    if int(visual[:, :L0].sum()) != n_features:
        return None
    extra = visual.clone()
    extra[:, :L0] = False
    return extra
