"""Each training-free baseline selects what its official implementation's rule selects.

Every reference below re-states the official selection rule (training_free.md; the official code
named in each docstring) from plain HF outputs only: eager attention matrices of a deep-copied
eager model, hidden states from ``output_hidden_states``, plain HF decoder layers run on the kept
sub-sequence for later stages. It runs on each sample alone and unpadded, as the official code
does (batch of one); the pruner runs once on a left-padded batch of 3 (positions from the mask, as
generate() gives them), and its recorded selection must equal the reference index for index, on
both families.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from learned_prune import load_pruner

from conftest import get_tiny, make_batch, positions_from_mask
from helpers import hf_hidden, pooled_embeddings, record_selections

_EAGER: dict = {}


def eager_copy(family: str):
    """A deep copy of the tiny model running eager attention, so it can return attention matrices."""
    if family not in _EAGER:
        model = copy.deepcopy(get_tiny(family)[0])
        model.set_attn_implementation("eager")
        _EAGER[family] = model
    return _EAGER[family]


def padded_batch(processor) -> dict:
    batch = make_batch(processor, 3)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
    batch["position_ids"] = positions_from_mask(batch["attention_mask"])
    return batch


def alone(batch: dict, i: int) -> dict:
    """Sample ``i`` of a left-padded batch, unpadded, as the official code runs it."""
    keep = batch["attention_mask"][i].bool()
    one = {k: v[i : i + 1] for k, v in batch.items() if k != "position_ids"}
    one["input_ids"], one["attention_mask"] = one["input_ids"][:, keep], one["attention_mask"][:, keep]
    return one


def image_rows(model, one: dict) -> torch.Tensor:
    return (one["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]


def run_pruner(model, batch: dict, name: str, **kwargs) -> list:
    """The pruner's selections on the batch: per site, a list of per-sample index lists."""
    pruner = load_pruner(name, **kwargs)
    records = record_selections(pruner)
    with torch.no_grad(), pruner(model):
        model(**batch)
    return [[[int(j) for j in row if j >= 0] for row in sel.indices] for _, _, sel in records]


def top(scores: torch.Tensor, k: int) -> list[int]:
    """The k highest-scoring entries, in sequence order (as every official code re-sorts)."""
    order = sorted(range(len(scores)), key=lambda j: -float(scores[j]))
    cut = float(scores[order[k - 1]]) if k < len(scores) else None
    assert cut is None or cut - float(scores[order[k]]) > 1e-6 * abs(cut), "a near-tie at the cut: ill-posed"
    return sorted(order[:k])


# ---- FastV (pkunlp-icler/FastV, LlamaModel.forward with use_fast_v; training_free.md 2.1) ----------
@torch.no_grad()
def fastv_reference(eager, one: dict, layer: int, k: int) -> list[int]:
    """Layer K-1's attention matrix, mean over heads, the LAST query row, on the image columns; top-k."""
    att = eager(**one, output_attentions=True).attentions[layer - 1][0]  # (H, L, L) of decoder layer K-1
    return top(att.mean(0)[-1, image_rows(eager, one)], k)


@pytest.mark.parametrize("keep", [8, 0.1])
def test_fastv_selects_the_official_tokens(family, keep):
    model, processor = get_tiny(family)
    batch = padded_batch(processor)
    (got,) = run_pruner(model, batch, "fastv", keep=keep)  # defaults: layer K=2
    for i in range(3):
        one = alone(batch, i)
        n = len(image_rows(model, one))
        k = keep if isinstance(keep, int) else round(n * keep)  # official: round(576 * (1 - R))
        assert got[i] == fastv_reference(eager_copy(family), one, layer=2, k=k), f"sample {i}"


# ---- DivPrune (vbdi/divprune, llava_arch.py::DivPrune; training_free.md 2.5) ----------------------
def divprune_reference(x: torch.Tensor, k: int) -> list[int]:
    """Greedy max-min diversity over D = 1 - cos of the projected visual embeddings x (N, D).

    First pick: the column whose second-smallest distance (its nearest neighbour, the smallest
    being itself) is largest. Then: the column whose minimum distance to the chosen rows is largest.
    Ties go to the lowest index, as torch.argmax breaks them; in float64, with rounding noise below
    1e-9 counted as a tie (LLaVA-NeXT's row-end newline tokens are identical vectors).
    """
    unit = x.double() / x.double().norm(dim=1, keepdim=True)
    dist = 1 - unit @ unit.T

    def argmax(v: torch.Tensor) -> int:
        return int((v >= v.max() - 1e-9).nonzero()[0])

    picks = [argmax(dist.sort(dim=0).values[1])]
    while len(picks) < k:
        picks.append(argmax(dist[picks].min(dim=0).values))
    assert len(set(picks)) == k
    return sorted(picks)


@torch.no_grad()
@pytest.mark.parametrize("keep", [8, 0.098])
def test_divprune_selects_the_official_tokens(family, keep):
    model, processor = get_tiny(family)
    batch = padded_batch(processor)
    (got,) = run_pruner(model, batch, "divprune", keep=keep)
    for i in range(3):
        one = alone(batch, i)
        rows = image_rows(model, one)
        k = keep if isinstance(keep, int) else round(len(rows) * keep)  # official: round(ratio * 576)
        projected = hf_hidden(model, one, 0)[0, rows]  # merged embeddings entering layer 0: projector outputs
        assert got[i] == divprune_reference(projected, k), f"sample {i}"


# ---- PyramidDrop (Cooperx521/PyramidDrop, modeling_llama_pdrop.py::pdrop_rank_drop; 2.8) ----------
@torch.no_grad()
def layer_attention(eager, hidden: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run plain HF layers start..end on ``hidden`` (positions arange): (attention matrix of layer
    ``end`` (H, L, L), the hidden states entering layer ``end``)."""
    lm = eager.model.language_model
    layers, n = lm.layers, lm.config.num_hidden_layers
    L = hidden.shape[1]
    try:
        lm.layers = nn.ModuleList(list(layers)[start : end + 1])
        lm.config.num_hidden_layers = end + 1 - start
        out = lm(inputs_embeds=hidden, position_ids=torch.arange(L)[None], attention_mask=torch.ones(1, L),
                 use_cache=False, output_attentions=True, output_hidden_states=True)
    finally:
        lm.layers = layers
        lm.config.num_hidden_layers = n
    return out.attentions[-1][0], out.hidden_states[end - start]


@torch.no_grad()
def pyramiddrop_reference(eager, one: dict, boundaries: list[int], ratios: list[float]) -> list[list[int]]:
    """At boundary b (after layer b-1): the attention of layer b on the current states (its own
    input_layernorm, q/k projections and RoPE), head mean, row of the last instruction token, on the
    current image tokens; keep the top int(N * ratio_s) (N = the original image-token count), in
    order; the kept sequence is re-packed (positions arange). Selections are indices among the image
    tokens present at that stage."""
    is_image = one["input_ids"][0] == eager.config.image_token_id
    n0 = int(is_image.sum())
    hidden = hf_hidden(eager, one, 0)
    current, out = 0, []
    for b, ratio in zip(boundaries, ratios):
        att, hidden = layer_attention(eager, hidden, current, b)
        image = is_image.nonzero()[:, 0]
        picked = top(att.mean(0)[-1, image], int(n0 * ratio))
        out.append(picked)
        keep = ~is_image.clone()
        keep[image[picked]] = True
        hidden, is_image, current = hidden[:, keep], is_image[keep], b
    return out


@pytest.mark.parametrize("keep,ratio", [(0.125, 0.5), (0.2, 0.6)])
def test_pyramiddrop_selects_the_official_tokens(family, keep, ratio):
    model, processor = get_tiny(family)
    batch = padded_batch(processor)
    boundaries = [1, 2, 3]  # the official 8/16/24 of 32, on a 4-layer model
    got = run_pruner(model, batch, "pyramiddrop", keep=keep, ratio=ratio, layers=tuple(boundaries))
    ratios = [keep / ratio**2, keep / ratio, keep]  # the official image_token_ratio_list after each boundary
    for i in range(3):
        ref = pyramiddrop_reference(eager_copy(family), alone(batch, i), boundaries, ratios)
        assert [stage[i] for stage in got] == ref, f"sample {i}"


def test_pyramiddrop_defaults_are_official():
    pruner = load_pruner("pyramiddrop")
    assert pruner.score_layer == "current" and pruner.ratio == 0.5 and pruner.repack_positions is True


# ---- random: a seeded uniform subset, the same for a sample alone and in any batch ---------------
def random_reference(n: int, k: int, seed: int) -> list[int]:
    """The k largest of n uniform draws from a generator seeded with ``seed`` (a uniform k-subset)."""
    draws = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    return top(draws, k)


@pytest.mark.parametrize("seed", [0, 3])
def test_random_is_the_seeded_subset_alone_and_in_a_batch(family, seed):
    model, processor = get_tiny(family)
    batch = padded_batch(processor)
    (got,) = run_pruner(model, batch, "random", keep=12, seed=seed)
    for i in range(3):
        one = alone(batch, i)
        (single,) = run_pruner(model, one, "random", keep=12, seed=seed)
        expected = random_reference(len(image_rows(model, one)), 12, seed)
        assert got[i] == single[0] == expected, f"sample {i}"


# ---- pool: 2-D average pooling of the base patch grid --------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("keep,grid", [(16, (4, 4)), (36, (6, 6))])
def test_pool_is_adaptive_average_pooling_by_hand(family, keep, grid):
    model, processor = get_tiny(family)
    batch = padded_batch(processor)
    pruner = load_pruner("pool", keep=keep)
    records = record_selections(pruner)
    with pruner(model) as engine:
        model(**batch)
    (_, _, sel), = records
    assert sel.values_space == "vision"
    rows, cols = engine.adapter.patch_grid
    h, w = grid
    ref = pooled_embeddings(model, batch, rows, cols, h, w)  # projector(adaptive_avg_pool2d(base-view grid))
    torch.testing.assert_close(model.model.multi_modal_projector(sel.values), ref, atol=1e-5, rtol=0)
    # each cell sits in the slot of the patch at its centre; the base view's patches come first, in raster order
    centre = [int((r + 0.5) * rows / h) * cols + int((c + 0.5) * cols / w) for r in range(h) for c in range(w)]
    assert sel.indices.tolist() == [centre] * 3
    assert engine.kept_tokens["vision"].tolist() == [h * w] * 3
