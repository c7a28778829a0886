"""The token sequence the engine carries through the decoder: per-token state of a batch, and row gathering."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TokenSequence:
    """Per-token state of a batch inside the LLM.

    ``valid`` is False on padding; ``visual_rank`` is a token's index among its sample's
    original visual tokens (-1 for text); ``keep_prob`` (soft mode) is the cumulative
    keep-probability (1 for text). Order along L is always the original token order, so
    causality by index equals causality by position.
    """

    hidden: torch.Tensor  # (B, L, D)
    pos: torch.Tensor  # (B, L) RoPE position ids; (B, L, 3) on a multimodal-RoPE family (families/)
    valid: torch.Tensor  # (B, L) bool
    visual_rank: torch.Tensor  # (B, L) long
    n_visual_original: torch.Tensor  # (B,)
    keep_prob: torch.Tensor | None = None  # (B, L) soft mode only
    prev_input: torch.Tensor | None = None  # input of the layer just run (signals of layer K-1)
    prev_keys: torch.Tensor | None = None  # k_proj output of the layer just run, (B, L, H_kv*hd)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token (B, L) state of pruners

    @property
    def is_visual(self) -> torch.Tensor:
        return self.visual_rank >= 0

    def visual_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Nv) positions of visual tokens in sequence order and their validity mask."""
        vis = self.is_visual & self.valid
        counts = vis.sum(1)
        nv = int(counts.max()) if counts.numel() else 0
        order = torch.argsort((~vis).to(torch.int8), dim=1, stable=True)[:, :nv]
        valid = torch.arange(nv, device=vis.device)[None] < counts[:, None]
        return torch.where(valid, order, torch.zeros_like(order)), valid

    @property
    def prompt_valid(self) -> torch.Tensor:
        """(B, L) bool: valid tokens of the prompt. In a teacher-forced training pass the answer
        tokens (``extras["answer"]``, from the labels) are left out, so that what a pruner reads
        matches what it reads at inference, where the answer is not there yet."""
        answer = self.extras.get("answer")
        return self.valid if answer is None else self.valid & ~answer

    def instruction_mask(self) -> torch.Tensor:
        """(B, L) bool: valid prompt text tokens after each sample's last visual token."""
        L = self.valid.shape[1]
        idx = torch.arange(L, device=self.valid.device).expand_as(self.valid)
        last_visual = torch.where(self.is_visual, idx, torch.full_like(idx, -1)).amax(1, keepdim=True)
        return self.prompt_valid & ~self.is_visual & (idx > last_visual)

    def gather(self, index: torch.Tensor, slot_valid: torch.Tensor) -> "TokenSequence":
        """Keep rows ``index`` (B, L') of every per-token tensor; ``slot_valid`` marks real slots."""

        def rows(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else gather_rows(x, index)

        return TokenSequence(
            hidden=rows(self.hidden),
            pos=rows(self.pos),
            valid=rows(self.valid) & slot_valid,
            visual_rank=rows(self.visual_rank),
            n_visual_original=self.n_visual_original,
            keep_prob=rows(self.keep_prob),
            prev_input=rows(self.prev_input),
            prev_keys=rows(self.prev_keys),
            extras={k: rows(v) for k, v in self.extras.items()},
        )


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, R) along dim 1 of ``x``, (B, L) or (B, L, D)."""
    if x.dim() == 2:
        return torch.gather(x, 1, index)
    return torch.gather(x, 1, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def compact_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a (B, L) bool keep-mask into a left-padded gather index.

    Returns ``index`` (B, L') with L' = max kept per sample, kept positions in order and
    right-aligned (so padding stays on the left), and ``slot_valid`` (B, L').
    """
    counts = keep.sum(1)
    new_len = int(counts.max())
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)  # dropped first, then kept in order
    index = order[:, keep.shape[1] - new_len :]
    slot_valid = torch.arange(new_len, device=keep.device)[None] >= (new_len - counts)[:, None]
    return index, slot_valid
