"""The decoder loop: the language model's ``forward`` with pruning sites, and its KV-cache bookkeeping.

It is ``LlamaModel.forward`` with sites: before decoder layer K (``llm:K``; ``vision`` acts before
layer 0 on the projected image tokens) each pruner's :class:`~.selection.Selection` is applied
(:mod:`.apply`); later layers get matching RoPE tables and masks. In hard mode layers between two
prunes hold one key layout in their caches (:class:`KeyLayout`); decoding steps extend each layout
with the new token at its own positions. Hidden states and attentions, when asked for, are
recorded on the way (:mod:`.outputs`); the cache a prefill filled follows the engine (:mod:`.cache`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from .apply import hard_gather, key_logmask, soft_mask
from .cache import adopt, check_cache
from .masks import build_mask, mask_kind
from .outputs import Recorder
from .selection import LayerTrace, Selection
from .state import PruneState
from .tokens import TokenSequence

if TYPE_CHECKING:  # pragma: no cover
    from .core import Engine

UNKNOWN_VISUAL = (
    "the pruning engine cannot tell which rows of inputs_embeds are image tokens: without input_ids they are "
    "found, as HF finds them, only when the images come with the call (rows equal to the <image> token's embedding, "
    "filled from pixel_values). Pass input_ids (with the processor's <image> placeholders) and pixel_values, or "
    "inputs_embeds = model.get_input_embeddings()(input_ids) together with pixel_values; embeddings that already "
    "hold the image features cannot be pruned."
)


@dataclass
class KeyLayout:
    """The key layout shared by the layers between two hard prunes (what their KV caches hold)."""

    valid: torch.Tensor  # (B, K) keys held by these layers' caches
    logmask: torch.Tensor | None
    offset: torch.Tensor  # (B,) how far positions were shifted down by re-packing
    next_pos: torch.Tensor  # (B,) position of the next decoded token
    rows: torch.Tensor  # (B, L') which of the prompt keys are the prefill's output rows
    n_prompt: int  # keys the prefill left in these layers' caches

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch operation (beam reordering, selection, repetition) to every per-sample tensor."""
        self.valid, self.offset, self.next_pos = fn(self.valid), fn(self.offset), fn(self.next_pos)
        self.rows = fn(self.rows)
        self.logmask = None if self.logmask is None else fn(self.logmask)

    def drop_last(self, n: int) -> None:
        """Forget the last ``n`` keys (decoded tokens a cache crop removed)."""
        self.valid = self.valid[:, : self.valid.shape[1] - n]
        self.logmask = None if self.logmask is None else self.logmask[:, : self.logmask.shape[1] - n]
        self.next_pos = self.next_pos - n


@dataclass
class CacheLayout:
    """The key layouts of one prefill, for the decoding steps that continue it on the same cache."""

    cache: Any  # weak reference to the KV cache the prefill filled
    layouts: list[KeyLayout] = field(default_factory=list)
    layer_layout: list[int] = field(default_factory=list)  # decoder layer -> index into layouts


def lm_forward(
    engine: "Engine",
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    use_cache: bool | None = None,
    **kwargs: Any,
) -> BaseModelOutputWithPast:
    """The language model's ``forward`` while the engine is installed: a prefill runs the sites, a decoding step
    continues on the key layouts the prefill left."""
    lm = engine.adapter.lm
    check_cache(past_key_values)
    recorder = Recorder.asked(kwargs, lm.config, mask_kind(lm.config._attn_implementation, engine.mode))
    if inputs_embeds is None:
        inputs_embeds = lm.embed_tokens(input_ids)
    if use_cache is None:
        use_cache = lm.config.use_cache and not engine.adapter.model.training
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache(config=lm.config)
    B, q = inputs_embeds.shape[:2]
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("the pruning engine takes a 2-D attention_mask (batch, seq); got a "
                         f"{attention_mask.dim()}-D one")
    new_valid = (
        attention_mask[:, -q:].bool() if attention_mask is not None
        else torch.ones(B, q, dtype=torch.bool, device=inputs_embeds.device)
    )
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    step = prefill if past == 0 else decode
    with recorder.attention_hooks(lm.layers):
        hidden, record = step(engine, inputs_embeds, new_valid, position_ids, past_key_values, use_cache, kwargs,
                              recorder)
    engine.capture.consumed()  # a later generate() pre-encoding must not see this call's ids
    last = lm.norm(hidden)
    states, attentions = recorder.result(record, last, prefill=step is prefill)
    return BaseModelOutputWithPast(last_hidden_state=last, past_key_values=past_key_values if use_cache else None,
                                   hidden_states=states, attentions=attentions)


def prefill(engine: "Engine", embeds, valid, position_ids, cache, use_cache, kwargs,
            recorder: Recorder) -> tuple[torch.Tensor, CacheLayout]:
    """Run every decoder layer on the prompt, applying the sites; record the key layouts for decoding."""
    adapter, capture = engine.adapter, engine.capture
    lm = adapter.lm
    B, q = embeds.shape[:2]
    device = embeds.device
    pos = adapter.prefill_positions(position_ids, B, q, device)  # (B, q), or (B, q, 3) M-RoPE ids
    visual = capture.visual
    if visual is None or visual.shape != (B, q):
        if engine.sites:
            raise ValueError(UNKNOWN_VISUAL)
        visual = torch.zeros(B, q, dtype=torch.bool, device=device)
    visual = visual.to(device)
    if capture.generated is not None:  # <image> ids generated after the prompt (use_cache=False): text, as cached
        token = lm.embed_tokens(torch.full((), engine.adapter.image_token_id, device=device))
        embeds = torch.where(capture.generated.to(device)[..., None], token.to(embeds.dtype), embeds)
    rank = torch.where(visual, visual.long().cumsum(1) - 1, torch.full_like(visual, -1, dtype=torch.long))
    seq = TokenSequence(hidden=embeds, pos=pos, valid=valid, visual_rank=rank, n_visual_original=visual.sum(1))
    answer = capture.answer_mask()
    if answer is not None and answer.shape == (B, q):  # teacher-forced: mark the answer
        seq.extras["answer"] = answer.to(device)
    engine.kept_tokens = {}
    engine.output_index = torch.arange(q, device=device)[None].expand(B, q)
    zeros = torch.zeros(B, dtype=torch.long, device=device)
    layout = KeyLayout(valid=seq.valid, logmask=None, offset=zeros, next_pos=zeros, rows=engine.output_index,
                       n_prompt=q)
    record = CacheLayout(cache=weakref.ref(cache) if cache is not None else None, layouts=[layout])
    rope = adapter.rope(embeds, seq.pos)
    kind = mask_kind(lm.config._attn_implementation, engine.mode)  # the mask this attention takes
    mask = build_mask(seq.valid, None, q, embeds.dtype, kind)
    capture.keys.clear()
    capture.branches.clear()
    recorder.add_hidden(embeds, 0)
    for i, layer in enumerate(lm.layers):
        if i in engine.sites and bool(seq.is_visual.any()):
            seq, offset, index = run_sites(engine, i, seq, layout.offset)
            for g in record.layouts:  # each earlier layout's rows that are still in the sequence
                g.rows = torch.gather(g.rows, 1, index)
            logmask = key_logmask(seq, engine.soft_eps)
            L = seq.hidden.shape[1]
            layout = KeyLayout(valid=seq.valid, logmask=logmask, offset=offset, next_pos=zeros,
                               rows=torch.arange(L, device=device)[None].expand(B, L), n_prompt=L)
            record.layouts.append(layout)
            rope = adapter.rope(seq.hidden, seq.pos)
            mask = build_mask(seq.valid, logmask, L, seq.hidden.dtype, kind)
        record.layer_layout.append(len(record.layouts) - 1)
        seq.prev_input = seq.hidden
        seq.hidden = layer(seq.hidden, attention_mask=mask, position_ids=adapter.layer_position_ids(seq.pos),
                           past_key_values=cache,
                           use_cache=use_cache, position_embeddings=rope, **kwargs)
        recorder.add_hidden(seq.hidden, len(record.layouts) - 1)
        seq.prev_keys = capture.keys.pop(i, None)
        if i in engine.observers:  # each branch's normed input and output, and the residual stream
            attn_in, attn_out = capture.branches.pop((i, "self_attn"))
            mlp_in, mlp_out = capture.branches.pop((i, "mlp"))
            trace = LayerTrace(h_in=seq.prev_input, attn_in=attn_in, attn_out=attn_out,
                               mlp_in=mlp_in, mlp_out=mlp_out, h_out=seq.hidden)
            state = _state(engine, f"llm:{i + 1}", i + 1, seq)
            for p in engine.observers[i]:
                p.observe(i, trace, state)
    scalar = seq.pos if seq.pos.dim() == 2 else seq.pos.amax(-1)  # M-RoPE: the largest of a token's ids
    last_pos = torch.where(seq.valid, scalar, torch.full_like(scalar, -1)).amax(1) + 1
    for g in record.layouts:
        g.next_pos = last_pos + (layout.offset - g.offset)
    engine.cache_layout = record if use_cache else None
    if use_cache and cache is not None:
        adopt(cache, engine, pruned=len(record.layouts) > 1)
    capture.keys.clear()
    engine.output_valid = seq.valid
    return seq.hidden, record


def decode(engine: "Engine", embeds, valid, position_ids, cache, use_cache, kwargs,
           recorder: Recorder) -> tuple[torch.Tensor, CacheLayout]:
    """One decoding step (or several tokens) on the cache a prefill under this engine filled."""
    adapter = engine.adapter
    lm = adapter.lm
    record = engine.cache_layout
    if record is None or record.cache is None or record.cache() is not cache:
        raise RuntimeError(
            "this KV cache was not filled by the installed pruner: run the prefill (or generate()) inside the "
            "same `with pruner(model):` block"
        )
    B, q = embeds.shape[:2]
    ar = torch.arange(q, device=embeds.device)[None]
    kind = mask_kind(lm.config._attn_implementation, engine.mode)
    per_layout = []
    given = adapter.step_positions(position_ids, B, q, embeds.device)  # (B, q) positions of the new tokens
    for g in record.layouts:
        pos = (given - g.offset[:, None]) if given is not None else g.next_pos[:, None] + ar
        g.next_pos = pos[:, -1] + 1
        g.valid = torch.cat([g.valid, valid], 1)
        if g.logmask is not None:
            g.logmask = torch.cat([g.logmask, torch.zeros_like(valid, dtype=g.logmask.dtype)], 1)
        full = adapter.from_scalar(pos)
        per_layout.append((adapter.layer_position_ids(full), adapter.rope(embeds, full),
                           build_mask(g.valid, g.logmask, q, embeds.dtype, kind)))
    hidden = embeds
    recorder.add_hidden(hidden, 0)
    for i, layer in enumerate(lm.layers):
        pos, rope, mask = per_layout[record.layer_layout[i]]
        hidden = layer(hidden, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=use_cache, position_embeddings=rope, **kwargs)
        recorder.add_hidden(hidden, record.layer_layout[i])
    return hidden, record


def _state(engine: "Engine", site: str, layer: int, seq: TokenSequence) -> PruneState:
    vpos, vvalid = seq.visual_positions()
    return PruneState(site=site, layer=layer, mode=engine.mode, seq=seq, adapter=engine.adapter,
                      visual_pos=vpos, visual_valid=vvalid, vision=engine.capture.vision, soft_eps=engine.soft_eps)


def run_sites(
    engine: "Engine", layer: int, seq: TokenSequence, offset: torch.Tensor
) -> tuple[TokenSequence, torch.Tensor, torch.Tensor]:
    """Apply every pruner acting before ``layer``, in order (each on what the previous one left); returns the
    new sequence, the position offset (B,) and the rows (B, L') of the old sequence the new one holds."""
    L = seq.hidden.shape[1]
    rows = torch.arange(L, device=seq.hidden.device)[None].expand(seq.hidden.shape[0], L)
    for pruner, site in engine.sites[layer]:
        state = _state(engine, site, layer, seq)
        vpos, vvalid = state.visual_pos, state.visual_valid
        if vpos.shape[1] == 0:
            break
        sel = pruner.select(state)
        if not isinstance(sel, Selection):
            raise TypeError(f"{type(pruner).__name__}.select must return a Selection, got {type(sel).__name__}")
        if engine.mode == "soft":
            seq = soft_mask(seq, vpos, vvalid, sel)
            kept = torch.gather(seq.keep_prob, 1, vpos).masked_fill(~vvalid, 0)
            engine.kept_tokens[site] = kept.sum(1)
        else:
            repack = pruner.repacks(site)
            if engine.adapter.mrope and getattr(pruner, "repack_positions", None) is None:
                repack = False  # M-RoPE: kept tokens keep their ids unless the pruner asks (families/qwen2_5_vl.py)
            seq, index, removed = hard_gather(seq, vpos, vvalid, sel, repack, engine.adapter.project)
            engine.output_index = torch.gather(engine.output_index, 1, index)
            rows = torch.gather(rows, 1, index)
            offset = offset + removed
            engine.kept_tokens[site] = seq.is_visual.logical_and(seq.valid).sum(1)
    return seq, offset, rows
