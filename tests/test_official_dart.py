"""DART against an independent re-statement of the official selection (ZichenWen1/DART, read in the fork
xqy1111111/DART: ``llava/model/language_model/modeling_llama_self.py``, ``DART.forward`` and
``DART.get_retained_image_token``).

The reference works on one unpadded sample from plain HF outputs: the hidden states leaving layer K-1
(``output_hidden_states``) through the model's final norm; layer K-1's post-RoPE keys, rebuilt from its
own ``input_layernorm``, ``k_proj`` and the model's rotary embedding, heads concatenated. Pivots: the 4
image tokens and the 4 tokens after the image with the largest key L1 norm, visited in the order of
``list(set(image_indices + query_indices))`` over sequence indices; each pivot takes the remaining image
tokens with the lowest cosine similarity to it; the text pivots are dropped at the end.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from learned_prune import load_pruner

from conftest import get_tiny, make_batch, positions_from_mask
from helpers import record_selections

K = 2


def per_pivot(keep: int | float, n: int, budget: str, pivots: int = 8, image_pivots: int = 4) -> list[int]:
    """Tokens each pivot takes, in visiting order. official: TOKEN_TOPK = budget // 8 for every pivot
    (min(retain, n - 4) // 8 for a count, as the LLaVA-NeXT path; ratio r: n * r // 8);
    exact (the project's budget rule): keep - 4 spread over the pivots, the first visited taking the remainder."""
    if budget == "official":
        return [int(n * keep // pivots) if isinstance(keep, float) else min(keep, n - image_pivots) // pivots] * pivots
    k = keep if isinstance(keep, int) else max(1, round(n * keep))
    rest = k - min(k, image_pivots)
    return [rest // pivots + (j < rest % pivots) for j in range(pivots)]


@torch.no_grad()
def official_dart(model, one: dict, keep, budget: str, order: str) -> list[int]:
    """Retained image tokens (indices among the image tokens, sorted) for one unpadded sample."""
    ids = one["input_ids"][0]
    image = ids == model.config.image_token_id
    start, n, L = int(image.nonzero()[0]), int(image.sum()), ids.shape[0]
    end = start + n
    out = model(**one, output_hidden_states=True, use_cache=False)
    lm = model.model.language_model
    state = lm.norm(out.hidden_states[K])[0].float()  # last_layer_state = self.norm(layer_outputs[0])
    layer = lm.layers[K - 1]
    attn = layer.self_attn
    k = attn.k_proj(layer.input_layernorm(out.hidden_states[K - 1])).view(1, L, -1, attn.head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(k, torch.arange(L)[None])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    keys = k.permute(0, 2, 1, 3).reshape(L, -1).float()  # heads concatenated
    image_indices = (keys[start:end].norm(p=1, dim=-1).topk(4).indices + start).tolist()
    query_indices = (keys[end:].norm(p=1, dim=-1).topk(4).indices + end).tolist()
    chosen = set(image_indices + query_indices)
    visit = list(chosen) if order == "official" else image_indices + query_indices
    pool = set(range(start, end)) - set(image_indices)
    for item, take in zip(visit, per_pivot(keep, n, budget)):
        pool_list = list(pool)
        sim = -nn.functional.cosine_similarity(state[item], state[pool_list], dim=-1)
        picked = [pool_list[j] for j in sim.topk(min(take, len(pool_list))).indices.tolist()]
        chosen.update(picked)
        pool.difference_update(picked)
    chosen.difference_update(query_indices)
    return sorted(i - start for i in chosen)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("keep,budget,order", [
    (16, "exact", "official"), (0.1, "exact", "official"), (16, "official", "official"),
    (0.1, "official", "official"), (21, "exact", "norm"),
])
def test_selection_equals_official_on_a_padded_batch(family, keep, budget, order):
    model, processor = get_tiny(family)
    batch = make_batch(processor, 3)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
    batch["position_ids"] = positions_from_mask(batch["attention_mask"])
    pruner = load_pruner("dart", keep=keep, budget=budget, pivot_order=order)
    records = record_selections(pruner)
    with pruner(model):
        model(**batch)
    assert [site for _, site, _ in records] == [f"llm:{K}"]
    sel = records[0][2]
    for b in range(3):
        valid = batch["attention_mask"][b].bool()
        one = {k: v[b : b + 1] for k, v in batch.items() if k != "position_ids"}
        one["input_ids"], one["attention_mask"] = one["input_ids"][:, valid], one["attention_mask"][:, valid]
        ref = official_dart(model, one, keep, budget, order)
        n = int((one["input_ids"] == model.config.image_token_id).sum())
        assert len(ref) == 4 + sum(per_pivot(keep, n, budget))
        ok = sel.indices[b] >= 0
        assert sel.indices[b][ok].tolist() == ref, (family, b)


def test_official_budget_of_the_scripts():
    assert 4 + sum(per_pivot(128, 576, "official")) == 132  # "--max_num_trunction 128" keeps 132 tokens
    assert 4 + sum(per_pivot(128, 576, "exact")) == 128
