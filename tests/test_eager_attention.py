"""The engine under attention implementations other than SDPA.

HF's eager attention adds whatever mask it is given and applies no causal mask of its own;
flash attention takes a 2-D padding mask and is causal by itself. The engine
builds its own masks, so it must hand each implementation the kind HF would: these tests check
keep-all equals plain HF, and a real prune equals the same prune under SDPA, on both families,
for an unpadded prompt and a left-padded batch, in prefill and in greedy generation. Flash
attention runs through HF's real flash path (unpadding, packed-sequence detection) with small
torch kernels in place of the CUDA ones.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import transformers.modeling_flash_attention_utils as fa_utils

from learned_prune import load_pruner

from conftest import get_tiny, make_batch, positions_from_mask
from helpers import record_selections

ATOL = 2e-4
_COPIES: dict = {}


def with_attention(family: str, impl: str):
    """A deep copy of the tiny ``family`` model whose text model runs attention ``impl`` (cached)."""
    if (family, impl) not in _COPIES:
        model, _ = get_tiny(family)
        m = copy.deepcopy(model)
        if impl.startswith("flash"):  # no flash-attn package on CPU: set the name, kernels come from _fake_flash
            m.config.text_config._attn_implementation = impl
        else:
            m.set_attn_implementation(impl)
        _COPIES[family, impl] = m
    return _COPIES[family, impl]


def _inputs(processor, padded: bool) -> dict:
    if padded:
        b = make_batch(processor, 3)
        assert (b["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
        b["position_ids"] = positions_from_mask(b["attention_mask"])
        return b
    return make_batch(processor, 1)


def _greedy(model, batch: dict, steps: int = 4) -> torch.Tensor:
    batch = {k: v for k, v in batch.items() if k != "position_ids"}
    image = model.config.image_token_id  # a random model may emit <image>
    return model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                          suppress_tokens=[image])


KEEP_ALL = {"none": {}, "fastv": {"keep": 1.0}, "random": {"keep": 1.0}}


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("name", list(KEEP_ALL))
def test_keep_all_under_eager_equals_plain_hf_eager(family, name, padded):
    _, processor = get_tiny(family)
    model = with_attention(family, "eager")
    assert model.model.language_model.config._attn_implementation == "eager"
    batch = _inputs(processor, padded)
    ref = model(**batch).logits
    ref_gen = _greedy(model, batch)
    with load_pruner(name, **KEEP_ALL[name])(model):
        out = model(**batch).logits
        gen = _greedy(model, batch)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL, rtol=0)
    assert torch.equal(gen, ref_gen)


def _prune_runs(model, batch: dict, name: str, **kwargs) -> tuple:
    pruner = load_pruner(name, **kwargs)
    records = record_selections(pruner)
    with pruner(model) as engine:
        logits = model(**batch).logits
        gen = _greedy(model, batch)
    return logits, gen, records, engine.output_valid


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_fastv_under_eager_equals_fastv_under_sdpa(family, padded):
    model, processor = get_tiny(family)
    batch = _inputs(processor, padded)
    ref, ref_gen, ref_rec, valid = _prune_runs(model, batch, "fastv", keep=8)
    out, gen, rec, _ = _prune_runs(with_attention(family, "eager"), batch, "fastv", keep=8)
    assert torch.equal(rec[0][2].indices, ref_rec[0][2].indices)
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL, rtol=0)
    assert torch.equal(gen, ref_gen)


@torch.no_grad()
def test_soft_mode_under_eager_equals_soft_mode_under_sdpa(family):
    """The float log-mask of soft mode (keep-probabilities on the keys) under eager attention."""
    model, processor = get_tiny(family)
    batch = _inputs(processor, True)
    eager = with_attention(family, "eager")
    pruner = load_pruner("fastv", keep=8)
    with pruner(model, mode="soft"):
        ref = model(**batch).logits
    with pruner(eager, mode="soft"):
        out = eager(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL, rtol=0)
    assert not torch.allclose(out[valid], eager(**batch).logits[valid], atol=1e-3)  # the log-mask did act


# ---- flash attention: HF's flash path with torch kernels --------------------------------------
def _attend(q, k, v, scale, causal):
    """One sequence: q (Sq, H, D), k/v (Sk, Hkv, D); causal aligned bottom-right as flash-attn >= 2.1."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * (scale or q.shape[-1] ** -0.5)
    if causal:
        Sq, Sk = q.shape[0], k.shape[0]
        allowed = torch.arange(Sk)[None] <= torch.arange(Sq)[:, None] + (Sk - Sq)
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.float()).to(q.dtype)


def _flash_fn(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])


def _flash_varlen_fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     softmax_scale=None, causal=False):
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return torch.cat([_attend(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], softmax_scale, causal)
                      for i in range(len(cq) - 1)])


@pytest.fixture
def fake_flash(monkeypatch):
    fake = lambda *a, **kw: (_flash_fn, _flash_varlen_fn, None, fa_utils._pad_input, fa_utils._unpad_input)
    monkeypatch.setattr(fa_utils, "_lazy_imports", fake)
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_flash_attention_keep_all_and_prune(family, padded, fake_flash):
    """Keep-all equals plain HF flash; FastV (kept tokens at gapped positions, which HF's flash path
    inspects for packed sequences) equals FastV under SDPA, in prefill and greedy decoding."""
    model, processor = get_tiny(family)
    flash = with_attention(family, "flash_attention_2")
    batch = _inputs(processor, padded)
    valid = batch["attention_mask"].bool()
    ref = flash(**batch).logits
    torch.testing.assert_close(ref[valid], model(**batch).logits[valid], atol=ATOL, rtol=0)  # the kernels are right
    with load_pruner("none")(flash):
        torch.testing.assert_close(flash(**batch).logits[valid], ref[valid], atol=ATOL, rtol=0)
    ref, ref_gen, ref_rec, kept_valid = _prune_runs(model, batch, "fastv", keep=8)
    out, gen, rec, _ = _prune_runs(flash, batch, "fastv", keep=8)
    assert torch.equal(rec[0][2].indices, ref_rec[0][2].indices)
    torch.testing.assert_close(out[kept_valid], ref[kept_valid], atol=ATOL, rtol=0)
    assert torch.equal(gen, ref_gen)


# ---- refusals ---------------------------------------------------------------------------------
def test_flash_attention_refuses_soft_mode(family):
    flash = with_attention(family, "flash_attention_2")
    with pytest.raises(ValueError, match="flash_attention_2.*sdpa"):
        with load_pruner("fastv", keep=8)(flash, mode="soft"):
            pass  # pragma: no cover


@pytest.mark.parametrize("impl", ["flex_attention", "paged|eager", "my_custom_kernel"])
def test_unsupported_attention_is_refused_at_install(family, impl, monkeypatch):
    """Flex attention (it needs a compiled BlockMask), paged attention and unknown kernels."""
    model = with_attention(family, "eager")
    monkeypatch.setattr(model.config.text_config, "_attn_implementation_internal", impl)
    with pytest.raises(ValueError, match=f"{re.escape(impl)}.*set_attn_implementation\\('sdpa'\\)"):
        with load_pruner("fastv", keep=8)(model):
            pass  # pragma: no cover
    assert "forward" not in model.model.language_model.__dict__  # nothing left installed
