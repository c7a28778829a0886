"""QueCC, the query-based convolutional cross-attention compressor, as a learned vision-site head (Li,
Goyal, Semedo, Kolter, "Inference Optimal VLMs Need Only One Visual Token but Larger Models",
arXiv 2411.03312; official code: github.com/locuslab/llava-token-compression,
``llava/model/multimodal_projector/quecc.py`` and ``multimodal_encoder/clip_encoder.py``).

The official compressor sits between the vision tower and the projector:

* a text query (the LLM's last-layer state of the prompt's last token) is projected (linear + LayerNorm)
  to the tower's width and added to every patch feature of the projector's input layer;
* queries: an MLP (linear, GELU, linear, LayerNorm) of those features, laid out on the patch grid and
  downsampled by a depthwise convolution whose kernel equals its stride (one query per cell);
* keys and values: MLPs of the concatenated features of several tower layers (official: CLIP-L layers
  12, 16, 22, 23 of 24);
* each query attends (multi-head, 8 heads officially) only to the patches of its own cell; the outputs,
  one per cell, go through the projector into the LLM.

``stride`` (one number, or rows and columns) sets the cells: on a 12x12 grid ``stride=3`` gives 16 tokens
(11.1%), ``[6, 3]`` gives 8 (5.6%), ``12`` one. Departures from the official code:

* the text query is the mean of the instruction's *input embeddings* (the prompt text after the image),
  not the LLM's last-layer state of its last token: the engine's vision site runs before the LLM and
  this head does not run the LLM a second time on the text alone;
* the projector and the LLM stay frozen (the paper trains the projector and fine-tunes the LLM with
  QueCC; ``module.lora.enabled=true`` adds LoRA adapters on the LLM);
* ``levels`` (the tower layers of the keys and values) default to the official fractions of the tower's
  depth (1/2, 2/3, 11/12, 23/24 of it, rounded; duplicates kept once), since the testbed's tower is shallow;
* the compressed tokens are written into evenly spread slots of the image span (``CompressorHead``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..engine.state import PruneState
from .compress import CompressorHead

OFFICIAL_LEVELS = (12 / 24, 16 / 24, 22 / 24, 23 / 24)  # CLIP-L/14 hidden-state indices 12, 16, 22, 23 of 24


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out), nn.LayerNorm(d_out, eps=1e-6))


def default_levels(depth: int) -> list[int]:
    """The official key/value layers scaled to a tower of ``depth`` layers (hidden-state indices)."""
    return sorted({max(1, min(depth, round(depth * f))) for f in OFFICIAL_LEVELS})


class QueCCHead(CompressorHead):
    """Text-conditioned queries from a strided depthwise convolution, each attending to its own cell (module docstring)."""

    method = "quecc"
    display_name = "QueCC"

    def __init__(self, vision_hidden: int, hidden_size: int, grid: int, stride: int | Sequence[int] = 3,
                 heads: int = 4, levels: Sequence[int] | None = None, vision_layers: int | None = None) -> None:
        super().__init__(vision_hidden, hidden_size, grid)
        rows, cols = (stride, stride) if isinstance(stride, int) else tuple(int(s) for s in stride)
        if rows < 1 or cols < 1 or grid % rows or grid % cols:
            raise ValueError(f"QueCC stride={stride}: each stride must divide the {grid}x{grid} patch grid")
        if heads < 1 or vision_hidden % heads:
            raise ValueError(f"QueCC heads={heads} must divide the tower's width {vision_hidden}")
        if levels is None:
            if not vision_layers:
                raise ValueError("QueCC needs `levels` (tower hidden-state indices for its keys and values) or "
                                 "`vision_layers` (the tower's depth) to choose them")
            levels = default_levels(vision_layers)
        if not levels:
            raise ValueError("QueCC levels=[]: give at least one tower hidden-state index")
        self.stride = [rows, cols] if not isinstance(stride, int) else stride
        self.heads, self.levels, self.vision_layers = heads, [int(v) for v in levels], vision_layers
        self.cell = (rows, cols)
        self.text_projection = nn.Sequential(nn.Linear(hidden_size, vision_hidden), nn.LayerNorm(vision_hidden, eps=1e-6))
        self.q_proj = _mlp(vision_hidden, vision_hidden)
        self.k_proj = _mlp(vision_hidden * len(self.levels), vision_hidden)
        self.v_proj = _mlp(vision_hidden * len(self.levels), vision_hidden)
        self.downsample = nn.Conv2d(vision_hidden, vision_hidden, kernel_size=self.cell, stride=self.cell,
                                    groups=vision_hidden)
        self.attn = nn.MultiheadAttention(vision_hidden, heads, batch_first=True)

    @property
    def n_tokens(self) -> int:
        return (self.grid // self.cell[0]) * (self.grid // self.cell[1])

    def _cells(self, x: torch.Tensor) -> torch.Tensor:
        """(B, G, G, D) -> (B * cells, rows * cols, D): the patches of each cell, cells in raster order."""
        B, G, _, D = x.shape
        r, c = self.cell
        x = x.reshape(B, G // r, r, G // c, c, D).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(B * (G // r) * (G // c), r * c, D)

    def compress_features(self, single: torch.Tensor, multi: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Compressed pre-projector tokens (B, n_tokens, Dv) from the projector-layer features (B, G, G, Dv), the
        multi-level features (B, G, G, Dv * levels) and the text query (B, D)."""
        B = len(single)
        x = single + self.text_projection(text)[:, None, None, :]
        q = self.downsample(self.q_proj(x).permute(0, 3, 1, 2))  # (B, Dv, G/r, G/c)
        q = q.flatten(2).transpose(1, 2).reshape(-1, 1, q.shape[1])  # one query per cell
        out = self.attn(q, self._cells(self.k_proj(multi)), self._cells(self.v_proj(multi)), need_weights=False)[0]
        return out.reshape(B, self.n_tokens, -1)

    def compress(self, state: PruneState) -> torch.Tensor:
        single = self.grid_features(state)
        multi = torch.cat([self.grid_features(state, layer) for layer in self.levels], dim=-1)
        text, valid = self.instruction(state)
        query = (text * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
        tokens = self.compress_features(single, multi, query)
        return state.project(tokens.to(state.hidden.dtype)).float()
