"""``downsample``: the image re-encoded by the tower at the budget's grid, against references built by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from learned_prune import load_pruner
from learned_prune.pruners.downsample import resize_pixels
from learned_prune.pruners.pool import pooled_grid

from conftest import get_tiny, make_batch, positions_from_mask
from helpers import pooled_embeddings, record_selections


def _padded(processor) -> dict:
    batch = make_batch(processor, 3)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
    batch["position_ids"] = positions_from_mask(batch["attention_mask"])
    return batch


def _alone(batch: dict, i: int) -> dict:
    keep = batch["attention_mask"][i].bool()
    one = {k: v[i : i + 1] for k, v in batch.items() if k != "position_ids"}
    one["input_ids"], one["attention_mask"] = one["input_ids"][:, keep], one["attention_mask"][:, keep]
    return one


@torch.no_grad()
def _run(model, batch: dict, **kwargs):
    pruner = load_pruner("downsample", **kwargs)
    records = record_selections(pruner)
    with pruner(model) as engine:
        logits = model(**batch).logits
    (_, _, sel), = records
    return logits, sel, engine


@torch.no_grad()
def _reference(model, base_pixels: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """projector(tower(bicubic-antialiased resize to h x w patches, interpolated positions)[feature layer][:, 1:])."""
    p = model.config.vision_config.patch_size
    x = F.interpolate(base_pixels, size=(h * p, w * p), mode="bicubic", align_corners=False, antialias=True)
    out = model.model.vision_tower(x, output_hidden_states=True, interpolate_pos_encoding=True)
    return model.model.multi_modal_projector(out.hidden_states[model.config.vision_feature_layer][:, 1:])


def _centres(rows: int, cols: int, h: int, w: int) -> list[int]:
    return [int((r + 0.5) * rows / h) * cols + int((c + 0.5) * cols / w) for r in range(h) for c in range(w)]


@pytest.mark.parametrize("keep", [7, 10, 16, 36, 0.25])
def test_output_holds_exactly_the_budget(family, keep):
    model, processor = get_tiny(family)
    batch = _padded(processor)
    n_vis = (batch["input_ids"] == model.config.image_token_id).sum(1)
    logits, sel, engine = _run(model, batch, keep=keep)
    # a ratio is of all visual tokens (LLaVA-NeXT: crops too); the kept grid is the largest h x w <= budget in 12 x 12
    budget = keep if isinstance(keep, int) else round(int(n_vis.min()) * keep)
    grid = max(h * w for h in range(1, 13) for w in range(1, 13) if h * w <= budget)
    assert grid == budget or (family, keep) == ("llava_next", 0.25)  # there 0.25 of 300 is 75, kept as 8 x 9 = 72
    budget = grid
    assert engine.kept_tokens["vision"].tolist() == [budget] * 3
    assert sel.values.shape[:2] == (3, budget) and sel.values_space == "vision"
    assert logits.shape[1] == batch["input_ids"].shape[1] - int(n_vis.min()) + budget


@pytest.mark.parametrize("keep", [10, 16, 36])
def test_features_equal_the_tower_run_on_the_resized_image_by_hand(keep):
    model, processor = get_tiny("llava")
    batch = _padded(processor)
    _, sel, engine = _run(model, batch, keep=keep)
    rows, cols = engine.adapter.patch_grid
    h, w = pooled_grid(rows, cols, keep)
    ref = _reference(model, batch["pixel_values"], h, w)
    with torch.no_grad():
        got = model.model.multi_modal_projector(sel.values)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert sel.indices.tolist() == [_centres(rows, cols, h, w)] * 3  # cells in raster order, at their centre patch
    # not the pooled full-resolution features: the image itself was re-encoded
    assert not torch.allclose(got, pooled_embeddings(model, batch, rows, cols, h, w), atol=1e-3)


def test_next_re_encodes_the_base_view_only():
    model, processor = get_tiny("llava_next")
    batch = _padded(processor)
    _, sel, engine = _run(model, batch, keep=16)
    ref = _reference(model, batch["pixel_values"][:, 0], 4, 4)  # each image's first tile: the global view
    with torch.no_grad():
        torch.testing.assert_close(model.model.multi_modal_projector(sel.values), ref, atol=1e-5, rtol=0)
    assert engine.kept_tokens["vision"].tolist() == [16] * 3


@pytest.mark.parametrize("keep", [10, 36])
def test_left_padded_batch_equals_samples_alone(family, keep):
    model, processor = get_tiny(family)
    batch = _padded(processor)
    logits, sel, _ = _run(model, batch, keep=keep)
    for i in range(3):
        one_logits, one_sel, _ = _run(model, _alone(batch, i), keep=keep)
        assert torch.equal(one_sel.indices[0], sel.indices[i])
        torch.testing.assert_close(one_sel.values[0], sel.values[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(one_logits[0, -1], logits[i, -1], atol=2e-4, rtol=0)


@pytest.mark.parametrize("keep", [144, 1.0])
def test_keep_all_equals_no_pruning(keep):
    model, processor = get_tiny("llava")
    batch = _padded(processor)
    with torch.no_grad():
        ref = model(**batch).logits
    logits, sel, engine = _run(model, batch, keep=keep)
    assert engine.kept_tokens["vision"].tolist() == [144] * 3
    assert sel.indices.tolist() == [list(range(144))] * 3
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], ref[valid], atol=2e-4, rtol=0)


@torch.no_grad()
def test_beam_search_batch_equals_singles():
    """generate() repeats the images for beam search: the re-encoded pixels follow the expansion."""
    model, processor = get_tiny("llava")
    batch = make_batch(processor, 2)
    kw = dict(max_new_tokens=3, min_new_tokens=3, suppress_tokens=[model.config.image_token_id],
              num_beams=3, num_return_sequences=2, do_sample=False)
    with load_pruner("downsample", keep=9)(model) as engine:
        gen = model.generate(**batch, **kw)
        assert engine.kept_tokens["vision"].tolist() == [9] * 6
        for i in range(2):
            one = model.generate(**_alone(batch, i), **kw)
            assert torch.equal(one[:, -3:], gen[2 * i : 2 * i + 2, -3:]), f"sample {i}"


def test_resize_is_pil_bicubic_within_rounding():
    """The tensor resize matches PIL's BICUBIC downscale (VTC-Bench's) up to 8-bit rounding."""
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).resize((96, 96), Image.BILINEAR)
    x = torch.tensor(np.array(smooth), dtype=torch.float32).permute(2, 0, 1)[None]
    for h, w in [(32, 32), (16, 40)]:
        pil = torch.tensor(np.array(smooth.resize((w, h), Image.BICUBIC)), dtype=torch.float32).permute(2, 0, 1)[None]
        assert (resize_pixels(x, (h, w)).clamp(0, 255) - pil).abs().max() <= 1.0
    assert resize_pixels(x, (96, 96)) is x


def test_full_select_strategy_is_refused_by_name():
    model, processor = get_tiny("llava")
    model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
            with load_pruner("downsample", keep=16)(model):
                pass
    finally:
        model.config.vision_feature_select_strategy = "default"
