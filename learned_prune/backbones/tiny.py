"""``tiny_llava``: a small, random, fully working LLaVA built in code (no downloads).

It has the real LLaVA-1.5 structure — a CLIP-style vision tower with a [CLS] token, a
2-layer MLP projector, a Llama decoder — or LLaVA-NeXT's any-resolution tiling, plus a
word-level tokenizer and a Pillow-backed image processor. Tests use it, and with the testbed's
vocabulary it is the skeleton of the embedded default backbone (``checkpoints/tiny-llava-shapes``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedModel,
    ProcessorMixin,
)

from .tiny_onevision import tiny_llava_onevision
from .tiny_qwen import tiny_qwen2_5_vl
from .tokenizer import word_tokenizer

FAMILIES = ("llava", "llava_next", "qwen2_5_vl", "llava_onevision")


def tiny_llava(
    family: str = "llava",
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
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build a small random LLaVA-1.5 (``family="llava"``), LLaVA-NeXT (``"llava_next"``) or Qwen2.5-VL
    (``"qwen2_5_vl"``: :func:`~.tiny_qwen.tiny_qwen2_5_vl`) or LLaVA-OneVision (``"llava_onevision"``:
    :func:`~.tiny_onevision.tiny_llava_onevision`), which take the same sizes.

    Returns ``(model, processor)`` in eval mode. With the defaults an image becomes a 12x12
    grid, i.e. 144 visual tokens (LLaVA-NeXT adds tiles and row-end newline tokens).
    ``vocab`` extends the tokenizer's word list (default: only the prompt template and a few generic
    words, :data:`~learned_prune.backbones.tokenizer.BASE_WORDS`; the testbed's builder,
    :func:`learned_prune.testbed.testbed_llava`, adds the ShapesVQA vocabulary).
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if family in ("qwen2_5_vl", "llava_onevision"):
        build = tiny_qwen2_5_vl if family == "qwen2_5_vl" else tiny_llava_onevision
        return build(image_size=image_size, patch_size=patch_size, vision_hidden=vision_hidden,
                               vision_layers=vision_layers, vision_heads=vision_heads, text_hidden=text_hidden,
                               text_layers=text_layers, text_heads=text_heads, text_kv_heads=text_kv_heads,
                               intermediate_size=intermediate_size, vocab=vocab, seed=seed,
                               attn_implementation=attn_implementation)
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
    tokenizer = word_tokenizer(vocab or ())
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=intermediate_size or 4 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads or text_heads,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    grid = image_size // patch_size
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=grid * grid,
    )
    crop = {"height": image_size, "width": image_size}
    if family == "llava":
        config = LlavaConfig(**common)
        cls = LlavaForConditionalGeneration
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=crop)
        proc_cls = LlavaProcessor
    else:
        pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
        config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        cls = LlavaNextForConditionalGeneration
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size=crop, image_grid_pinpoints=pinpoints
        )
        proc_cls = LlavaNextProcessor
    config._attn_implementation = attn_implementation
    if seed is not None:
        torch.manual_seed(seed)
    model = cls(config).eval()
    processor = proc_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor
