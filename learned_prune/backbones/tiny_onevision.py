"""``tiny_llava_onevision``: a small, random LLaVA-OneVision built in code (no downloads): a SigLIP-style tower
without [CLS] (every patch feeds the projector), a 2-layer MLP projector, any-resolution crops unpadded and
packed with row-end newline tokens (``anyres_max_9``), a Qwen2 decoder (1-D RoPE).

:class:`OneVisionImageProcessor` is LLaVA-OneVision's processor for images only (the HF processor also
builds a video processor, which needs torchvision).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    PreTrainedModel,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from .tokenizer import word_tokenizer


class OneVisionImageProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision's processor without a video processor (images and text only; no torchvision needed)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, num_image_tokens: int | None = None,
                 vision_feature_select_strategy: str | None = None, chat_template: str | None = None,
                 vision_aspect_ratio: str = "anyres_max_9", **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         vision_aspect_ratio=vision_aspect_ratio, **kwargs)


def tiny_llava_onevision(
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
) -> tuple[PreTrainedModel, OneVisionImageProcessor]:
    """Build a small random LLaVA-OneVision; returns ``(model, processor)`` in eval mode. Its base view is a
    ``(image_size // patch_size)``-square grid (144 tokens with the defaults), crops and newlines follow."""
    tokenizer = word_tokenizer(vocab or ())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                                num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                                image_size=image_size, patch_size=patch_size)
    text = dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=text_hidden,
                intermediate_size=intermediate_size or 4 * text_hidden, num_hidden_layers=text_layers,
                num_attention_heads=text_heads, num_key_value_heads=text_kv_heads or text_heads,
                max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    pins = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                  image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=pins,
                                  tie_word_embeddings=False)
    config._attn_implementation = attn_implementation
    if seed is not None:
        torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    size = {"height": image_size, "width": image_size}
    image_processor = LlavaOnevisionImageProcessorPil(size=size, image_grid_pinpoints=pins)
    grid = image_size // patch_size
    processor = OneVisionImageProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        num_image_tokens=grid * grid, vision_feature_select_strategy="full",
                                        vision_aspect_ratio="anyres_max_9")
    return model, processor
