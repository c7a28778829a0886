"""Batching VQA samples for an HF LLaVA or Qwen-VL processor: training inputs with answer-only labels, and prompts
(the template's ``<image>`` becomes the family's image placeholder, :func:`image_placeholder`)."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image


# How one image stands in a prompt, by the processor's image token (the template writes ``<image>``):
# Qwen-VL wraps its image pad token in vision start/end tokens; LLaVA's processors expand ``<image>`` itself.
IMAGE_TEXT = {"<|image_pad|>": "<|vision_start|><|image_pad|><|vision_end|>"}


def image_placeholder(processor: Any) -> str:
    """The text that stands for one image in a prompt for ``processor``'s model family (``<image>`` for LLaVA)."""
    token = getattr(processor, "image_token", "<image>")
    return IMAGE_TEXT.get(token, token)


def prompt_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The model inputs of a collated batch's prompts alone (for generation and timing): ids, mask, pixels, and
    the family's image inputs (LLaVA-NeXT ``image_sizes``; Qwen-VL ``image_grid_thw`` and the prompt's
    ``mm_token_type_ids``, which its M-RoPE positions need)."""
    inputs = {"input_ids": batch["prompt_input_ids"], "attention_mask": batch["prompt_attention_mask"],
              "pixel_values": batch["pixel_values"]}
    for key, given in (("image_sizes", "image_sizes"), ("image_grid_thw", "image_grid_thw"),
                       ("mm_token_type_ids", "prompt_mm_token_type_ids")):
        if given in batch:
            inputs[key] = batch[given]
    return inputs



def left_pad(rows: list[torch.Tensor], pad_id: int, mask_dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one left-padded batch: ``(input_ids, attention_mask)``."""
    P = max(r.numel() for r in rows)
    ids = torch.full((len(rows), P), pad_id, dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), P), dtype=mask_dtype)
    for b, r in enumerate(rows):
        ids[b, P - r.numel():], mask[b, P - r.numel():] = r, 1
    return ids, mask

class VQACollator:
    """Collate sample dicts (``image``, ``question``, ``answer``, ...) into model inputs.

    Returns ``input_ids``/``attention_mask``/``pixel_values`` of prompt + answer + EOS (left-padded),
    ``labels`` = -100 everywhere except the answer tokens and EOS, ``prompt_input_ids``/
    ``prompt_attention_mask`` (the prompt alone, left-padded, for generation), and passes through
    ``answers``, ``qtypes``, ``patch_mask``, ``patch_labels``, ``patch_attrs``, ``patch_centres``, ``target_patches``,
    ``target_attrs``, ``target_centres``, ``target_offset``, ``target_relation`` (stacked), ``boxes`` (list), ``index``.
    """

    def __init__(self, processor: Any, prompt_template: str = "USER: <image>\n{question} ASSISTANT:") -> None:
        if "{question}" not in prompt_template or "<image>" not in prompt_template:
            raise ValueError("prompt_template needs a '<image>' placeholder and a '{question}' field")
        self.processor = processor
        self.template = prompt_template

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        tok = self.processor.tokenizer
        tok.padding_side = "left"
        images = [Image.fromarray(s["image"]) for s in samples]
        image_text = image_placeholder(self.processor)
        prompts = [self.template.format(question=s["question"]).replace("<image>", image_text) for s in samples]
        answers = [s["answer"] for s in samples]
        texts = [f"{p} {a}{tok.eos_token}" for p, a in zip(prompts, answers)]
        enc = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        n_answer = [len(tok(f" {a}", add_special_tokens=False)["input_ids"]) + 1 for a in answers]  # + EOS
        labels = torch.full_like(ids, -100)
        L = ids.shape[1]
        for b, n in enumerate(n_answer):
            labels[b, L - n :] = ids[b, L - n :]
        # the prompt alone: drop the answer tokens and re-pad on the left
        rows = [ids[b, mask[b].bool()][: -n] for b, n in enumerate(n_answer)]
        prompt_ids, prompt_mask = left_pad(rows, tok.pad_token_id, mask.dtype)
        batch = dict(enc)
        if "mm_token_type_ids" in enc:  # Qwen-VL's M-RoPE needs them: 1 on image tokens, for the prompt too
            image_id = getattr(self.processor, "image_token_id", None)
            batch["prompt_mm_token_type_ids"] = (prompt_ids == image_id).long() * prompt_mask
        batch.update(
            labels=labels,
            prompt_input_ids=prompt_ids,
            prompt_attention_mask=prompt_mask,
            answers=answers,
            qtypes=[s.get("qtype") for s in samples],
            index=torch.tensor([s.get("index", -1) for s in samples]),
        )
        for key in ("patch_mask", "patch_labels", "target_patches", "patch_attrs", "patch_centres",
                    "target_attrs", "target_centres", "target_offset", "target_relation"):
            if all(key in s for s in samples):
                batch[key] = torch.stack([s[key] for s in samples])
        if all("boxes" in s for s in samples):
            batch["boxes"] = [s["boxes"] for s in samples]
        return batch
