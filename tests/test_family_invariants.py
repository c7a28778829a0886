"""The engine's invariants on every model family's tiny config (``pytest -k family``).

Each family is built in code, saved to a temporary folder and loaded back through ``load_backbone``
with HF_HUB_OFFLINE=1. References are plain HF: the model's own merged embeddings and position ids
(Qwen-VL: its (3, 1, L) M-RoPE ids from ``get_rope_index``), then HF's decoder layers run on the
kept rows only.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_images
from helpers import record_selections
from learned_prune import load_pruner
from learned_prune.backbones import load_backbone, tiny_llava
from learned_prune.data.collate import image_placeholder
from learned_prune.engine.adapter import adapter_for

FAMILIES = ["llava", "llava_next", "qwen2_5_vl", "llava_onevision"]
PRUNERS = ["random", "fastv", "divprune", "dart", "pyramiddrop"]
QUESTIONS = ["what is the color of the shape ?", "how many ?", "is there a shape in this image ? describe the image ."]
ATOL = 2e-4
_LOADED: dict = {}


def family_model(family: str, tmp_path_factory) -> tuple:
    """The family's tiny model, saved and loaded back with ``load_backbone`` (offline)."""
    if family not in _LOADED:
        model, processor = tiny_llava(family, text_layers=4, seed=0)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        _LOADED[family] = load_backbone(str(folder))
    return _LOADED[family]


@pytest.fixture(params=FAMILIES)
def fam(request, tmp_path_factory) -> tuple:
    return (request.param, *family_model(request.param, tmp_path_factory))


def batch_for(processor, n: int, seed: int = 0, first: int = 0) -> dict:
    """``n`` prompts of the family's format with images of differing sizes (left-padded)."""
    images = make_images(first + n, seed)[first:]
    texts = [f"USER: {image_placeholder(processor)}\n{QUESTIONS[(first + i) % 3]} ASSISTANT:" for i in range(n)]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def sample(batch: dict, b: int) -> dict:
    """Sample ``b`` of a padded batch, alone and unpadded (its images' pixel rows only)."""
    keep = batch["attention_mask"][b].bool()
    one = {k: v[b : b + 1][:, keep] for k, v in batch.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "image_grid_thw" in batch:  # Qwen-VL: pixel rows are patches, image after image
        rows = batch["image_grid_thw"].prod(-1)
        start = int(rows[:b].sum())
        one.update(pixel_values=batch["pixel_values"][start : start + int(rows[b])], image_grid_thw=batch["image_grid_thw"][b : b + 1])
    else:
        one["pixel_values"] = batch["pixel_values"][b : b + 1]
        if "image_sizes" in batch:
            one["image_sizes"] = batch["image_sizes"][b : b + 1]
    return one


def hf_positions(model, batch: dict) -> torch.Tensor:
    """Plain HF position ids of one unpadded sample as (C, 1, L): C = 3 M-RoPE rows, or 1."""
    ids = batch["input_ids"]
    if adapter_for(model).mrope:
        pos, _ = model.model.get_rope_index(ids, batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
                                            attention_mask=batch["attention_mask"])
        return pos
    return torch.arange(ids.shape[1])[None, None]


@torch.no_grad()
def hf_layers(model, hidden: torch.Tensor, pos: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Plain HF decoder layers ``start..end-1`` on one sample; with ``end`` the depth: normed, else raw."""
    lm = model.model.language_model
    layers, n = lm.layers, lm.config.num_hidden_layers
    last = end == n
    try:
        lm.layers = nn.ModuleList(list(layers)[start : end + (0 if last else 1)])  # +1: raw output of layer end-1
        lm.config.num_hidden_layers = len(lm.layers)
        out = lm(inputs_embeds=hidden, position_ids=pos[0] if pos.shape[0] == 1 else pos,
                 attention_mask=torch.ones(1, hidden.shape[1], dtype=torch.long), use_cache=False,
                 output_hidden_states=True)
    finally:
        lm.layers, lm.config.num_hidden_layers = layers, n
    return out.last_hidden_state if last else out.hidden_states[end - start]


@torch.no_grad()
def reference_logits(model, batch: dict, records: list, pruner) -> torch.Tensor:
    """Logits of one unpadded sample by plain HF layers, keeping the recorded rows at each site."""
    adapter = adapter_for(model)
    is_image = batch["input_ids"][0] == model.config.image_token_id
    hidden = model(**batch, output_hidden_states=True, use_cache=False).hidden_states[0]
    pos, rows, cur = hf_positions(model, batch), torch.arange(is_image.numel()), 0
    for layer, site, sel in records:
        if layer > cur:
            hidden = hf_layers(model, hidden, pos, cur, layer)
        cur = layer
        vis = is_image[rows].nonzero()[:, 0]
        idx = sel.indices[0]
        keep = ~is_image[rows]
        keep[vis[idx[idx >= 0]]] = True
        repack = pruner.repacks(site) and not (adapter.mrope and pruner.repack_positions is None)
        if repack:
            pos = pos - (~keep).long().cumsum(0)
        rows, pos, hidden = rows[keep], pos[:, :, keep], hidden[:, keep]
    return model.lm_head(hf_layers(model, hidden, pos, cur, adapter.num_layers))


@torch.no_grad()
@pytest.mark.parametrize("name", ["none", *PRUNERS])
def test_family_keep_all_equals_plain_hf(fam, name):
    family, model, processor = fam
    batch = batch_for(processor, 3)
    ref = model(**batch).logits
    pruner = load_pruner(name) if name == "none" else load_pruner(name, keep=1.0)
    with pruner(model):
        out = model(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("name", PRUNERS)
def test_family_hard_prune_equals_hf_on_kept_rows(fam, name):
    family, model, processor = fam
    one = sample(batch_for(processor, 2), 1)
    pruner = load_pruner(name, keep=0.25)
    records = record_selections(pruner)
    with pruner(model) as engine:
        out = model(**one).logits
    n_vis = int((one["input_ids"] == model.config.image_token_id).sum())
    assert 0 < int(list(engine.kept_tokens.values())[-1]) < n_vis
    torch.testing.assert_close(out, reference_logits(model, one, records, pruner), atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("name", ["divprune", "fastv"])
def test_family_soft_01_mask_equals_hard(fam, name):
    family, model, processor = fam
    one = sample(batch_for(processor, 1), 0)
    pruner = load_pruner(name, keep=0.25, repack_positions=False)  # soft mode never moves positions
    with pruner(model) as hard:
        want = model(**one).logits
    engine = pruner(model, mode="soft")
    engine.soft_eps = 0.0
    with engine:
        got = model(**one).logits
    torch.testing.assert_close(got[0, hard.output_index[0]], want[0], atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("name", ["none", "divprune", "fastv", "dart"])
def test_family_padded_batch_equals_samples_alone(fam, name):
    family, model, processor = fam
    batch = batch_for(processor, 3)
    pruner = load_pruner(name) if name == "none" else load_pruner(name, keep=0.3)
    kw = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with pruner(model):  # generate() gives padded samples the positions they have alone (from the mask)
        out = model.generate(**batch, **kw)
        for b in range(3):
            alone = model.generate(**sample(batch, b), **kw)
            assert alone.sequences[0, -2:].tolist() == out.sequences[b, -2:].tolist()
            for got, want in zip(out.scores, alone.scores):
                torch.testing.assert_close(got[b : b + 1], want, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("name", ["divprune", "fastv"])
def test_family_batch_of_8_equals_batch_of_1(fam, name):
    family, model, processor = fam
    batch = batch_for(processor, 8, seed=3)
    pruner = load_pruner(name, keep=5)
    with pruner(model) as engine:
        gen = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert set(engine.kept_tokens[list(engine.kept_tokens)[-1]].tolist()) == {5}
        L = batch["input_ids"].shape[1]
        for b in range(8):
            one = batch_for(processor, 1, seed=3, first=b)
            g1 = model.generate(**one, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            assert g1[0, -3:].tolist() == gen[b, L:].tolist(), f"sample {b}"


@torch.no_grad()
@pytest.mark.parametrize("name", ["divprune", "dart"])
def test_family_generate_with_pruned_cache_equals_reference(fam, name):
    family, model, processor = fam
    one = sample(batch_for(processor, 1), 0)
    L, steps = one["input_ids"].shape[1], 4
    pruner = load_pruner(name, keep=6)
    records = record_selections(pruner)
    image = model.config.image_token_id
    with pruner(model):
        gen = model.generate(**one, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, suppress_tokens=[image])
    assert len(records) == 1  # the prune ran once, at the prefill; decoding steps continue its cache
    eos = model.generation_config.eos_token_id
    for t in range(steps):
        ids = torch.cat([one["input_ids"], gen[:, L : L + t]], 1)
        step = dict(one, input_ids=ids, attention_mask=torch.ones_like(ids))
        if "mm_token_type_ids" in one:
            step["mm_token_type_ids"] = torch.cat([one["mm_token_type_ids"], torch.zeros_like(gen[:, L : L + t])], 1)
        logits = reference_logits(model, step, records[:1], pruner)[:, -1]
        if eos is not None:
            logits[:, eos] = float("-inf")
        logits[:, image] = float("-inf")
        assert logits.argmax(-1).item() == gen[0, L + t].item(), f"step {t}"


@torch.no_grad()
def test_family_hooks_gone_after_an_exception(fam):
    family, model, processor = fam
    batch = batch_for(processor, 1)
    ref = model(**batch).logits
    lm = model.model.language_model
    with pytest.raises(RuntimeError, match="boom"):
        with load_pruner("fastv", keep=4)(model):
            raise RuntimeError("boom")
    assert "forward" not in lm.__dict__ and "get_image_features" not in model.model.__dict__
    assert not model._forward_hooks and not model._forward_pre_hooks and not model.model._forward_pre_hooks
    assert all(not layer.self_attn.k_proj._forward_hooks for layer in lm.layers)
    torch.testing.assert_close(model(**batch).logits, ref, atol=0, rtol=0)
