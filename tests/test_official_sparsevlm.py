"""SparseVLM against an independent re-statement of the official selection (Gumpest/SparseVLMs, main branch,
USE_VERSION=1_0: ``LlamaDynamicvitModel.forward``, ``score.attn_postprocess_topk``, ``utils.cluster_and_merge``).

The reference runs the official loop on one unpadded sample with plain HF layers: raters from the
embeddings, at each pruning layer l the layer's own eager softmax attention on the current (pruned,
re-packed) sequence, top-k, the top 30% + 1 of the deleted tokens by score clustered with DPC-kNN from
layer l's output, merged tokens inserted after the kept visual tokens, positions re-packed.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from learned_prune import load_pruner

from conftest import get_tiny, make_batch, positions_from_mask
from helpers import hf_hidden, record_selections

SCORE_PY = {192: [300, 200, 110], 128: [303, 110, 36], 96: [238, 48, 26], 64: [66, 30, 17]}


def _merged(n_deleted: int) -> int:
    pool = int(n_deleted * 0.3) + 1 if n_deleted else 0
    return int(pool / 10) + 1 if pool else 0


def _final(schedule, m=576) -> int:
    for k in schedule:
        k = min(k, m - 1)
        m = k + _merged(m - k)
    return m


def ref_counts(keep: int, n_orig: int, n: int, stage: int) -> tuple[int, int]:
    """(top-k, merged cap) under the project's budget rule, as the pruner's docstring states it."""
    sched = min(SCORE_PY.values(), key=lambda s: abs(_final(s) / 576 - keep / n_orig))
    if stage < 2:
        k = max(1, round(sched[stage] * keep / _final(sched)))
        return (n, 0) if k >= n else (k, n)
    if keep >= n:
        return n, 0
    fits = [k for k in range(n) if k + _merged(n - k) <= keep]
    return (max(fits), n) if fits else (keep - 1, 1)


def ref_cluster_and_merge(x: torch.Tensor, c: int) -> torch.Tensor:
    """utils.cluster_and_merge for one sample (N, C), without the 1e-6 random density noise."""
    n, dim = x.shape
    dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1) / dim**0.5
    density = (-(dist.topk(c, dim=-1, largest=False).values ** 2).mean(-1)).exp()
    mask = (density[None, :] > density[:, None]).float()
    parent_dist = (dist * mask + dist.max() * (1 - mask)).min(-1).values
    centres = (parent_dist * density).topk(c).indices
    cluster = dist[centres].argmin(0)
    cluster[centres] = torch.arange(c)
    weight = 1 / (torch.zeros(c).index_add_(0, cluster, torch.ones(n)) + 1e-6)
    return torch.zeros(c, dim).index_add_(0, cluster, x * weight[cluster][:, None])


def ref_raters(v_t: torch.Tensor, t_t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Official rater rule: text tokens whose softmax(V T^T over text).mean(over visual) is above its mean."""
    m_v_t = (v_t @ t_t.T * scale).softmax(-1).mean(0)
    return (m_v_t > m_v_t.mean()).nonzero()[:, 0]


@torch.no_grad()
def eager_layer(eager, hidden: torch.Tensor, pos: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(output of decoder layer i, its head-mean attention (L, L)) from plain HF eager attention."""
    lm = eager.model.language_model
    layers, n = lm.layers, lm.config.num_hidden_layers
    try:  # one extra layer so that layer i's output is an un-normed entry of hidden_states
        lm.layers = nn.ModuleList([layers[i], layers[i + 1]])
        lm.config.num_hidden_layers = 2
        out = lm(inputs_embeds=hidden, position_ids=pos, attention_mask=torch.ones_like(pos),
                 use_cache=False, output_hidden_states=True, output_attentions=True)
    finally:
        lm.layers, lm.config.num_hidden_layers = layers, n
    return out.hidden_states[1], out.attentions[0][0].mean(0)


@torch.no_grad()
def official_sparsevlm(model, eager, one: dict, pruning_loc: list[int], keep: int) -> dict:
    """The official selection on one unpadded sample: raters and, per stage, (slots, visual rows after it)."""
    image = one["input_ids"][0] == model.config.image_token_id
    v_start = int(image.nonzero()[0])
    v_num = int(image.sum())
    n_orig = v_num
    hidden = hf_hidden(model, one, 0)  # the embeddings
    v_t, t_t = hidden[0, v_start : v_start + v_num], hidden[0, v_start + v_num :]
    raters = ref_raters(v_t, t_t)  # relative to the first text token after the image
    pos = torch.arange(hidden.shape[1])[None]
    stages = []
    for i in range(max(pruning_loc) + 1):
        out, attn = eager_layer(eager, hidden, pos, i)
        if i not in pruning_loc:
            hidden = out
            continue
        t_start = v_start + v_num
        relation = attn[raters + t_start, v_start:t_start].mean(0)  # mean over raters of head-mean rows
        k, cap = ref_counts(keep, n_orig, v_num, pruning_loc.index(i))
        vis = out[0, v_start:t_start]
        if k >= v_num:
            stages.append((torch.arange(v_num), vis))
            hidden = out
            continue
        kept = relation.topk(k).indices.sort().values
        deleted = torch.tensor([j for j in range(v_num) if j not in set(kept.tolist())], dtype=torch.long)
        pool = deleted[relation[deleted].topk(int(deleted.numel() * 0.3) + 1).indices]  # top 30% + 1, by score
        c = min(int(pool.numel() / 10) + 1, cap)
        merged = ref_cluster_and_merge(vis[pool], c)
        rows = torch.cat([vis[kept], merged])  # merged tokens right after the kept visual tokens
        slots = torch.cat([kept, deleted[deleted.numel() - c :]]).sort().values
        stages.append((slots, rows))
        hidden = torch.cat([out[:, :v_start], rows[None], out[:, t_start:]], 1)
        pos = torch.arange(hidden.shape[1])[None]  # v1.x: position_ids[:, :new_len]
        v_num = rows.shape[0]
    return {"raters": raters, "stages": stages}


def test_sites_are_the_official_layers_plus_one():
    pruner = load_pruner("sparsevlm", keep=64)
    sites = {n: pruner.sites(SimpleNamespace(num_layers=n)) for n in (4, 8, 32, 40)}
    official = ["llm:3", "llm:7", "llm:16"]  # layers 2/6/15 score and prune their own output
    assert sites == {4: ["llm:1", "llm:2", "llm:3"], 8: ["llm:1", "llm:2", "llm:4"], 32: official, 40: official}
    with pytest.raises(ValueError):
        pruner.sites(SimpleNamespace(num_layers=2))


@pytest.mark.parametrize("retain", sorted(SCORE_PY))
def test_presets_reproduce_score_py_on_576_tokens(retain):
    pruner = load_pruner("sparsevlm", keep=_final(SCORE_PY[retain]))
    n, got = 576, []
    for stage in range(3):
        k, cap = pruner.stage_counts(pruner.keep, 576, n, stage)
        got.append(k)
        n = k + min(_merged(n - k), cap)
    assert got == SCORE_PY[retain] and n == pruner.keep


@torch.no_grad()
def test_raters_use_the_unscaled_product_of_the_embeddings():
    from learned_prune.engine.adapter import LlavaAdapter
    from learned_prune.engine.state import LayerTrace, PruneState
    from learned_prune.engine.tokens import TokenSequence

    g = torch.Generator().manual_seed(0)
    B, pad, pre, nv, nt, d = 2, 2, 2, 6, 9, 16
    L = pad + pre + nv + nt
    h = torch.randn(B, L, d, generator=g)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, :pad] = False  # sample 1 left-padded
    rank = torch.full((B, L), -1)
    rank[:, pad + pre : pad + pre + nv] = torch.arange(nv)
    seq = TokenSequence(hidden=h, pos=torch.arange(L).expand(B, L), valid=valid, visual_rank=rank,
                        n_visual_original=torch.full((B,), nv))
    trace = LayerTrace(h_in=h, attn_in=h, attn_out=h, mlp_in=h, mlp_out=h, h_out=h)
    pruner = load_pruner("sparsevlm", keep=4)
    vpos, vvalid = seq.visual_positions()
    state = PruneState(site="llm:1", layer=1, mode="hard", seq=seq, adapter=LlavaAdapter(get_tiny("llava")[0]),
                       visual_pos=vpos, visual_valid=vvalid)
    pruner.observe(0, trace, state)
    for b in range(B):
        v_t, t_t = h[b, pad + pre : pad + pre + nv], h[b, pad + pre + nv :]
        got = seq.extras["sparsevlm_raters"][b, pad + pre + nv :].nonzero()[:, 0]
        assert torch.equal(got, ref_raters(v_t, t_t))
        assert not torch.equal(got, ref_raters(v_t, t_t, d**-0.5))  # the case tells the two rules apart
        assert not seq.extras["sparsevlm_raters"][b, : pad + pre + nv].any()  # only text after the image


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("keep", [10, 0.2])
def test_selection_equals_official_on_a_padded_batch(family, keep):
    model, processor = get_tiny(family)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    batch = make_batch(processor, 3)
    eager(**batch, output_hidden_states=True)  # HF installs its output-capturing hooks on every layer now
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
    batch["position_ids"] = positions_from_mask(batch["attention_mask"])
    pruner = load_pruner("sparsevlm", keep=keep)
    records = record_selections(pruner)
    seen = []
    original = pruner.raters
    pruner.raters = lambda state: seen.append((state.seq.valid.clone(), r := original(state))) or r
    with pruner(model):
        model(**batch)
    sites = [int(site.split(":")[1]) for _, site, _ in records]
    assert sites == [1, 2, 3]
    for b in range(3):
        valid = batch["attention_mask"][b].bool()
        one = {k: v[b : b + 1] for k, v in batch.items() if k != "position_ids"}
        one["input_ids"], one["attention_mask"] = one["input_ids"][:, valid], one["attention_mask"][:, valid]
        n_vis = int((one["input_ids"] == model.config.image_token_id).sum())
        budget = keep if isinstance(keep, int) else round(n_vis * keep)
        ref = official_sparsevlm(model, eager, one, [s - 1 for s in sites], budget)
        ids = batch["input_ids"][b]
        text = (torch.arange(ids.shape[0]) > (ids == model.config.image_token_id).nonzero().max()) & valid
        assert torch.equal(seen[0][1][b][text].nonzero()[:, 0], ref["raters"])
        for (_, _, sel), (slots, rows) in zip(records, ref["stages"]):
            ok = sel.indices[b] >= 0
            assert torch.equal(sel.indices[b][ok], slots)
            torch.testing.assert_close(sel.values[b][ok], rows, atol=1e-4, rtol=0)
        assert 0 < len(ref["stages"][-1][0]) <= budget
