"""The engine's public parts beside the pruning sites: decoder layers run on given hidden states
(:func:`learned_prune.engine.run_layers`, DyVTE's label pass) and attention rows rebuilt from q/k
(:func:`learned_prune.engine.attention.attention_rows`, the testbed's grounding loss), each checked
against plain HF outputs on both families with a left-padded batch; and the pruner protocol's defaults."""

from __future__ import annotations

import copy

import pytest
import torch

from learned_prune.engine import Engine, PrunerProtocol, Selection, run_layers
from learned_prune.engine.attention import attention_rows
from learned_prune.pruners import PrunerBase

from conftest import get_tiny, make_batch

ATOL = 2e-4


class _DropVisual(PrunerBase):
    """Removes every visual token before decoder layer ``layer`` (positions kept)."""

    def __init__(self, layer: int) -> None:
        self.site = f"llm:{layer}"

    def select(self, state):
        return Selection(indices=torch.full_like(state.visual_pos[:, :1], -1))


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_run_layers_equals_the_plain_forward(family, attn):
    model, processor = get_tiny(family)
    if attn != "sdpa":
        model = copy.deepcopy(model)
        model.set_attn_implementation(attn)
    batch = make_batch(processor, 3)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
    valid = batch["attention_mask"].bool()
    full = model(**batch, output_hidden_states=True, use_cache=False)
    n = model.config.text_config.num_hidden_layers
    out = run_layers(model, full.hidden_states[0], valid, final_norm=True)
    logits = model.lm_head(out.hidden)
    rows = torch.arange(valid.shape[1]).expand_as(valid)
    assert torch.equal(out.valid, valid) and torch.equal(out.index[valid], rows[valid])
    torch.testing.assert_close(logits[out.valid], full.logits[valid], atol=ATOL, rtol=0)
    mid = run_layers(model, full.hidden_states[1], valid, start=1, end=n - 1)  # a stretch in the middle
    torch.testing.assert_close(mid.hidden[valid], full.hidden_states[n - 1][valid], atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("layer", [1, 3])
def test_run_layers_without_visual_tokens_equals_the_engine_dropping_them(family, layer):
    """DyVTE's label pass: the run without visual tokens from ``layer`` on, from the full run's states."""
    model, processor = get_tiny(family)
    batch = make_batch(processor, 3)
    valid = batch["attention_mask"].bool()
    is_image = batch["input_ids"] == model.config.image_token_id
    full = model(**batch, output_hidden_states=True, use_cache=False)
    out = run_layers(model, full.hidden_states[layer], valid, start=layer, keep=~is_image, final_norm=True)
    logits = model.lm_head(out.hidden)
    with _DropVisual(layer)(model) as engine:
        ref = model(**batch, use_cache=False).logits
    for b in range(3):
        rows, ref_rows = engine.output_valid[b], out.valid[b]
        assert torch.equal(engine.output_index[b][rows], out.index[b][ref_rows])
        torch.testing.assert_close(logits[b][ref_rows], ref[b][rows], atol=ATOL, rtol=0)


def test_run_layers_refuses_a_bad_range():
    model, processor = get_tiny("llava")
    h = torch.zeros(1, 3, model.config.text_config.hidden_size)
    with pytest.raises(ValueError, match="start"):
        run_layers(model, h, torch.ones(1, 3, dtype=torch.bool), start=3, end=2)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_attention_rows_equal_eager_attention(family):
    """One query row per sample (the last prompt token), head mean, at every layer: as eager HF's matrices."""
    model, processor = get_tiny(family)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    batch = make_batch(processor, 3)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        out = eager(**batch, output_hidden_states=True, output_attentions=True, use_cache=False)
    lm = model.model.language_model
    L = valid.shape[1]
    pos = torch.arange(L).expand_as(valid)
    query = torch.tensor([[L - 1], [L - 2], [L - 1]])  # any row per sample
    for li, layer in enumerate(lm.layers):
        hidden = out.hidden_states[li].clone().requires_grad_(True)
        every = torch.ones_like(query, dtype=torch.bool)
        probs = attention_rows(layer, lm.rotary_emb, hidden, pos, valid, query, every)
        ref = out.attentions[li].mean(1)[torch.arange(3), query[:, 0]]
        torch.testing.assert_close(probs[:, 0][valid], ref[valid], atol=1e-5, rtol=0)
        probs[:, 0, -5:].sum().backward()  # differentiable: the testbed's grounding loss trains through it
        assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_protocol_defaults_and_one_entry_point():
    """A pruner writes only ``select``: the engine calls every other protocol method on its defaults."""
    model, processor = get_tiny("llava")

    class Keep3(PrunerBase):
        site = "llm:2"

        def select(self, state):
            return Selection(indices=torch.arange(3).expand(state.visual_pos.shape[0], 3))

    pruner = Keep3()
    assert isinstance(pruner, PrunerProtocol)
    assert pruner.observe_layers(None) == [] and pruner.repacks("vision") and not pruner.repacks("llm:2")
    engine = pruner(model)
    assert isinstance(engine, Engine) and engine.pruners == [pruner]
    with torch.no_grad(), engine:
        model(**make_batch(processor, 2))
    assert engine.kept_tokens["llm:2"].tolist() == [3, 3]


def test_an_object_that_is_not_a_pruner_is_refused_with_what_to_derive_from():
    class Scorer:  # has select/sites, but does not follow the protocol
        def sites(self, adapter):
            return ["vision"]

        def select(self, state):
            raise AssertionError("never called")

    model, _ = get_tiny("llava")
    with pytest.raises(TypeError, match="derive it from learned_prune.pruners.base.PrunerBase"):
        Engine(model, [Scorer()])
