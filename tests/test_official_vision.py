"""The vision-site methods select what their official code selects, on both families, batch of 3.

Each reference below re-states the official rule from plain HF outputs: an eager copy of the model
(``copy.deepcopy`` + ``set_attn_implementation("eager")``) runs the vision tower on the real tiles
with ``output_attentions=True`` and ``output_hidden_states=True`` (a hook on ``k_proj`` gives the
keys the official code reads), and HF's own ``pack_image_features`` gives LLaVA-NeXT's token
layout. Sources read: Theia-4869/FasterVLM ``llava/model/llava_arch.py`` (``encode_images``,
``prepare_inputs_labels_for_multimodal``, whose ``mm_patch_merge_type`` is hard-coded to
``'spatial'``), THU-MIG/VTC-CLS ``clip_encoder.py::cls_token_only`` + ``llava_arch.encode_images``,
dvlab-research/VisionZip ``visionzip/clip_encoder.py``, ``utils.py`` and ``llava_arch.py``,
facebookresearch/ToMe ``tome/merge.py``, LaVi-Lab/AIM ``llava/model/token_merge.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

from learned_prune import load_pruner

from conftest import get_tiny, make_batch
from helpers import hf_hidden, record_selections
from test_merging_batched import ref_merge

FAMILIES = ["llava", "llava_next"]
_EAGER: dict = {}


# ---- plain-HF inputs for the references ------------------------------------------------------------
def _eager(family):
    if family not in _EAGER:
        model, _ = get_tiny(family)
        eager = copy.deepcopy(model)
        eager.set_attn_implementation("eager")
        _EAGER[family] = eager
    return _EAGER[family]


@torch.no_grad()
def _tower(family, batch):
    """Eager tower outputs on the real tiles, the per-layer head-mean keys, and each image's
    (number of tiles, (grid rows, grid cols)) — one image per sample here."""
    model = _eager(family)
    cfg, pv = model.config, batch["pixel_values"]
    if pv.dim() == 4:
        tiles, images = pv, [(1, None)] * pv.shape[0]
    else:
        images = []
        for s in batch["image_sizes"]:
            n = image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=cfg.vision_config.image_size)
            grid = get_anyres_image_grid_shape(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            images.append((n, tuple(grid)))
        tiles = torch.cat([p[:n] for p, (n, _) in zip(pv, images)])
    tower = model.model.vision_tower
    keys, hooks = {}, []
    for i, layer in enumerate(tower.encoder.layers):
        hooks.append(layer.self_attn.k_proj.register_forward_hook(lambda m, a, o, i=i: keys.__setitem__(i, o)))
    try:
        out = tower(tiles, output_hidden_states=True, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    H = tower.config.num_attention_heads
    keys = [keys[i].view(*keys[i].shape[:2], H, -1).mean(2) for i in range(len(keys))]  # the official `metric`
    return out, keys, images


def _tile_starts(images):
    starts, t = [], 0
    for n, _ in images:
        starts.append(t)
        t += n
    return starts


def _crop_order(mask, grid, side):
    """FasterVLM's 'spatial' merge of the crops: (tile - 1, patch) of the kept crop patches in the
    order of ``view(rows, cols, side, side).permute(0, 2, 1, 3).flatten()``."""
    rows, cols = grid
    P = side * side
    flat = torch.arange(rows * cols * P).view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(-1)
    kept = flat[mask.reshape(-1)[flat]]
    return kept // P, kept % P


def _check_rows(sel, b, want_tile, want_token, want_values, atol=1e-5):
    k = len(want_tile)
    assert sel.indices[b, :k].tolist() == list(range(k)) and bool((sel.indices[b, k:] == -1).all())
    assert sel.info["tile"][b, :k].tolist() == want_tile
    assert sel.info["token"][b, :k].tolist() == want_token
    torch.testing.assert_close(sel.values[b, :k].float(), want_values.float(), atol=atol, rtol=0)


# ---- FasterVLM and VTC-CLS ------------------------------------------------------------------------
def _cls_score(out, layers):
    return sum(out.attentions[i][:, :, 0, 1:].mean(1) for i in layers)  # (T, P) head mean, summed


def _ref_cls_selection(family, batch, sel, scores, keep, images, feats, side):
    """Official FasterVLM on LLaVA-1.5 (top-k, raster order) and on LLaVA-NeXT (top keep // n_tiles
    per tile; base kept patches, then the crops' in 'spatial' order; no newline)."""
    starts = _tile_starts(images)
    for b, ((n, grid), t0) in enumerate(zip(images, starts)):
        if family == "llava":
            want = scores[t0].topk(keep).indices.sort().values
            assert sel.indices[b, :keep].tolist() == want.tolist()
            continue
        kt = keep // n
        mask = torch.zeros(n, side * side, dtype=torch.bool)
        mask.scatter_(1, scores[t0 : t0 + n].topk(kt, dim=1).indices, True)
        base = mask[0].nonzero()[:, 0]
        crop_t, crop_p = _crop_order(mask[1:], grid, side)
        tile = [t0] * base.numel() + (t0 + 1 + crop_t).tolist()
        token = (base + 1).tolist() + (crop_p + 1).tolist()
        _check_rows(sel, b, tile, token, feats[tile, token])
        assert len(tile) == n * kt


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["fastervlm", "vtc_cls"])
def test_cls_attention_methods_equal_official(family, name):
    model, processor = get_tiny(family)
    batch = make_batch(processor, 3)
    keep = 12 if family == "llava" else 36
    pruner = load_pruner(name, keep=keep)
    records = record_selections(pruner)
    with pruner(model):
        model(**batch)
    sel = records[0][2]
    out, _, images = _tower(family, batch)
    n = len(out.attentions)
    layers = [n - 2] if name == "fastervlm" else range(min(round(n * 16 / 24), n - 2), n - 1)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    _ref_cls_selection(family, batch, sel, _cls_score(out, layers), keep, images, out.hidden_states[-2], side)


# ---- VisionZip ---------------------------------------------------------------------------------------
def _ref_visionzip_tiles(out, keys, tiles, dom, ctx):
    """CLIPVisionTower_VisionZip.forward on a batch of tiles: per tile [CLS, dominant, contextual]
    values and the (token) id of each (a contextual token is named by its target)."""
    attn, hidden, metric = out.attentions[-2][tiles], out.hidden_states[-2][tiles], keys[-2][tiles]
    T, N, D = hidden.shape
    top = attn[:, :, 0, 1:].sum(1).topk(dom - 1, dim=1).indices + 1
    all_idx = torch.cat([torch.zeros(T, 1, dtype=torch.long), top], 1)
    mask = torch.ones(T, N, dtype=torch.bool).scatter_(1, all_idx, False)
    dominant = hidden[~mask].view(T, dom, D)
    dominant_ids = (~mask).nonzero()[:, 1].view(T, dom)
    rest_ids = mask.nonzero()[:, 1].view(T, N - dom)
    m = metric[mask].view(T, N - dom, -1)
    m = m / m.norm(dim=-1, keepdim=True)
    h = hidden[mask].view(T, N - dom, D)
    step = max(1, m.shape[1] // ctx)
    target = torch.arange(0, m.shape[1], step)[:ctx]
    others = ~torch.isin(torch.arange(m.shape[1]), target)
    sim = torch.bmm(m[:, others], m[:, target].transpose(1, 2))
    one_hot = torch.zeros(T, int(others.sum()), ctx).scatter_(2, sim.argmax(2, keepdim=True), 1)
    counts = one_hot.sum(1).clamp(min=1).unsqueeze(-1)
    contextual = h[:, target] + torch.bmm(one_hot.transpose(1, 2), h[:, others]) / counts
    return dominant, dominant_ids, contextual, rest_ids[:, target]


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_visionzip_equals_official(family):
    model, processor = get_tiny(family)
    batch = make_batch(processor, 3)
    keep = 20 if family == "llava" else 60
    pruner = load_pruner("visionzip", keep=keep)
    records = record_selections(pruner)
    with pruner(model):
        model(**batch)
    sel = records[0][2]
    out, keys, images = _tower(family, batch)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    for b, ((n, grid), t0) in enumerate(zip(images, _tile_starts(images))):
        share = keep // n
        dom = round(share * 54 / 64)
        tiles = list(range(t0, t0 + n))
        dominant, dom_ids, contextual, ctx_ids = _ref_visionzip_tiles(out, keys, tiles, dom, share - dom)
        # base tile (LLaVA-1.5: the image): [CLS, dominant..., contextual...]
        tile = [t0] * (dom + contextual.shape[1])
        token = dom_ids[0].tolist() + ctx_ids[0].tolist()
        values = [dominant[0], contextual[0]]
        if n > 1:  # restore_image_features_sorted: crop dominants over the crop grid, crop [CLS]s, contextuals
            mask = torch.zeros(n - 1, side * side, dtype=torch.bool)
            mask.scatter_(1, dom_ids[1:, 1:] - 1, True)
            crop_t, crop_p = _crop_order(mask, grid, side)
            crops, c = tiles[1:], contextual.shape[1]
            tile += (t0 + 1 + crop_t).tolist() + crops + [t for t in crops for _ in range(c)]
            token += (crop_p + 1).tolist() + [0] * (n - 1) + ctx_ids[1:].reshape(-1).tolist()
            crop_dominant = out.hidden_states[-2][t0 + 1 + crop_t, crop_p + 1]
            values += [crop_dominant, dominant[1:, 0], contextual[1:].reshape(-1, contextual.shape[-1])]
        assert len(tile) == n * share
        _check_rows(sel, b, tile, token, torch.cat(values))


# ---- ToMe and AIM --------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["tome", "aim_merge"])
def test_merging_methods_equal_official(family, name):
    model, processor = get_tiny(family)
    batch = make_batch(processor, 3)
    keep = 10
    pruner = load_pruner(name, keep=keep)
    records = record_selections(pruner)
    with pruner(model):
        model(**batch)
    sel = records[0][2]
    embeds = hf_hidden(model, batch, 0)  # the LLM's input embeddings (image features scattered in)
    image = batch["input_ids"] == model.config.image_token_id
    metric = None
    if name == "tome":  # head-mean keys of the tower's last layer, laid out as HF lays out the tokens
        out, keys, images = _tower(family, batch)
        last = keys[-1][:, 1:]
        if family == "llava":
            metric = list(last)
        else:
            per_image = list(torch.split(last, [n for n, _ in images]))
            packed, _ = model.model.pack_image_features(per_image, batch["image_sizes"], "default",
                                                        image_newline=torch.zeros(last.shape[-1]))
            metric = packed
    for b in range(3):
        x = embeds[b, image[b]]
        values, source = ref_merge(x, None if metric is None else metric[b], keep, aim=name == "aim_merge")
        assert sel.info["source"][b].tolist() == source.tolist()
        assert sel.indices[b].tolist() == list(range(keep))
        torch.testing.assert_close(sel.values[b], values, atol=1e-5, rtol=0)


# ---- LLaVA-NeXT per tile -------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("name", ["fastervlm", "visionzip"])
def test_next_llm_reads_the_official_sequence(name):
    """On one LLaVA-NeXT sample the logits equal the plain HF language model run on the official
    sequence: text, then the projected official tokens in the official order, positions contiguous."""
    model, processor = get_tiny("llava_next")
    batch = make_batch(processor, 3)
    one = {k: v[1:2] for k, v in batch.items()}
    keep = 60
    pruner = load_pruner(name, keep=keep)
    records = record_selections(pruner)
    with pruner(model) as engine:
        logits = model(**one).logits
    sel = records[0][2]
    out, _, _ = _tower("llava_next", one)
    k = int((sel.indices[0] >= 0).sum())
    assert engine.kept_tokens["vision"].tolist() == [k] == [keep // 3 * 3]
    feats = out.hidden_states[-2][sel.info["tile"][0, :k], sel.info["token"][0, :k]]
    if name == "visionzip":  # contextual tokens are merged: take the recorded values (checked above)
        feats = sel.values[0, :k]
    ids = one["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero()[:, 0]
    embed = model.get_input_embeddings()
    tokens = model.model.multi_modal_projector(feats)
    seq = torch.cat([embed(ids[: image[0]]), tokens, embed(ids[image[-1] + 1 :])])[None]
    lm = model.model.language_model(inputs_embeds=seq, position_ids=torch.arange(seq.shape[1])[None])
    ref = model.lm_head(lm.last_hidden_state)
    torch.testing.assert_close(logits, ref, atol=2e-4, rtol=0)


@torch.no_grad()
def test_next_unpad_layout_keeps_newlines_and_per_tile_topk():
    """``next_layout="unpad"`` (FasterVLM's unused 'spatial_unpad' branch): each tile's top
    ``keep // n_tiles`` patches where HF's unpadded layout has them, plus every newline token; soft
    mode gives the same logits as the hard prune at original positions."""
    model, processor = get_tiny("llava_next")
    batch = make_batch(processor, 3)
    keep = 36
    pruner = load_pruner("fastervlm", keep=keep, next_layout="unpad", repack_positions=False)
    records = record_selections(pruner)
    with pruner(model) as hard:
        out_hard = model(**batch).logits
    sel = records[0][2]
    assert sel.values is None
    out, _, images = _tower("llava_next", batch)
    scores = out.attentions[-2][:, :, 0, 1:].mean(1)
    P = scores.shape[1]
    ids = torch.arange(sum(n for n, _ in images) * P, dtype=torch.float32)
    per_image = list(torch.split(ids.view(-1, P, 1), [n for n, _ in images]))
    packed, _ = model.model.pack_image_features(per_image, batch["image_sizes"], "default",
                                                image_newline=torch.tensor([-1.0]))
    for b, ((n, _), t0) in enumerate(zip(images, _tile_starts(images))):
        flat = packed[b].view(-1).round().long()  # tile * P + patch of each token, -1 for newlines
        mask = torch.zeros(n, P, dtype=torch.bool)
        mask.scatter_(1, scores[t0 : t0 + n].topk(keep // n, dim=1).indices, True)
        kept = (flat < 0) | mask.view(-1)[(flat - t0 * P).clamp_min(0)]
        want = kept.nonzero()[:, 0].tolist()
        assert sel.indices[b, : len(want)].tolist() == want and bool((sel.indices[b, len(want) :] == -1).all())
        assert (flat < 0).sum() > 0 and len(want) < n * (keep // n) + int((flat < 0).sum()) + 1
    with pruner(model, mode="soft") as soft:
        out_soft = model(**batch).logits
    rows = torch.gather(out_soft, 1, hard.output_index[..., None].expand(-1, -1, out_soft.shape[-1]))
    torch.testing.assert_close(rows[hard.output_valid], out_hard[hard.output_valid], atol=1e-5, rtol=0)
