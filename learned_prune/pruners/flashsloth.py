"""FlashSloth's embedded visual compression as a learned vision-site compressor (Tong et al., "FlashSloth:
Lightning Multimodal Large Language Models via Embedded Visual Compression", CVPR 2025, arXiv 2412.04317;
official code: github.com/codefanw/FlashSloth, ``flashsloth/model/pooling.py``, ``lqformer.py`` and
``language_model/phi2/modeling_phi.py``).

FlashSloth gives the LLM two kinds of visual tokens:

* **Spatial attention pooling** (SAP): the tower's patch grid is cut into ``pool`` x ``pool`` regions; a
  small MLP (linear, ReLU, dropout, linear to one logit) scores each patch, a softmax over the region turns
  the scores into weights and the region becomes the weighted sum of its patch features, then goes through
  the projector (official: 3x3 regions of SigLIP's 27x27 grid, 81 tokens).
* **Instruction-aware visual compression**: ``queries`` learnable tokens of the LLM's width; a one-layer
  "LQFormer" lets them attend to the instruction's tokens and then, with the result as queries, to the
  image's patch features (keys down-projected to half the tower's width, values the full features), and
  adds the up-projected result to the learnable tokens (official: 9 tokens).

The head emits ``(grid / pool)^2 + queries`` tokens (default 9 + 7 = 16, 11.1% of a 12x12 grid; ``pool=6``
and ``queries=4`` give 8). Departures from the official code:

* the official learnable tokens are placed after the question in the LLM's input and run through its first
  7 layers; before layer 8 the LQFormer reads their hidden states and the question tokens' hidden states
  and writes its output over them. The engine has no site that inserts tokens after the question, so here
  the queries attend to the instruction's *input embeddings*, the output is written into the image's slots
  at the vision site (before layer 0) and the LLM reads it from there; the LLM stays frozen (the paper
  fine-tunes it; ``module.lora.enabled=true`` adds LoRA adapters instead);
* the SAP tokens and the query tokens replace the image together (FlashSloth keeps its 81 SAP tokens for
  the whole image and adds the 9 query tokens): at 1-16 tokens the pooling regions are larger;
* one set of attention heads is used for both cross-attentions (``heads``, official: the LLM's head count)
  and the learnable tokens are initialised from a normal distribution at the embedding scale (the official
  ``torch.Tensor`` is left uninitialised); the down-projection of the instruction and of the learnable
  tokens is shared (read from the official code; no test
  compares with it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..engine.state import PruneState
from .compress import CompressorHead


class AttentionPool(nn.Module):
    """Softmax-weighted sum of the patches of each ``pool`` x ``pool`` region of a grid (FlashSloth's SAP)."""

    def __init__(self, dim: int, pool: int, dropout: float) -> None:
        super().__init__()
        self.pool = pool
        self.score = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, 1))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, G, G, D) -> (B, (G/pool)^2, D), regions in raster order."""
        B, G, _, D = grid.shape
        p, n = self.pool, grid.shape[1] // self.pool
        regions = grid.reshape(B, n, p, n, p, D).permute(0, 1, 3, 2, 4, 5).reshape(B, n * n, p * p, D)
        weights = self.score(regions).softmax(dim=2)
        return (weights * regions).sum(2)


class QueryCrossAttention(nn.Module):
    """Multi-head attention whose queries and keys live in ``qk_dim`` and whose values keep ``v_dim``."""

    def __init__(self, qk_dim: int, v_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(qk_dim, qk_dim), nn.Linear(qk_dim, qk_dim), nn.Linear(v_dim, v_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_valid: torch.Tensor | None = None) -> torch.Tensor:
        B, Q, _ = query.shape
        split = lambda x: x.reshape(B, x.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(query)), split(self.k(key)), split(self.v(value))
        mask = None if key_valid is None else key_valid[:, None, None, :]
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(B, Q, -1)


class FlashSlothHead(CompressorHead):
    """Spatial attention pooling + instruction-aware learnable queries (module docstring)."""

    method = "flashsloth"
    display_name = "FlashSloth"

    def __init__(self, vision_hidden: int, hidden_size: int, grid: int, pool: int = 4, queries: int = 7,
                 heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__(vision_hidden, hidden_size, grid)
        if pool < 1 or grid % pool:
            raise ValueError(f"FlashSloth pool={pool}: the region side must divide the {grid}x{grid} patch grid")
        if queries < 0 or (grid // pool) ** 2 + queries < 1:
            raise ValueError(f"FlashSloth queries={queries}: must be >= 0, and the head must emit at least one token")
        down = vision_hidden // 2
        if heads < 1 or down % heads or vision_hidden % heads:
            raise ValueError(f"FlashSloth heads={heads} must divide the tower's width {vision_hidden} and its half")
        self.pool, self.queries, self.heads, self.dropout = pool, queries, heads, dropout
        self.sap = AttentionPool(vision_hidden, pool, dropout)
        if queries:
            self.tokens = nn.Parameter(torch.randn(queries, hidden_size) / math.sqrt(hidden_size))
            self.down_text = nn.Linear(hidden_size, down)  # learnable tokens and instruction, shared
            self.down_image = nn.Linear(vision_hidden, down)
            self.norm_q, self.norm_text, self.norm_image = nn.LayerNorm(down), nn.LayerNorm(down), nn.LayerNorm(down)
            self.text_attn = QueryCrossAttention(down, down, heads)
            self.image_attn = QueryCrossAttention(down, vision_hidden, heads)
            self.up = nn.Linear(vision_hidden, hidden_size)

    @property
    def n_tokens(self) -> int:
        return (self.grid // self.pool) ** 2 + self.queries

    def query_tokens(self, patches: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
        """The instruction-aware tokens (B, queries, hidden_size) from patch features (B, N, Dv) and the
        instruction's embeddings (B, T, D) with their validity (B, T)."""
        base = self.tokens.unsqueeze(0).expand(len(patches), -1, -1)
        q = self.norm_q(self.down_text(base))
        text = self.norm_text(self.down_text(text))
        about_text = self.text_attn(q, text, text, text_valid)
        keys = self.norm_image(self.down_image(patches))
        return base + self.up(self.image_attn(about_text, keys, patches))

    def compress(self, state: PruneState) -> torch.Tensor:
        grid = self.grid_features(state)
        pooled = state.project(self.sap(grid).to(state.hidden.dtype)).float()
        if not self.queries:
            return pooled
        text, valid = self.instruction(state)
        queries = self.query_tokens(grid.flatten(1, 2), text, valid)
        return torch.cat([pooled, queries], dim=1)
