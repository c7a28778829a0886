"""Multi-turn conversations rendered with the backbone's own chat template, with answer-only labels.

:func:`render` turns ``(role, text)`` messages into the text the model is trained on and the
character spans of every assistant turn. With ``template="auto"`` it uses the processor's
``apply_chat_template`` (so LLaVA-1.5, LLaVA-NeXT and the Qwen-VL families each get their own
format); an assistant turn's span is what rendering that turn adds after the conversation so far
rendered with ``add_generation_prompt=True`` (its text and the template's end-of-turn marker).
A processor without a chat template (the shipped tiny backbone has none) fails with a clear
message unless ``template="llava15"`` is set — or ``"auto"`` falls back to it and says so once:
LLaVA-1.5's conversation format as the project's prompts use it, ``USER: <image>\\nQ1 ASSISTANT: A1</s>USER:
Q2 ASSISTANT: A2</s>`` (LLaVA's ``conv_vicuna_v1`` without its system sentence; the ``<image>`` of a
turn is moved to its front, as LLaVA's ``preprocess_multimodal`` does).

:class:`InstructCollator` tokenizes through the processor (which expands each ``<image>`` into the
family's image tokens) and labels exactly the tokens inside assistant spans (character offsets of
the unexpanded text, mapped onto the expanded ids; the two tokenizations must agree outside the
image tokens, or it fails naming the record). It also gives the prompt of the last answer
(``prompt_input_ids``) and that answer (``answers``) for validation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .collate import left_pad
from .llava_records import IMAGE

log = logging.getLogger(__name__)
TEMPLATES = ("auto", "chat_template", "llava15")


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # character spans of the assistant turns (what is labelled)
    answer: str  # the last assistant turn's text


def has_chat_template(processor: Any) -> bool:
    return bool(getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None),
                                                                      "chat_template", None))


def resolve_template(processor: Any, template: str) -> str:
    """``chat_template`` or ``llava15`` for ``template`` in :data:`TEMPLATES` (``auto``: the processor's own
    template when it has one, else LLaVA-1.5's format, logged once)."""
    if template not in TEMPLATES:
        raise ValueError(f"data.template={template!r}; choose from {TEMPLATES}")
    if template == "chat_template" and not has_chat_template(processor):
        raise ValueError("data.template=chat_template but the backbone's processor has no chat template: set "
                         "data.template=llava15 (LLaVA-1.5's USER:/ASSISTANT: format) or give the processor one")
    if template == "auto":
        template = "chat_template" if has_chat_template(processor) else "llava15"
        if template == "llava15":
            log.warning("the backbone's processor has no chat template: conversations use LLaVA-1.5's format "
                        "(USER: <image>\\n... ASSISTANT: ...</s>); data.template=llava15 says so explicitly")
    return template


def _content(role: str, text: str) -> list[dict[str, str]]:
    """A message's text as HF multimodal content: ``{"type": "image"}`` where ``<image>`` stood."""
    if role == "assistant":
        return [{"type": "text", "text": text}]
    out: list[dict[str, str]] = []
    for i, piece in enumerate(text.split(IMAGE)):
        if i:
            out.append({"type": "image"})
        if piece.strip():
            out.append({"type": "text", "text": piece.strip()})
    return out


def _render_template(processor: Any, messages: list[tuple[str, str]]) -> Rendered:
    conv = [{"role": r, "content": _content(r, t)} for r, t in messages]
    spans = []
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        before = processor.apply_chat_template(conv[:i], tokenize=False, add_generation_prompt=True)
        after = processor.apply_chat_template(conv[: i + 1], tokenize=False, add_generation_prompt=False)
        if not after.startswith(before):
            raise ValueError("the processor's chat template renders an assistant turn in a way that does not continue "
                             "the conversation rendered with add_generation_prompt=True, so its answer tokens cannot "
                             "be found; set data.template=llava15")
        spans.append((len(before), len(after)))
    full = processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
    last = [t for r, t in messages if r == "assistant"][-1]
    return Rendered(full, spans, last.strip())


def _front_image(text: str) -> str:
    if text.count(IMAGE) == 1:
        return f"{IMAGE}\n" + text.replace(IMAGE, "").strip()
    return text.strip()


def _render_llava15(messages: list[tuple[str, str]], eos: str) -> Rendered:
    text, spans = "", []
    for role, msg in messages:
        if role == "system":
            text += msg.strip() + " "
        elif role == "user":
            text += f"USER: {_front_image(msg)} "
        else:
            text += "ASSISTANT:"
            start = len(text)
            text += f" {msg.strip()}{eos}"
            spans.append((start, len(text)))
    last = [t for r, t in messages if r == "assistant"][-1:] or [""]
    return Rendered(text, spans, last[0].strip())


def render(processor: Any, messages: list[tuple[str, str]], template: str) -> Rendered:
    """The conversation's text and assistant spans (``template``: ``chat_template`` or ``llava15``)."""
    if template == "chat_template":
        return _render_template(processor, messages)
    return _render_llava15(messages, processor.tokenizer.eos_token)


def generation_prompt(processor: Any, messages: list[tuple[str, str]], template: str) -> str:
    """The prompt that asks for the next assistant turn after ``messages`` (the last one a user turn)."""
    if template == "chat_template":
        conv = [{"role": r, "content": _content(r, t)} for r, t in messages]
        return processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    return _render_llava15(messages, processor.tokenizer.eos_token).text + "ASSISTANT:"


def image_token_id(processor: Any) -> int:
    tok = processor.tokenizer
    token = getattr(processor, "image_token", None) or IMAGE
    return int(getattr(processor, "image_token_id", None) or tok.convert_tokens_to_ids(token))


class InstructCollator:
    """Collate ``{"messages", "images", "index"}`` samples into model inputs with answer-only ``labels``.

    Returns the processor's ``input_ids``/``attention_mask``/``pixel_values`` (+ ``image_sizes``) of
    the whole conversation, left-padded; ``labels`` (-100 except assistant spans); the prompt of the
    last answer, left-padded (``prompt_input_ids``/``prompt_attention_mask``); ``answers`` (the last
    answers), ``qtypes`` (None) and ``index``. ``None`` samples (unreadable images skipped by the
    dataset) are dropped.
    """

    def __init__(self, processor: Any, template: str = "auto") -> None:
        self.processor = processor
        self.template = resolve_template(processor, template)
        self.image_id = image_token_id(processor)

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, Any]:
        samples = [s for s in samples if s is not None]
        if not samples:
            raise ValueError("every record of this batch was skipped (unreadable images, data.skip_bad=true)")
        tok = self.processor.tokenizer
        tok.padding_side = "left"
        renders = [render(self.processor, s["messages"], self.template) for s in samples]
        texts = [r.text for r in renders]
        images = [im for s in samples for im in s["images"]]
        enc = self.processor(images=images or None, text=texts, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = torch.full_like(ids, -100)
        prompts = []
        for b, (s, r) in enumerate(zip(samples, renders)):
            plain = tok(r.text, return_offsets_mapping=True)
            u_ids = torch.tensor(plain["input_ids"])
            inside = torch.tensor([any(a <= st and en <= z for a, z in r.spans) and en > st
                                   for st, en in plain["offset_mapping"]])
            starts = torch.tensor([st for st, _ in plain["offset_mapping"]])
            pos = mask[b].nonzero().squeeze(1)
            row = ids[b, pos]
            text_pos, u_text = pos[row != self.image_id], u_ids != self.image_id
            if not torch.equal(ids[b, text_pos], u_ids[u_text]):
                raise ValueError(f"record {s['index']}: the processor's tokens differ from the tokenizer's outside the "
                                 "image tokens, so answer labels cannot be placed; check the processor's image token")
            labels[b, text_pos] = torch.where(inside[u_text], u_ids[u_text], -100)
            first = int((inside[u_text] & (starts[u_text] >= r.spans[-1][0])).nonzero()[0])  # the last answer's start
            prompts.append(ids[b, pos[pos < text_pos[first]]])
        prompt_ids, prompt_mask = left_pad(prompts, tok.pad_token_id, mask.dtype)
        batch = dict(enc)
        batch.update(labels=labels, prompt_input_ids=prompt_ids, prompt_attention_mask=prompt_mask,
                     answers=[r.answer for r in renders], qtypes=[None] * len(samples),
                     index=torch.tensor([s["index"] for s in samples]))
        return batch
