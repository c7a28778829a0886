"""generate() and forward features under the engine, on both families.

Keep-all pruners (``none``; ``fastv`` at ``llm:2`` and ``random`` at the vision site with
``keep=1.0``) must equal plain HF: beam search, ``num_return_sequences``, hidden states,
attentions (eager), ``inputs_embeds``, the loss with ``shift_labels`` / ``num_items_in_batch``, and
``use_cache=False`` when a generated token is the ``<image>`` id. A real prune must run and give a
left-padded batch the results of single runs. What the engine cannot do is refused by name: static
caches, continuous batching, attentions under SDPA, ``inputs_embeds`` whose image rows cannot be
known, a pruned cache used after its ``with`` block.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from learned_prune import load_pruner

from conftest import get_tiny, make_batch, positions_from_mask

ATOL = 2e-4
KEEP_ALL = {"none": {}, "fastv": {"keep": 1.0}, "random": {"keep": 1.0}}
PRUNED = {"fastv": {"keep": 8}, "fastervlm": {"keep": 8}, "pyramiddrop": {"keep": 8}}
_EAGER: dict = {}


def _eager(family: str):
    if family not in _EAGER:
        _EAGER[family] = copy.deepcopy(get_tiny(family)[0])
        _EAGER[family].set_attn_implementation("eager")
    return _EAGER[family]


def _single(batch: dict, i: int) -> dict:
    """Sample ``i`` of a left-padded batch, without its padding."""
    one = {k: v[i : i + 1] for k, v in batch.items()}
    keep = one["attention_mask"][0].bool()
    one["input_ids"], one["attention_mask"] = one["input_ids"][:, keep], one["attention_mask"][:, keep]
    return one


def _gen(model, batch: dict, **kw):  # 3 new tokens, never <image> (a random model may emit it)
    return model.generate(**batch, **{"max_new_tokens": 3, "min_new_tokens": 3,
                                      "suppress_tokens": [model.config.image_token_id], **kw})


# ---- beam search and num_return_sequences --------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("name", list(KEEP_ALL))
def test_beam_search_and_return_sequences_keep_all_equal_hf(tiny, name):
    model, processor = tiny
    batch = make_batch(processor, 2)
    beams = dict(num_beams=3, num_return_sequences=2, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ref = _gen(model, batch, **beams)
    torch.manual_seed(0)
    ref_sampled = _gen(model, batch, do_sample=True, num_return_sequences=2)
    with load_pruner(name, **KEEP_ALL[name])(model):
        out = _gen(model, batch, **beams)
        torch.manual_seed(0)
        sampled = _gen(model, batch, do_sample=True, num_return_sequences=2)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=ATOL, rtol=0)
    assert torch.equal(sampled, ref_sampled)


@torch.no_grad()
@pytest.mark.parametrize("name", list(PRUNED))
def test_pruned_beam_search_batch_equals_singles(tiny, name):
    model, processor = tiny
    batch = make_batch(processor, 3)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
    with load_pruner(name, **PRUNED[name])(model) as engine:
        gen = _gen(model, batch, num_beams=3, num_return_sequences=2, do_sample=False)
        assert all(k.shape == (9,) for k in engine.kept_tokens.values())  # every beam pruned
        for i in range(3):
            one = _gen(model, _single(batch, i), num_beams=3, num_return_sequences=2, do_sample=False)
            assert torch.equal(one[:, -3:], gen[2 * i : 2 * i + 2, -3:]), f"sample {i}"


# ---- hidden states and attentions ----------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("name", list(KEEP_ALL))
def test_hidden_states_and_attentions_keep_all_equal_hf(family, name):
    model = _eager(family)
    batch = make_batch(get_tiny(family)[1], 3)
    ref = model(**batch, output_hidden_states=True, output_attentions=True)
    with load_pruner(name, **KEEP_ALL[name])(model):
        out = model(**batch, output_hidden_states=True, output_attentions=True)
    valid = batch["attention_mask"].bool()
    assert len(out.hidden_states) == len(ref.hidden_states) and len(out.attentions) == len(ref.attentions)
    for got, want in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=0)
    for got, want in zip(out.attentions, ref.attentions):
        rows = valid[:, None, :, None] & valid[:, None, None, :]
        torch.testing.assert_close(got * rows, want * rows, atol=ATOL, rtol=0)


@torch.no_grad()
def test_pruned_hidden_states_and_attentions_hold_the_output_rows(family):
    """FastV at llm:2: states entering layers 0..2 and attentions of layers 0..1 are HF's on the kept rows;
    later attention rows sum to 1 over the kept keys; the last state gives the logits."""
    model = _eager(family)
    batch = make_batch(get_tiny(family)[1], 3)
    ref = model(**batch, output_hidden_states=True, output_attentions=True)
    with load_pruner("fastv", keep=8)(model) as engine:
        out = model(**batch, output_hidden_states=True, output_attentions=True)
    index, ok = engine.output_index, engine.output_valid
    B, L = index.shape
    assert L < batch["input_ids"].shape[1]
    for i in range(3):
        want = torch.gather(ref.hidden_states[i], 1, index[..., None].expand(B, L, ref.hidden_states[i].shape[-1]))
        torch.testing.assert_close(out.hidden_states[i][ok], want[ok], atol=ATOL, rtol=0)
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)
    for i, att in enumerate(out.attentions):
        assert att.shape[-2:] == (L, L)
        if i < 2:
            H = att.shape[1]
            full = ref.attentions[i]
            want = torch.gather(full, 2, index[:, None, :, None].expand(B, H, L, full.shape[-1]))
            want = torch.gather(want, 3, index[:, None, None, :].expand(B, H, L, L))
            pair = ok[:, None, :, None] & ok[:, None, None, :]
            torch.testing.assert_close(att * pair, want * pair, atol=ATOL, rtol=0)
        else:
            torch.testing.assert_close(att.sum(-1)[ok[:, None].expand_as(att.sum(-1))],
                                       torch.ones(int(ok.sum()) * att.shape[1]), atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("name", ["none", "fastv"])
def test_generate_outputs_keep_all_equal_hf(family, name):
    model = _eager(family)
    batch = make_batch(get_tiny(family)[1], 2)
    kw = dict(do_sample=False, output_hidden_states=True, output_attentions=True, return_dict_in_generate=True)
    ref = _gen(model, batch, **kw)
    with load_pruner(name, **KEEP_ALL[name])(model):
        out = _gen(model, batch, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    valid = batch["attention_mask"].bool()
    for step, (got_h, want_h, got_a, want_a) in enumerate(zip(out.hidden_states, ref.hidden_states, out.attentions,
                                                              ref.attentions)):
        for got, want in zip(got_h, want_h):
            got, want = (got[valid], want[valid]) if step == 0 else (got, want)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        for got, want in zip(got_a, want_a):
            assert got.shape == want.shape
            keys = torch.cat([valid, torch.ones(2, got.shape[-1] - valid.shape[1], dtype=torch.bool)], 1)
            queries = valid if step == 0 else torch.ones(2, 1, dtype=torch.bool)  # padded queries: any row will do
            pair = queries[:, None, :, None] & keys[:, None, None, :]
            torch.testing.assert_close(got * pair, want * pair, atol=ATOL, rtol=0)


@torch.no_grad()
def test_attentions_under_sdpa_are_refused_by_name(tiny):
    model, processor = tiny
    with load_pruner("none")(model), pytest.raises(ValueError, match=r"set_attn_implementation\('eager'\)"):
        model(**make_batch(processor, 1), output_attentions=True)


# ---- inputs_embeds -------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("name", ["none", "fastv", "fastervlm"])
def test_inputs_embeds_prune_as_input_ids_do(tiny, name):
    model, processor = tiny
    batch = make_batch(processor, 3)
    embeds = {k: v for k, v in batch.items() if k != "input_ids"}
    embeds["inputs_embeds"] = model.get_input_embeddings()(batch["input_ids"])
    pruner = load_pruner(name) if name == "none" else load_pruner(name, keep=8)
    with pruner(model) as engine:
        ref, ref_kept = model(**batch).logits, {k: v.tolist() for k, v in engine.kept_tokens.items()}
        out = model(**embeds).logits
        assert {k: v.tolist() for k, v in engine.kept_tokens.items()} == ref_kept
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
        gen_ids = _gen(model, batch, do_sample=False)
        gen_embeds = _gen(model, embeds, do_sample=False)  # generate() returns only new tokens for embeds
    assert torch.equal(gen_embeds[:, -3:], gen_ids[:, -3:])
    assert name == "none" or ref.shape[1] < batch["input_ids"].shape[1]


@torch.no_grad()
def test_inputs_embeds_without_images_are_refused_when_a_pruner_acts(tiny):
    model, processor = tiny
    batch = make_batch(processor, 1)
    merged = model(**batch, output_hidden_states=True).hidden_states[0]  # embeddings already holding the image
    with load_pruner("fastv", keep=8)(model), pytest.raises(ValueError, match="cannot tell which rows"):
        model(inputs_embeds=merged, attention_mask=batch["attention_mask"])
    with load_pruner("none")(model):  # nothing to prune: runs as plain HF
        out = model(inputs_embeds=merged, attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(out, model(inputs_embeds=merged, attention_mask=batch["attention_mask"]).logits)


# ---- the loss ------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("name", list(KEEP_ALL))
def test_loss_honours_shift_labels_and_num_items_keep_all(tiny, name):
    model, processor = tiny
    batch = make_batch(processor, 3)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    shift = torch.randint(0, 20, labels.shape, generator=torch.Generator().manual_seed(0))
    shift[:, :5] = -100
    calls = [dict(labels=labels), dict(labels=labels, shift_labels=shift),
             dict(labels=labels, num_items_in_batch=torch.tensor(7))]
    refs = [model(**batch, **c).loss for c in calls]
    with load_pruner(name, **KEEP_ALL[name])(model):
        for c, ref in zip(calls, refs):
            torch.testing.assert_close(model(**batch, **c).loss, ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_pruned_loss_scores_each_row_against_its_own_next_token(tiny):
    model, processor = tiny
    batch = make_batch(processor, 3)
    shift = torch.randint(0, 20, batch["input_ids"].shape, generator=torch.Generator().manual_seed(1))
    with load_pruner("fastv", keep=8)(model) as engine:
        out = model(**batch, labels=batch["input_ids"], shift_labels=shift)
    rows = torch.gather(shift, 1, engine.output_index)
    fill = torch.gather(batch["attention_mask"].bool(), 1, engine.output_index) & ~engine.output_valid
    want = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), rows.masked_fill(fill, -100).flatten())
    torch.testing.assert_close(out.loss, want)


# ---- caches and batching the engine refuses ------------------------------------------------
@torch.no_grad()
def test_static_cache_and_continuous_batching_are_refused_by_name(tiny):
    model, processor = tiny
    batch = make_batch(processor, 1)
    with load_pruner("fastv", keep=8)(model):
        with pytest.raises(ValueError, match="StaticCache.*Drop cache_implementation"):
            _gen(model, batch, cache_implementation="static")
        with pytest.raises(NotImplementedError, match="continuous batching.*model.generate"):
            model.generate_batch(inputs=[batch["input_ids"][0].tolist()], max_new_tokens=2)
    assert "init_continuous_batching" not in model.__dict__


# ---- use_cache=False and a generated <image> id --------------------------------------------
class _ForceImageAt(LogitsProcessor):
    """Makes the first generated token the <image> id."""

    def __init__(self, image: int, length: int) -> None:
        self.image, self.length = image, length

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] == self.length:
            scores = torch.full_like(scores, -1e9)
            scores[:, self.image] = 0
        return scores


@torch.no_grad()
@pytest.mark.parametrize("name", ["none", "fastv", "fastv8"])
def test_generated_image_token_without_cache_is_text(tiny, name):
    model, processor = tiny
    batch = make_batch(processor, 2)
    image = model.config.image_token_id
    force = LogitsProcessorList([_ForceImageAt(image, batch["input_ids"].shape[1])])
    kw = dict(max_new_tokens=3, do_sample=False, logits_processor=force, output_scores=True,
              return_dict_in_generate=True)
    ref = model.generate(**batch, **kw)  # plain HF with its cache (without one, HF fails on the extra <image>)
    pruner = load_pruner("fastv", keep=8) if name == "fastv8" else load_pruner(name, **KEEP_ALL[name])
    with pruner(model) as engine:
        cached = model.generate(**batch, **kw)
        uncached = model.generate(**batch, use_cache=False, **kw)
        n_vis = (batch["input_ids"] == image).sum(1)
        if name != "none":  # the generated <image> is not a visual token
            assert engine.kept_tokens["llm:2"].tolist() == (n_vis.tolist() if name == "fastv" else [8, 8])
    assert (uncached.sequences[:, batch["input_ids"].shape[1]] == image).all()
    if name == "fastv8":  # without a cache FastV re-selects from each new last token: it runs, nothing more to share
        return
    assert torch.equal(uncached.sequences, cached.sequences)
    for a, b in zip(uncached.scores, cached.scores):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert torch.equal(cached.sequences, ref.sequences)


# ---- a pruned cache after its engine is gone -----------------------------------------------
def _next_step(model, one: dict, out) -> dict:
    token = out.logits[:, -1:].argmax(-1)
    mask = torch.cat([one["attention_mask"], torch.ones_like(token)], 1)
    return dict(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values,
                position_ids=positions_from_mask(mask)[:, -1:])


@torch.no_grad()
def test_decoding_a_pruned_cache_after_the_block_is_refused(tiny):
    model, processor = tiny
    one = make_batch(processor, 1)
    with load_pruner("fastv", keep=8)(model):
        out = model(**one, use_cache=True)
        inside = model(**_next_step(model, one, out)).logits  # inside the block: continues on the pruned layouts
    with pytest.raises(RuntimeError, match="holds a pruned prompt.*same `with pruner"):
        model(**_next_step(model, one, out))
    assert inside.shape == (1, 1, model.config.text_config.vocab_size)
    ref = model(**one, use_cache=True)
    with load_pruner("none")(model):  # an unpruned cache is a plain one: it continues after the block
        kept = model(**one, use_cache=True)
    torch.testing.assert_close(model(**_next_step(model, one, kept)).logits,
                               model(**_next_step(model, one, ref)).logits, atol=ATOL, rtol=0)
