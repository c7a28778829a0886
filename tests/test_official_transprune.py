"""TransPrune against an independent re-statement of the official selection (liaolea/TransPrune,
``llava/model/modeling_llama_transprune.py``: ``LlamaDecoderLayer_TransPrune.compute_transf_weight``,
``LlamaModel.transprune_forward`` and ``transprune_rank_drop``).

The reference runs plain HF decoder layers on one unpadded sample, with forward hooks on each layer's
``self_attn`` and ``mlp`` to read every sub-layer's normed input and branch output. Over the
accumulating layers it sums, per token, ``(|out| / |in|) * exp(1 - cos(in, out)) / sum_tokens exp(...)``
of both sub-layers; at each pruning layer it takes the eager attention of the layer the tokens enter
next (``output_attentions=True`` on an eager copy), rows = every token after the image, mean over heads
then over those rows; score = TTV / (sum + 1e-8) + IGA / (sum + 1e-8) over the image tokens, top-k,
sorted; the accumulated TTV follows the kept tokens; the sequence continues with positions 0..L'-1.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from learned_prune import load_pruner

from conftest import get_tiny, make_batch, positions_from_mask
from helpers import hf_hidden, hf_segment, record_selections

RATIOS = (0.875, 0.625, 0.125)


def ref_counts(keep: int | float, n_orig: int) -> list[int]:
    """The project's budget rule: ``keep`` tokens after the last stage, earlier stages in the paper's proportions."""
    last = keep if isinstance(keep, int) else max(1, round(n_orig * keep))
    return [min(n_orig, max(1, round(last * r / RATIOS[-1]))) for r in RATIOS]


def ref_ttv(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """compute_transf_weight on one unpadded sample, (L,)."""
    ratio = x_out.norm(dim=-1) / x_in.norm(dim=-1)
    e = torch.exp(1 - nn.functional.cosine_similarity(x_in, x_out, dim=-1))
    return ratio * e / e.sum()


@torch.no_grad()
def run_layer(model, hidden: torch.Tensor, pos: torch.Tensor, i: int) -> tuple[torch.Tensor, dict]:
    """Output of plain HF decoder layer i and, per sub-layer, (normed input, branch output)."""
    layer = model.model.language_model.layers[i]
    seen = {}

    def hook(name):
        def record(module, args, kwargs, out):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            seen[name] = (x[0].float(), (out[0] if isinstance(out, tuple) else out)[0].float())
        return record

    handles = [layer.self_attn.register_forward_hook(hook("attn"), with_kwargs=True),
               layer.mlp.register_forward_hook(hook("mlp"), with_kwargs=True)]
    try:
        out = hf_segment(model, hidden, pos, i, i + 1)
    finally:
        for h in handles:
            h.remove()
    return out, seen


@torch.no_grad()
def eager_attention(eager, hidden: torch.Tensor, pos: torch.Tensor, i: int) -> torch.Tensor:
    """Head-mean softmax attention (L, L) of decoder layer i on these hidden states, from HF eager attention."""
    lm = eager.model.language_model
    layers, n = lm.layers, lm.config.num_hidden_layers
    try:
        lm.layers = nn.ModuleList(list(layers)[i : i + 2])
        lm.config.num_hidden_layers = len(lm.layers)
        out = lm(inputs_embeds=hidden, position_ids=pos, attention_mask=torch.ones_like(pos),
                 use_cache=False, output_attentions=True)
    finally:
        lm.layers, lm.config.num_hidden_layers = layers, n
    return out.attentions[0][0].float().mean(0)


@torch.no_grad()
def official_transprune(model, eager, one: dict, sites: list[int], observed: list[int], keep, score_layer: str):
    """Kept indices (among the image tokens present) at each pruning layer, for one unpadded sample."""
    image = one["input_ids"][0] == model.config.image_token_id
    start, n = int(image.nonzero()[0]), int(image.sum())
    counts = ref_counts(keep, n)
    hidden = hf_hidden(model, one, 0)
    pos = torch.arange(hidden.shape[1])[None]
    acc = torch.zeros(hidden.shape[1])
    before = hidden  # the input of the layer that ran last
    stages = []
    for i in range(max(sites) + 1):
        if i in sites:
            end = start + n
            at = i if score_layer == "current" else i - 1
            attn = eager_attention(eager, hidden if score_layer == "current" else before, pos, at)
            iga = attn[end:, start:end].mean(0)  # every token after the image, mean over them
            ttv = acc[start:end]
            score = ttv / (ttv.sum() + 1e-8) + iga / (iga.sum() + 1e-8)
            kept = score.topk(min(counts[sites.index(i)], n)).indices.sort().values
            stages.append(kept)
            rows = torch.cat([torch.arange(start), start + kept, torch.arange(end, hidden.shape[1])])
            hidden, acc, n = hidden[:, rows], acc[rows], kept.numel()
            pos = torch.arange(hidden.shape[1])[None]  # re-packed: position_ids[i, :len] = arange(len)
        if i == max(sites):
            break
        before = hidden
        hidden, seen = run_layer(model, hidden, pos, i)
        if i in observed:
            acc = acc + ref_ttv(*seen["attn"]) + ref_ttv(*seen["mlp"])
    return stages


def test_sites_and_accumulating_layers_are_the_official_ones_at_32_layers():
    pruner = load_pruner("transprune", keep=72)
    llama7b = SimpleNamespace(num_layers=32)
    assert pruner.sites(llama7b) == ["llm:7", "llm:9", "llm:12"]  # pruning after 1-based layers 7, 9, 12
    assert pruner.observe_layers(llama7b) == list(range(6, 12))  # accumulating 1-based layers 7..12
    assert pruner.score_layer == "current" and pruner.repack_positions is True
    tiny = SimpleNamespace(num_layers=4)
    assert pruner.sites(tiny) == ["llm:1", "llm:2", "llm:3"] and pruner.observe_layers(tiny) == [0, 1, 2]


def test_ref_counts_are_the_official_schedule_on_576_tokens():
    assert ref_counts(0.125, 576) == [504, 360, 72]
    assert [int(576 * r) for r in RATIOS] == [504, 360, 72]


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("keep,score_layer", [(16, "current"), (0.1, "current"), (16, "previous")])
def test_selection_equals_official_on_a_padded_batch(family, keep, score_layer):
    model, processor = get_tiny(family)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    batch = make_batch(processor, 3)
    eager(**batch, output_attentions=True)  # HF installs its output-capturing hooks on every layer now
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
    batch["position_ids"] = positions_from_mask(batch["attention_mask"])
    pruner = load_pruner("transprune", keep=keep, score_layer=score_layer)
    records = record_selections(pruner)
    with pruner(model):
        model(**batch)
    sites = [int(site.split(":")[1]) for _, site, _ in records]
    assert sites == [1, 2, 3]
    observed = pruner.observe_layers(SimpleNamespace(num_layers=4))
    for b in range(3):
        valid = batch["attention_mask"][b].bool()
        one = {k: v[b : b + 1] for k, v in batch.items() if k != "position_ids"}
        one["input_ids"], one["attention_mask"] = one["input_ids"][:, valid], one["attention_mask"][:, valid]
        ref = official_transprune(model, eager, one, sites, observed, keep, score_layer)
        for (_, site, sel), kept in zip(records, ref):
            ok = sel.indices[b] >= 0
            assert torch.equal(sel.indices[b][ok], kept), (family, b, site)
        assert len(ref[-1]) == (keep if isinstance(keep, int) else ref_counts(keep, int(one["input_ids"].eq(
            model.config.image_token_id).sum()))[-1])
