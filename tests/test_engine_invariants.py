"""The engine's four invariants (DESIGN.md, "The engine"), for every first pruner on both families.

1. keep-all gives logits equal to the plain HF model;
2. a hard prune equals the plain HF model run on the kept sub-sequence with the same positions;
3. a soft mask of exact 0/1 equals the hard prune on the kept positions;
4. generation after a prune equals greedy decoding of the kept sub-sequence.
Plus: a left-padded batch equals single runs, also with per-sample keep counts.
"""

from __future__ import annotations

import pytest
import torch

from learned_prune import PRUNERS as REGISTRY, load_pruner
from learned_prune.engine import Selection
from learned_prune.pruners import Compose, PrunerBase, topk_selection

from conftest import make_batch, positions_from_mask
from helpers import gather_rows, record_selections, reference_logits

PRUNERS = sorted(n for n in REGISTRY if n != "none")
SELECTING = ["random", "fastv", "fastervlm", "divprune", "dart", "vtc_cls", "pyramiddrop", "transprune", "cdpruner"]
NO_KEEP_ALL = {"visionzip"}  # always merges contextual tokens and inserts [CLS]
ATOL = 2e-4


def _batch(processor, n=3):
    b = make_batch(processor, n)
    b["position_ids"] = positions_from_mask(b["attention_mask"])
    return b


@torch.no_grad()
@pytest.mark.parametrize("name", ["none", *PRUNERS])
def test_keep_all_equals_plain_hf(tiny, family, name):
    model, processor = tiny
    if name in NO_KEEP_ALL or (name in ("pool", "downsample") and family == "llava_next"):
        pytest.skip("keep-all is not defined for this method (it merges or drops tiles by design)")
    batch = _batch(processor)
    ref = model(**batch).logits
    kwargs = {"ratio": 1.0} if name == "pyramiddrop" else {}
    pruner = load_pruner(name) if name == "none" else load_pruner(name, keep=1.0, **kwargs)
    with pruner(model) as engine:
        out = model(**batch).logits
    assert out.shape == ref.shape
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL, rtol=0)
    if name != "none":
        n_vis = (batch["input_ids"] == model.config.image_token_id).sum(1)
        for kept in engine.kept_tokens.values():
            assert torch.equal(kept.cpu(), n_vis)


def _repack(pruner):
    return lambda site: bool(getattr(pruner, "repack_positions", None)) if site != "vision" else True


@torch.no_grad()
@pytest.mark.parametrize("name", PRUNERS)
def test_hard_prune_equals_hf_on_kept_subsequence(tiny, family, name):
    model, processor = tiny
    for i in range(2):  # two different samples, one at a time (padding is covered below)
        batch = make_batch(processor, 2)
        one = {k: v[i : i + 1] for k, v in batch.items()}
        keep = one["attention_mask"][0].bool()
        one["input_ids"], one["attention_mask"] = one["input_ids"][:, keep], one["attention_mask"][:, keep]
        pruner = load_pruner(name, keep=10)
        records = record_selections(pruner)
        with pruner(model) as engine:
            out = model(**one).logits
        assert records, "the pruner never acted"
        counts = [int(k) for k in engine.kept_tokens.values()]
        assert all(c > 0 for c in counts) and counts[-1] <= 10, engine.kept_tokens  # budget = what reaches later layers
        assert counts == sorted(counts, reverse=True)
        ref = reference_logits(model, one, records, repack_llm=_repack(pruner))
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("name", SELECTING)
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_soft_01_mask_equals_hard_prune(tiny, family, name, eps):
    model, processor = tiny
    batch = _batch(processor)
    # soft mode cannot re-order tokens: on LLaVA-NeXT the [CLS]-attention methods take their index-only layout
    extra = {"next_layout": "unpad"} if family == "llava_next" and name in ("fastervlm", "vtc_cls") else {}
    pruner = load_pruner(name, keep=12, **extra)
    pruner.repack_positions = False  # soft mode never moves tokens, so neither may the hard run
    with pruner(model) as hard:
        out_hard = model(**batch).logits
    with pruner(model, mode="soft") as soft:
        soft.soft_eps = eps
        out_soft = model(**batch).logits
    assert out_soft.shape[1] == batch["input_ids"].shape[1]  # nothing removed
    rows = gather_rows(out_soft, hard.output_index)
    valid = hard.output_valid
    torch.testing.assert_close(rows[valid], out_hard[valid], atol=1e-5 if eps == 0 else 1e-3, rtol=0)
    for site in hard.kept_tokens:
        torch.testing.assert_close(soft.kept_tokens[site].float(), hard.kept_tokens[site].float())


@torch.no_grad()
@pytest.mark.parametrize("name", PRUNERS)
def test_generation_equals_greedy_on_kept_subsequence(tiny, family, name):
    model, processor = tiny
    batch = make_batch(processor, 1)
    L = batch["input_ids"].shape[1]
    steps = 4
    pruner = load_pruner(name, keep=8)
    records = record_selections(pruner)
    image = model.config.image_token_id  # a random model may emit <image>; keep it out of the text
    with pruner(model):
        gen = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             suppress_tokens=[image])
    new = gen[:, L:]
    eos = model.generation_config.eos_token_id
    for t in range(steps):
        ids = torch.cat([batch["input_ids"], new[:, :t]], 1)
        step = dict(batch, input_ids=ids, attention_mask=torch.ones_like(ids))
        logits = reference_logits(model, step, records, repack_llm=_repack(pruner))[:, -1]
        if eos is not None:
            logits[:, eos] = float("-inf")  # min_new_tokens suppresses EOS in generate() too
        logits[:, image] = float("-inf")
        assert logits.argmax(-1).item() == new[0, t].item(), f"step {t}"


@torch.no_grad()
@pytest.mark.parametrize("name", ["none", *PRUNERS])
def test_padded_batch_equals_single_runs(tiny, name):
    model, processor = tiny
    batch = make_batch(processor, 3)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
    pruner = load_pruner(name) if name == "none" else load_pruner(name, keep=10)
    with pruner(model):
        gen = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        batch["position_ids"] = positions_from_mask(batch["attention_mask"])
        last = model(**batch).logits[:, -1]
        for i in range(3):
            single = make_batch(processor, 3)
            one = {k: v[i : i + 1] for k, v in single.items()}
            keep = one["attention_mask"][0].bool()
            one["input_ids"], one["attention_mask"] = one["input_ids"][:, keep], one["attention_mask"][:, keep]
            g1 = model.generate(**one, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            assert torch.equal(g1[0, -3:], gen[i, -3:])
            torch.testing.assert_close(model(**one).logits[0, -1], last[i], atol=ATOL, rtol=0)


class _PerSampleBudget(PrunerBase):
    """Keeps 3 + 4*b tokens in sample b: an instance-adaptive budget like ATP's."""

    def __init__(self, site: str) -> None:
        self.site = site

    def select(self, state):
        B = state.visual_pos.shape[0]
        k = torch.tensor([3 + 4 * b for b in range(B)])
        score = state.visual_hidden.norm(dim=-1)
        return Selection(indices=topk_selection(score, state.visual_valid, k))


@torch.no_grad()
@pytest.mark.parametrize("site", ["vision", "llm:2"])
def test_per_sample_keep_counts_in_one_batch(tiny, site):
    model, processor = tiny
    batch = make_batch(processor, 3)
    with _PerSampleBudget(site)(model) as engine:
        gen = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert engine.kept_tokens[site].tolist() == [3, 7, 11]
    for i in range(3):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        keep = one["attention_mask"][0].bool()
        one["input_ids"], one["attention_mask"] = one["input_ids"][:, keep], one["attention_mask"][:, keep]

        class Fixed(_PerSampleBudget):
            def select(self, state, i=i):
                score = state.visual_hidden.norm(dim=-1)
                return Selection(indices=topk_selection(score, state.visual_valid, torch.tensor([3 + 4 * i])))

        with Fixed(site)(model):
            g1 = model.generate(**one, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert torch.equal(g1[0, -3:], gen[i, -3:])


@torch.no_grad()
@pytest.mark.parametrize("name", ["random", "fastervlm", "divprune", "vtc_cls"])
def test_vision_site_keeps_original_positions_when_asked(name):
    """``repack_positions=False`` at the vision site = plain HF layers on the kept rows at their original positions."""
    from learned_prune.testbed import testbed_llava

    model, processor = testbed_llava("llava", seed=0)
    one = make_batch(processor, 1)
    pruner = load_pruner(name, keep=12, repack_positions=False)
    records = record_selections(pruner)
    with pruner(model):
        out = model(**one).logits
    torch.testing.assert_close(out, reference_logits(model, one, records, repack_vision=False), atol=ATOL, rtol=0)
    with load_pruner(name, keep=12)(model):
        repacked = model(**one).logits
    assert not torch.allclose(out, repacked, atol=1e-3)


class _Spy(PrunerBase):
    """Keeps the ``k`` visual tokens of largest norm at ``llm:2`` and records how many it was given."""

    def __init__(self, k: int) -> None:
        self.site, self.k, self.seen = "llm:2", k, []

    def select(self, state):
        self.seen.append(state.n_visual.tolist())
        k = torch.full_like(state.n_visual, self.k)
        return Selection(indices=topk_selection(state.visual_hidden.norm(dim=-1), state.visual_valid, k))


@torch.no_grad()
def test_pruners_at_one_site_act_in_order_and_one_object_cannot_be_listed_twice(tiny):
    model, processor = tiny
    batch = make_batch(processor, 2)
    n_vis = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    first, second = _Spy(16), _Spy(8)
    with Compose([first, second])(model) as engine:
        model(**batch)
    assert first.seen == [n_vis] and second.seen == [[16, 16]]  # the second picks among the first's survivors
    assert engine.kept_tokens["llm:2"].tolist() == [8, 8]
    with pytest.raises(ValueError, match="listed twice"):
        Compose([first, first])(model)
