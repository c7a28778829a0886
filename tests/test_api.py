"""Pruner API: install/remove, registry, budgets, clear errors, backbone save/load."""

from __future__ import annotations

import pytest
import torch

from learned_prune import PRUNERS, load_backbone, load_pruner
from learned_prune.testbed import testbed_llava
from learned_prune.pruners import Compose, FastV, resolve_keep

from conftest import get_tiny, make_batch


def _hook_ids(model) -> set:
    return {(name, key) for name, m in model.named_modules()
            for key in [*m._forward_hooks, *m._forward_pre_hooks]}


def _no_trace(model, before: set | None = None) -> bool:
    """No instance override left and no hook beyond those HF itself installed (``before``)."""
    lm, inner = model.model.language_model, model.model
    extra = _hook_ids(model) - (before or set())
    return "forward" not in lm.__dict__ and "get_image_features" not in inner.__dict__ and not extra


@torch.no_grad()
@pytest.mark.parametrize("name", ["random", "pool", "downsample", "fastv", "fastervlm"])
def test_hooks_removed_after_exception(name):
    model, processor = get_tiny("llava")
    batch = make_batch(processor, 2)
    with load_pruner(name, keep=8)(model):  # let HF install its own lazy capture hooks once
        model(**batch)
    before = _hook_ids(model)
    ref = model(**batch).logits
    with pytest.raises(RuntimeError, match="boom"):
        with load_pruner(name, keep=8)(model) as engine:
            model(**batch)
            assert len(_hook_ids(model) - before) >= 3  # installed while inside
            raise RuntimeError("boom")
    assert _no_trace(model, before)
    torch.testing.assert_close(model(**batch).logits, ref)


def test_nothing_patched_globally():
    model, processor = get_tiny("llava")
    other, _ = testbed_llava("llava", text_layers=4, seed=1)
    batch = make_batch(processor, 1)
    with torch.no_grad():
        other(**batch), model(**batch)  # HF installs its own lazy output-capture hooks on first use
    before_model, before_other = _hook_ids(model), _hook_ids(other)
    with torch.no_grad(), load_pruner("fastv", keep=8)(model):
        assert other(**batch).logits.shape[1] == batch["input_ids"].shape[1]  # untouched instance
        assert model(**batch).logits.shape[1] < batch["input_ids"].shape[1]
    assert _no_trace(other, before_other) and _no_trace(model, before_model)


def test_nesting_is_refused_and_compose_works():
    model, processor = get_tiny("llava")
    batch = make_batch(processor, 1)
    before = _hook_ids(model)
    with load_pruner("fastervlm", keep=32)(model):
        with pytest.raises(RuntimeError, match="compose"):
            with load_pruner("fastv", keep=8)(model):
                pass
    assert _no_trace(model, before)
    pruner = load_pruner(["fastervlm", "fastv"], keep=16)
    assert isinstance(pruner, Compose)
    pruner.pruners[1].keep = 8
    with torch.no_grad(), pruner(model) as engine:
        model(**batch)
    assert engine.kept_tokens["vision"].item() == 16 and engine.kept_tokens["llm:2"].item() == 8


def test_registry_and_load_pruner_errors():
    assert {"none", "random", "pool", "downsample", "fastv", "fastervlm"} <= set(PRUNERS)
    assert isinstance(load_pruner("fastv", layer=3, keep=32), FastV)
    with pytest.raises(KeyError, match="registered"):
        load_pruner("fastvv")
    with pytest.raises(TypeError, match="valid arguments"):
        load_pruner("fastv", lyer=2)


@pytest.mark.parametrize("keep", [0, -3, 0.0, 1.5, True, "64"])
def test_invalid_budget_fails_at_construction(keep):
    with pytest.raises((ValueError, TypeError), match="keep"):
        load_pruner("random", keep=keep)


def test_resolve_keep_counts_and_ratios():
    n = torch.tensor([576, 144])
    assert resolve_keep(0.111, n).tolist() == [64, 16]
    assert resolve_keep(16, n).tolist() == [16, 16]
    with pytest.raises(ValueError, match="exceeds the 144 visual tokens"):
        resolve_keep(200, n)


@torch.no_grad()
@pytest.mark.parametrize("name", ["random", "pool", "downsample", "fastv", "fastervlm"])
def test_budget_above_token_count_is_a_clear_error(name):
    model, processor = get_tiny("llava")
    batch = make_batch(processor, 1)
    with pytest.raises(ValueError, match="exceeds the 144 visual tokens"):
        with load_pruner(name, keep=500)(model):
            model(**batch)
    assert "forward" not in model.model.language_model.__dict__


def test_fastv_layer_out_of_range():
    model, _ = get_tiny("llava")
    with pytest.raises(ValueError, match="layer=9"):
        with load_pruner("fastv", layer=9)(model):
            pass


@torch.no_grad()
def test_mismatched_image_token_count_is_a_clear_error():
    model, processor = get_tiny("llava")
    batch = make_batch(processor, 1)
    ids = batch["input_ids"]
    image = model.config.image_token_id
    first = int((ids[0] == image).nonzero()[0])
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[first] = False  # one placeholder too few
    batch["input_ids"], batch["attention_mask"] = ids[:, keep], batch["attention_mask"][:, keep]
    with pytest.raises(ValueError, match="image-token count mismatch.*143 <image>.*144 visual features"):
        with load_pruner("fastv", keep=8)(model):
            model(**batch)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_save_pretrained_roundtrip_through_load_backbone(tmp_path, family):
    model, processor = get_tiny(family)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, proc2 = load_backbone(tmp_path)
    assert type(loaded) is type(model)
    assert loaded.config._attn_implementation == "sdpa"
    batch = make_batch(processor, 2)
    batch2 = make_batch(proc2, 2)
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    torch.testing.assert_close(loaded(**batch2).logits, model(**batch).logits)


def test_load_backbone_never_downloads(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="does not download"):
        load_backbone("llava-hf/llava-1.5-7b-hf-not-cached")


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_every_pruner_runs_with_sdpa_and_never_eager(monkeypatch, family):
    """No method needs eager attention or output_attentions=True, in the LLM or the vision tower."""
    import transformers.models.clip.modeling_clip as clip
    import transformers.models.llama.modeling_llama as llama

    def refuse(*args, **kwargs):
        raise AssertionError("eager attention was used")

    monkeypatch.setattr(llama, "eager_attention_forward", refuse)
    monkeypatch.setattr(clip, "eager_attention_forward", refuse)
    model, processor = get_tiny(family)
    batch = make_batch(processor, 2)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("output_attentions")), with_kwargs=True)
    try:
        for name in PRUNERS:
            pruner = load_pruner(name) if name == "none" else load_pruner(name, keep=8)
            with pruner(model):
                model(**batch)
                model.generate(**batch, max_new_tokens=2, do_sample=False)
            assert model.config._attn_implementation == "sdpa"
            assert model.model.vision_tower.config._attn_implementation == "sdpa"
    finally:
        hook.remove()
    assert not any(seen)


# ---- learned heads: the same pruner protocol, hyper-parameters saved from their constructor ---------------

HEAD_ARGS = {  # non-default constructor arguments of every head class (sizes of a tiny backbone)
    "atp": dict(hidden_size=64, num_layers=8, layers=[2, 6], target=0.3, temperature=5.0, stride=3, width=16,
                layer_cost=0.1),
    "lvpruning": dict(hidden_size=64, num_layers=8, layers=[2, 3, 6], ratios=[0.6, 0.4, 0.2], heads=4, blocks=1,
                      tau=0.5, keep=0.25),
    "bavit": dict(vision_hidden=64, width=32, depth=1, heads=2, threshold=0.3, min_keep=2, keep=12,
                  repack_positions=True),
    "dyvte": dict(hidden_size=64, num_layers=8, width=32, threshold=[0.6, 0.7, 0.8, 0.9, 0.9, 0.9, 0.9], min_layer=2),
    "flashsloth": dict(vision_hidden=64, hidden_size=64, grid=12, pool=3, queries=2, heads=2, dropout=0.0),
    "quecc": dict(vision_hidden=64, hidden_size=64, grid=12, stride=[6, 3], heads=2, levels=[1, 2], vision_layers=3),
}


def test_every_head_class_has_round_trip_arguments():
    from learned_prune.pruners.heads import HEADS

    assert set(HEAD_ARGS) == set(HEADS)


@pytest.mark.parametrize("method", sorted(HEAD_ARGS))
def test_a_head_exports_its_constructor_arguments_and_loads_equal(method, tmp_path):
    """config.json "hparams" are the constructor's arguments, derived from the signature (no hand-written list);
    load_pruner(folder) rebuilds a head with equal arguments and weights."""
    from learned_prune.pruners.heads import HEADS

    torch.manual_seed(0)
    head = HEADS[method](**HEAD_ARGS[method])
    assert head.hparams() == HEAD_ARGS[method]
    head.save_pretrained(tmp_path / method)
    loaded = load_pruner(str(tmp_path / method))
    assert type(loaded) is type(head) and loaded.hparams() == head.hparams()
    torch.testing.assert_close(loaded.state_dict(), head.state_dict())
    again = HEADS[method](**loaded.hparams())  # the saved arguments rebuild the same head
    assert again.hparams() == head.hparams()


def test_a_head_saves_the_values_it_resolved_for_null_arguments():
    from learned_prune.pruners.dyvte import DyVTEHead
    from learned_prune.pruners.lvpruning import LVPruningHead

    assert LVPruningHead(64, 8, layers=None, heads=None).hparams()["heads"] == 8
    assert DyVTEHead(64, 8, width=None).hparams()["width"] == 128


@torch.no_grad()
def test_a_learned_head_is_installed_like_any_pruner_and_is_not_a_layer():
    from learned_prune.engine import Engine
    from learned_prune.pruners import PrunerBase
    from learned_prune.pruners.atp import ATPHead

    model, processor = get_tiny("llava")
    head = ATPHead(model.config.text_config.hidden_size, model.config.text_config.num_hidden_layers).eval()
    assert isinstance(head, PrunerBase) and isinstance(head, torch.nn.Module)
    assert type(head).__call__ is PrunerBase.__call__
    engine = head(model, mode="soft")
    assert isinstance(engine, Engine) and engine.mode == "soft"
    with head(model) as engine:
        model(**make_batch(processor, 1))
    assert engine.kept_tokens
    with pytest.raises(TypeError, match=r"ATP head is a pruner, not a layer: install it .*with head\(model\)"):
        head.forward(torch.zeros(1, 4))
