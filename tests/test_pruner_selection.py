"""Each method's selection on a small hand-made input whose right answer is known."""

from __future__ import annotations

import torch

from learned_prune import load_pruner
from learned_prune.pruners.base import resolve_keep, topk_selection
from learned_prune.pruners.dart import duplication_select
from learned_prune.pruners.divprune import max_min_diverse
from learned_prune.pruners.merging import bipartite_merge, merge_to
from learned_prune.pruners.pool import pooled_grid
from learned_prune.pruners.pyramiddrop import stage_layers

from conftest import get_tiny, make_batch
from helpers import record_selections


def test_topk_selection_sorted_and_padded():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.0]])
    valid = torch.tensor([[True] * 4, [True, True, True, False]])
    idx = topk_selection(scores, valid, torch.tensor([2, 1]))
    assert idx.tolist() == [[1, 3], [2, -1]]


def test_divprune_picks_the_isolated_token_first_then_spreads():
    cluster = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.98, 0.02], [0.97, 0.03]])
    isolated = torch.tensor([[0.0, 1.0]])
    second = torch.tensor([[-1.0, 0.05]])
    x = torch.cat([cluster, isolated, second])[None]  # token 4 is far from everything
    valid = torch.ones(1, 6, dtype=torch.bool)
    # first pick is the most isolated; with k=3 the set covers the three directions
    first = max_min_diverse(x, valid, torch.tensor([1]))
    assert first.tolist() == [[5]] or first.tolist() == [[4]]
    three = max_min_diverse(x, valid, torch.tensor([3]))[0].tolist()
    assert 4 in three and 5 in three and sum(i < 4 for i in three) == 1


def test_divprune_first_pick_is_nearest_neighbour_outlier():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.02, 1.0], [-0.7, -0.7]]])
    assert max_min_diverse(x, torch.ones(1, 5, dtype=torch.bool), torch.tensor([1])).tolist() == [[4]]


def test_divprune_on_separated_clusters_takes_one_token_per_cluster():
    """Three tight clusters on orthogonal axes (4, 3 and 2 tokens) and one outlier opposite them all: the outlier
    is the most isolated (first pick), then each step must leave the clusters already covered (the *minimum*
    distance to the chosen set is what a max-min step maximises)."""
    a = [[1.0, 0.01, 0.0], [1.0, 0.0, 0.01], [1.0, 0.02, 0.01], [1.0, 0.01, 0.02]]
    b = [[0.01, 1.0, 0.0], [0.0, 1.0, 0.01], [0.02, 1.0, 0.01]]
    c = [[0.0, 0.01, 1.0], [0.01, 0.0, 1.0]]
    x = torch.tensor(a + b + c + [[-1.0, -1.0, -1.0]])  # cluster of token i: 0 0 0 0 1 1 1 2 2 3
    cluster = [0, 0, 0, 0, 1, 1, 1, 2, 2, 3]
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    xs = torch.stack([x, x[perm]])  # the same tokens in another order, in the same batch
    valid = torch.ones(2, 10, dtype=torch.bool)
    for k in (1, 2, 3, 4):
        picks = max_min_diverse(xs, valid, torch.tensor([k, k])).tolist()
        for b, order in enumerate((torch.arange(10), perm)):
            got = [cluster[order[i]] for i in picks[b]]
            assert sorted(got) == sorted(set(got)) and 3 in got, (k, b, got)  # distinct clusters, the outlier first
    # a cluster whose members are all padding is never picked; the budget then repeats no cluster before it must
    valid[1] = True
    valid[0, 7:9] = False
    picks = max_min_diverse(xs, valid, torch.tensor([3, 4]))[0].tolist()
    assert sorted(cluster[i] for i in picks if i >= 0) == [0, 1, 3] and picks[-1] == -1


def test_dart_never_keeps_a_duplicate_of_a_pivot_before_distinct_tokens():
    # 8 visual tokens in 4 directions; token 0 is the pivot (largest key norm), token 4 duplicates it
    base = torch.eye(4)
    feats = torch.cat([base, base + 0.01 * torch.arange(4)[:, None]])[None]
    key_norm = torch.tensor([[5.0, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0]])
    valid = torch.ones(1, 8, dtype=torch.bool)
    no_text = torch.zeros(1, 0, 4)
    for k in range(1, 9):
        kept = duplication_select(key_norm, feats, valid, no_text, torch.tensor([k]), image_pivots=1)[0].tolist()
        assert len(kept) == k and kept[0] == 0
        assert (4 in kept) == (k == 8), (k, kept)  # the pivot's duplicate comes last
    # a text pivot in direction 1 keeps direction-1 tokens (1 and its duplicate 5) for last
    text = base[1:2][None]
    kept = duplication_select(key_norm, feats, valid, text, torch.tensor([6]), image_pivots=0)[0].tolist()
    assert sorted(kept) == [0, 2, 3, 4, 6, 7]


def test_tome_merge_is_size_weighted_and_keeps_slots():
    x = torch.tensor([[0.0], [10.0], [1.0], [11.0]])
    metric = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # 0~3, 1~2
    size = torch.tensor([1.0, 1.0, 3.0, 1.0])
    slot = torch.arange(4)
    new_x, _, new_size, new_slot = bipartite_merge(x, metric, size, slot, r=2)
    # A = {0, 2}, B = {1, 3}: 0 merges into 3, 2 (size 3) into 1
    assert new_slot.tolist() == [1, 3]
    torch.testing.assert_close(new_x[:, 0], torch.tensor([(10 + 3 * 1) / 4, (11 + 0) / 2]))
    assert new_size.tolist() == [4.0, 2.0]
    out, slots = merge_to(torch.randn(10, 3), torch.randn(10, 4), 3)
    assert out.shape == (3, 3) and slots.tolist() == sorted(slots.tolist())


def test_pool_grid_and_stage_layers():
    assert pooled_grid(12, 12, 16) == (4, 4)
    assert pooled_grid(12, 12, 64) == (8, 8)
    assert pooled_grid(12, 12, 32) in [(4, 8), (8, 4)]
    assert stage_layers(32) == [8, 16, 24]
    assert stage_layers(8) == [2, 4, 6]


@torch.no_grad()
def test_visionzip_keeps_cls_and_splits_dominant_contextual():
    model, processor = get_tiny("llava")
    batch = make_batch(processor, 1)
    pruner = load_pruner("visionzip", keep=64)
    records = record_selections(pruner)
    with pruner(model) as engine:
        model(**batch)
    _, _, sel = records[0]
    assert engine.kept_tokens["vision"].item() == 64
    hs = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
    cls = hs[model.config.vision_feature_layer][0, 0]
    values = sel.values[0]
    assert any(torch.allclose(v, cls, atol=1e-5) for v in values), "the [CLS] feature must be kept"
    feats = hs[model.config.vision_feature_layer][0, 1:]
    exact = sum(any(torch.allclose(v, f, atol=1e-6) for f in feats) for v in values)
    assert exact == 54 - 1  # dominant patches pass through unchanged; 10 contextual tokens are merged


@torch.no_grad()
def test_fastervlm_and_vtc_cls_rank_by_cls_attention():
    model, processor = get_tiny("llava")
    batch = make_batch(processor, 1)
    # the [CLS] row of the penultimate layer, computed by an eager CLIP for reference
    tower = model.model.vision_tower
    impl = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        att = tower(batch["pixel_values"], output_attentions=True).attentions
    finally:
        tower.config._attn_implementation = impl
    ref = att[-2][0, :, 0, 1:].mean(0)
    pruner = load_pruner("fastervlm", keep=10)
    records = record_selections(pruner)
    with pruner(model):
        model(**batch)
    assert set(records[0][2].indices[0].tolist()) == set(ref.topk(10).indices.tolist())
    n = len(att)
    start = round(n * 16 / 24)
    ref_sum = sum(att[i][0, :, 0, 1:].mean(0) for i in range(min(start, n - 2), n - 1))
    pruner = load_pruner("vtc_cls", keep=10)
    records = record_selections(pruner)
    with pruner(model):
        model(**batch)
    assert set(records[0][2].indices[0].tolist()) == set(ref_sum.topk(10).indices.tolist())


@torch.no_grad()
def test_fastv_ranks_by_last_token_attention_of_previous_layer():
    model, processor = get_tiny("llava")
    batch = make_batch(processor, 1)
    lm = model.model.language_model
    impl = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"
    try:
        att = model(**batch, output_attentions=True).attentions  # eager reference, test only
    finally:
        lm.config._attn_implementation = impl
    image = (batch["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    ref = att[1][0, :, -1, image].mean(0)  # layer K-1 = 1, last query row
    pruner = load_pruner("fastv", layer=2, keep=12)
    records = record_selections(pruner)
    with pruner(model):
        model(**batch)
    assert set(records[0][2].indices[0].tolist()) == set(ref.topk(12).indices.tolist())


def test_pyramiddrop_stage_counts():
    pruner = load_pruner("pyramiddrop", keep=72)
    counts = pruner.stage_counts(torch.tensor([576]), 3)
    assert [int(c) for c in counts] == [288, 144, 72]
    assert resolve_keep(64, torch.tensor([144])).item() == 64


def test_dpc_knn_recycling_finds_separated_clusters():
    from learned_prune.pruners.sparsevlm import dpc_knn_merge

    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, 4, generator=g) * 0.05 + torch.tensor([5.0, 0, 0, 0])
    b = torch.randn(10, 4, generator=g) * 0.05 + torch.tensor([0, 5.0, 0, 0])
    merged, centres = dpc_knn_merge(torch.cat([a, b]), 2, k=3)
    assert sorted(int(c) // 10 for c in centres) == [0, 1]  # one centre per blob
    got = sorted(merged.tolist(), key=lambda v: -v[0])
    torch.testing.assert_close(torch.tensor(got), torch.stack([a.mean(0), b.mean(0)]), atol=1e-5, rtol=0)


def test_transition_variation_by_hand():
    from learned_prune.pruners.transprune import transition_variation

    h_in = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    h_out = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # token 0: same direction, twice the norm; token 1: turned 90 deg
    ttv = transition_variation(h_in, h_out, torch.ones(1, 2, dtype=torch.bool))
    # softmax over tokens of (1 - cos) = softmax([0, 1]); times the norm ratios [2, 1]
    e = torch.exp(torch.tensor(1.0))
    torch.testing.assert_close(ttv[0], torch.tensor([2 / (1 + e), e / (1 + e)]))


@torch.no_grad()
def test_sparsevlm_raters_are_the_instruction_tokens_most_relevant_to_the_image():
    model, processor = get_tiny("llava")
    batch = make_batch(processor, 1)
    pruner = load_pruner("sparsevlm", keep=12)
    seen = {}
    original = pruner.raters

    def raters(state):
        seen["raters"], seen["text"] = original(state), state.instruction_mask
        return seen["raters"]

    pruner.raters = raters
    with pruner(model):
        model(**batch)
    r, text = seen["raters"], seen["text"]
    assert r.any() and not (r & ~text).any() and r.sum() < text.sum()


@torch.no_grad()
def test_random_is_seeded_and_batch_invariant():
    model, processor = get_tiny("llava")
    batch = make_batch(processor, 2)
    picks = []
    for seed in (0, 0, 1):
        pruner = load_pruner("random", keep=10, seed=seed)
        records = record_selections(pruner)
        with pruner(model):
            model(**batch)
        picks.append(records[0][2].indices)
    assert torch.equal(picks[0], picks[1]) and not torch.equal(picks[0], picks[2])
    assert torch.equal(picks[0][0], picks[0][1])  # the subset does not depend on the batch position
