"""Two-turn answering on one KV cache: the pruning of the first turn carries into the second.

:func:`two_turn_answers` runs, inside the caller's ``with pruner(model):`` block, the first prompt
(prefill: every pruning site acts once, as in a single-turn evaluation), greedy-decodes its answer,
then appends the end of that answer (the model's own tokens, an EOS when it did not stop) and the
second user turn (``batch["followup_prompts"]``) as one chunk on the same cache and greedy-decodes
the second answer. The second turn therefore sees only the visual tokens the first turn kept: the
question is whether that pruning, chosen for the first question, still serves a question about
another object. Positions follow ``generate()``'s rule (cumulative sum of the attention mask), so
the first turn's answers are ``generate()``'s; tokens after a sample's EOS are masked out, and a
batch's chunks are left-padded inside the sequence (masked), so batching does not change answers.
"""

from __future__ import annotations

from typing import Any

import torch


def _positions(mask: torch.Tensor, last: int) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -last:]


def _greedy(model: torch.nn.Module, logits: torch.Tensor, cache: Any, mask: torch.Tensor, eos: int, pad: int,
            max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy tokens from ``logits`` (B, V) on; returns the tokens (B, T; ``pad`` after EOS), whether each
    sample stopped, the attention mask with the tokens fed back (all but the last), and whether the last
    token belongs to the answer (it was generated before the sample's EOS, or is that EOS)."""
    B = logits.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    out = []
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1).masked_fill(done, pad)
        out.append(nxt)
        was_done, done = done, done | (nxt == eos)
        if step == max_new_tokens - 1:
            return torch.stack(out, 1), done, mask, ~was_done
        mask = torch.cat([mask, (~was_done).long()[:, None]], 1)
        step_out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=_positions(mask, 1),
                         past_key_values=cache, use_cache=True)
        logits = step_out.logits[:, -1]
    raise ValueError(f"max_new_tokens={max_new_tokens}: generate at least 1 token")


@torch.no_grad()
def two_turn_answers(model: torch.nn.Module, processor: Any, batch: dict, max_new_tokens: int = 2
                     ) -> tuple[list[str], list[str]]:
    """The first and second answers of each sample of ``batch`` (a VQA batch with ``followup_prompts``)."""
    tok = processor.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    inputs = {"pixel_values": batch["pixel_values"], **({"image_sizes": batch["image_sizes"]}
                                                         if "image_sizes" in batch else {})}
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask, ids.shape[1]), use_cache=True,
                **inputs)
    cache = out.past_key_values
    first, stopped, mask, last_valid = _greedy(model, out.logits[:, -1], cache, mask, eos, pad, max_new_tokens)
    chunks = []
    for b, prompt in enumerate(batch["followup_prompts"]):
        pending = [int(first[b, -1])] if last_valid[b] else []  # the answer's last token, not yet in the cache
        if not stopped[b]:
            pending.append(eos)  # the answer did not end: close the turn as the conversation format does
        chunks.append(pending + tok(prompt, add_special_tokens=False)["input_ids"])
    L = max(len(c) for c in chunks)
    chunk = torch.full((len(chunks), L), pad, dtype=ids.dtype)
    chunk_mask = torch.zeros((len(chunks), L), dtype=mask.dtype)
    for b, c in enumerate(chunks):
        chunk[b, L - len(c):], chunk_mask[b, L - len(c):] = torch.tensor(c, dtype=ids.dtype), 1
    mask = torch.cat([mask, chunk_mask], 1)
    out = model(input_ids=chunk, attention_mask=mask, position_ids=_positions(mask, L), past_key_values=cache,
                use_cache=True)
    second = _greedy(model, out.logits[:, -1], cache, mask, eos, pad, max_new_tokens)[0]
    return tok.batch_decode(first, skip_special_tokens=True), tok.batch_decode(second, skip_special_tokens=True)
