"""Adapters over HF LLaVA models and the tiny in-code testbed backbone."""

from .loading import load_backbone
from .tiny import tiny_llava
from .tokenizer import word_tokenizer

__all__ = ["load_backbone", "tiny_llava", "word_tokenizer"]
