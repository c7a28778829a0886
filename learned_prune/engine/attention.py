"""Attention rows rebuilt from a decoder layer's own projections: the one place the package does this.

A row of softmax attention is recomputed from the layer's ``input_layernorm``, ``q_proj`` and RoPE
for the requested query rows only, against the layer's keys (captured from its ``k_proj`` during
the forward pass, or projected here), so SDPA/FlashAttention stay on and no full attention matrix
is materialised. :func:`attention_rows` works on plain tensors (the testbed's grounding loss uses
it on HF outputs); :func:`llm_attention` and :func:`previous_layer_keys` serve a
:class:`~.state.PruneState`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .tokens import gather_rows

if TYPE_CHECKING:  # pragma: no cover
    from .state import PruneState


def query_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, R) of the True entries of ``mask`` (B, L) in order, R >= 1, and their validity (B, R)."""
    counts = mask.sum(1)
    r = max(int(counts.max()), 1)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :r]
    valid = torch.arange(r, device=mask.device)[None] < counts[:, None]
    return order, valid


def rope_keys(rotary_emb: nn.Module | Callable, keys: torch.Tensor, pos: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``k_proj`` outputs (B, L, H_kv * head_dim) at positions ``pos`` -> post-RoPE keys (B, H_kv, L, head_dim)."""
    B, L = keys.shape[:2]
    k = keys.view(B, L, -1, head_dim).transpose(1, 2)
    cos, sin = rotary_emb(k, pos)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k


def attention_rows(
    block: nn.Module,
    rotary_emb: nn.Module | Callable,
    x: torch.Tensor,
    pos: torch.Tensor,
    key_valid: torch.Tensor,
    query_pos: torch.Tensor,
    query_valid: torch.Tensor,
    keys: torch.Tensor | None = None,
    key_logmask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean softmax attention of decoder layer ``block`` from rows ``query_pos`` onto every token, (B, R, L).

    ``rotary_emb``: the decoder's rotary embedding, or a family adapter's ``rope`` (which takes its position
    form). ``x`` (B, L, D): the hidden states entering the layer; ``pos`` (B, L) their RoPE positions ((B, L, 3)
    M-RoPE ids with an adapter's ``rope``);
    ``key_valid`` (B, L) the keys a query may see (causality is added: a query sees keys at or before
    its own row); ``query_pos``/``query_valid`` (B, R) from :func:`query_rows` (rows of invalid queries
    hold harmless values). ``keys``: the layer's ``k_proj`` output on ``x`` when captured already, else
    projected here. ``key_logmask`` (B, L): added to the scores (soft mode's log keep-probabilities).
    Differentiable; scores in float32.
    """
    attn = block.self_attn
    B, R = query_pos.shape
    if keys is None:
        keys = attn.k_proj(block.input_layernorm(x))
    rows = gather_rows(x, query_pos)
    q = attn.q_proj(block.input_layernorm(rows)).view(B, R, -1, attn.head_dim).transpose(1, 2)
    cos, sin = rotary_emb(q, gather_rows(pos, query_pos))
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    k = rope_keys(rotary_emb, keys, pos, attn.head_dim)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling  # (B, H, R, L)
    L = k.shape[2]
    allowed = key_valid[:, None, :] & (torch.arange(L, device=q.device)[None, None] <= query_pos[:, :, None])
    allowed = allowed | ~query_valid[:, :, None]  # padded query rows: harmless values
    if key_logmask is not None:
        scores = scores + key_logmask[:, None, None, :]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1).mean(1)


def _query_mask(state: "PruneState", queries: str | torch.Tensor) -> torch.Tensor:
    seq = state.seq
    if isinstance(queries, torch.Tensor):
        return queries.bool() & seq.valid
    L = seq.valid.shape[1]
    if queries == "last":
        idx = torch.arange(L, device=seq.valid.device).expand_as(seq.valid)
        last = torch.where(seq.prompt_valid, idx, torch.full_like(idx, -1)).amax(1, keepdim=True)
        return idx == last  # the last prompt token (teacher-forced answers excluded)
    if queries == "instruction":
        mask = seq.instruction_mask()
        if bool((mask.sum(1) == 0).any()):  # no text after the image: fall back to the last token
            return mask | _query_mask(state, "last") & (mask.sum(1, keepdim=True) == 0)
        return mask
    raise ValueError(f"queries must be 'last', 'instruction' or a (B, L) bool mask, got {queries!r}")


def _layer_inputs(state: "PruneState", layer: str) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """(layer index, its input hidden states, its captured k_proj output or None), ``layer``: previous or current."""
    seq = state.seq
    if layer == "previous":
        if state.layer < 1 or seq.prev_input is None:
            raise ValueError(f"attention of the previous layer needs a site llm:K with K >= 1, got {state.site}")
        return state.layer - 1, seq.prev_input, seq.prev_keys
    if layer == "current":
        return state.layer, seq.hidden, None
    raise ValueError(f"layer must be 'previous' or 'current', got {layer!r}")


def previous_layer_keys(state: "PruneState") -> torch.Tensor:
    """Post-RoPE keys of layer K-1, (B, H_kv, L, head_dim)."""
    idx, x, k = _layer_inputs(state, "previous")
    block = state.adapter.lm.layers[idx]
    if k is None:
        k = block.self_attn.k_proj(block.input_layernorm(x))
    return rope_keys(state.adapter.rope, k, state.seq.pos, block.self_attn.head_dim)


def llm_attention(state: "PruneState", queries: str | torch.Tensor, layer: str) -> torch.Tensor:
    """Head-mean softmax attention from the chosen query rows onto each visual token, mean over the rows, (B, Nv)."""
    lm, seq = state.adapter.lm, state.seq
    idx, x, k = _layer_inputs(state, layer)
    qpos, qvalid = query_rows(_query_mask(state, queries))
    logmask = None if seq.keep_prob is None else torch.log(seq.keep_prob.float() + state.soft_eps)
    probs = attention_rows(lm.layers[idx], state.adapter.rope, x, seq.pos, seq.valid, qpos, qvalid, k, logmask)
    probs = torch.where(qvalid[..., None], probs, 0).sum(1) / qvalid.sum(1, keepdim=True).clamp_min(1)
    out = torch.gather(probs, 1, state.visual_pos)
    return out.masked_fill(~state.visual_valid, 0).to(x.dtype)
