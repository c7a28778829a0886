"""``tiny_qwen2_5_vl``: a small, random, fully working Qwen2.5-VL built in code (no downloads).

It has the real structure — a window-attention ViT without [CLS] (full attention in one block),
a 2x2 patch merger, a Qwen2 decoder with multimodal RoPE — with the word-level tokenizer plus
Qwen's vision special tokens and the Pillow-backed ``Qwen2VLImageProcessorPil``. Images keep their
aspect ratio: each becomes its own (h/patch/2) x (w/patch/2) grid of visual tokens.

:class:`QwenImageProcessor` is Qwen2.5-VL's processor for images only: the HF processor also wants a
video processor, which needs torchvision; the engine prunes images only, so nothing is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .tokenizer import word_tokenizer

QWEN_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # one image in a Qwen-VL prompt


class QwenImageProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without a video processor (images and text only; no torchvision needed)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def tiny_qwen2_5_vl(
    *,
    image_size: int = 96,
    patch_size: int = 8,
    vision_hidden: int = 64,
    vision_layers: int = 3,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 8,
    text_heads: int = 4,
    text_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab: Sequence[str] | None = None,
    seed: int | None = 0,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, QwenImageProcessor]:
    """Build a small random Qwen2.5-VL; returns ``(model, processor)`` in eval mode.

    An image is resized to about ``image_size**2`` pixels (a multiple of ``2 * patch_size`` on each
    side), so a square one gives ``(image_size // patch_size // 2) ** 2`` visual tokens (36 with the
    defaults). The tower's window is 4x4 merged tokens; its middle block attends fully.
    """
    tokenizer = word_tokenizer(vocab or ())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *QWEN_TOKENS]})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_TOKENS}
    head_dim = text_hidden // text_heads
    quarter = head_dim // 2 // 4  # M-RoPE sections (temporal, height, width) over head_dim / 2 frequencies
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=vision_heads, patch_size=patch_size, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=4 * 2 * patch_size, out_hidden_size=text_hidden,
                           fullatt_block_indexes=[vision_layers // 2]),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=text_hidden,
                         intermediate_size=intermediate_size or 4 * text_hidden, num_hidden_layers=text_layers,
                         num_attention_heads=text_heads, num_key_value_heads=text_kv_heads or text_heads,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [head_dim // 2 - 2 * (head_dim // 2 - quarter) // 2,
                                                            (head_dim // 2 - quarter) // 2,
                                                            (head_dim // 2 - quarter) // 2]},
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    if seed is not None:
        torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                               min_pixels=pixels // 4, max_pixels=pixels)
    return model, QwenImageProcessor(image_processor=image_processor, tokenizer=tokenizer)
