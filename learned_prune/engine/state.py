"""What a pruner sees at a site (:class:`PruneState`) and what it returns (:class:`Selection`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .core import Engine
    from .sequence import Sequence


@dataclass
class Selection:
    """A pruner's decision at one site.

    Hard mode: ``indices`` (B, k) are positions *among the visual tokens* of each sample
    (0..n_visual-1, in the order they stand in the sequence), padded with -1 where a
    sample keeps fewer. ``values`` (B, k, D), optional, replace the hidden states at the
    kept slots (merging methods place a merged token in the slot of one of its members).
    ``values_space="vision"`` means the values are pre-projector vision features that the
    engine still has to project (vision site only).

    Soft mode: ``keep_prob`` (B, n_visual) in [0, 1]; nothing is removed, the engine
    turns it into an additive log-mask on the keys of later layers.
    """

    indices: torch.Tensor | None = None
    values: torch.Tensor | None = None
    values_space: str = "llm"
    keep_prob: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.indices is None) == (self.keep_prob is None):
            raise ValueError("A Selection holds exactly one of `indices` (hard) or `keep_prob` (soft)")
        if self.values is not None and self.indices is None:
            raise ValueError("`values` need `indices`: the slots they are written to")
        if self.values_space not in ("llm", "vision"):
            raise ValueError(f"values_space must be 'llm' or 'vision', got {self.values_space!r}")


@dataclass
class LayerTrace:
    """What one decoder layer did to every token, for pruners that watch layers run (``observe``).

    A pre-norm decoder layer computes ``mid = h_in + attn(attn_in)`` with ``attn_in =
    input_layernorm(h_in)``, then ``h_out = mid + mlp(mlp_in)`` with ``mlp_in =
    post_attention_layernorm(mid)``. ``attn_out`` / ``mlp_out`` are the branch outputs *before*
    the residual add. All (B, L, D) on the layer's current (possibly pruned) sequence.
    """

    h_in: torch.Tensor
    attn_in: torch.Tensor
    attn_out: torch.Tensor
    mlp_in: torch.Tensor
    mlp_out: torch.Tensor
    h_out: torch.Tensor


@dataclass
class PruneState:
    """Everything a pruner may read at a site. Costly signals are methods, computed on demand.

    Shapes: B samples, L current sequence length, Nv the largest visual-token count of the
    batch (``visual_valid`` marks real entries), D hidden size.
    """

    site: str
    layer: int
    mode: str
    seq: "Sequence"
    engine: "Engine"
    visual_pos: torch.Tensor  # (B, Nv) positions of visual tokens in the current sequence (0 where invalid)
    visual_valid: torch.Tensor  # (B, Nv) bool
    cache: dict = field(default_factory=dict)

    # ---- plain tensors -------------------------------------------------------------------
    @property
    def hidden(self) -> torch.Tensor:
        """Hidden states entering the site's layer (projected embeddings at the vision site), (B, L, D)."""
        return self.seq.hidden

    @property
    def visual_hidden(self) -> torch.Tensor:
        """Hidden states of the visual tokens, (B, Nv, D)."""
        return _gather_rows(self.seq.hidden, self.visual_pos)

    @property
    def n_visual(self) -> torch.Tensor:
        """Visual tokens per sample at this site, (B,)."""
        return self.visual_valid.sum(1)

    @property
    def n_visual_original(self) -> torch.Tensor:
        """Visual tokens per sample before any pruning, (B,) — what ratio budgets refer to."""
        return self.seq.n_visual_original

    @property
    def visual_source(self) -> torch.Tensor:
        """Index of each current visual token among the sample's original visual tokens, (B, Nv)."""
        return torch.gather(self.seq.visual_rank, 1, self.visual_pos)

    @property
    def keep_prob(self) -> torch.Tensor | None:
        """Soft mode: the cumulative keep-probability of each visual token so far, (B, Nv)."""
        if self.seq.keep_prob is None:
            return None
        return torch.gather(self.seq.keep_prob, 1, self.visual_pos)

    @property
    def position_ids(self) -> torch.Tensor:
        return self.seq.pos

    @property
    def valid(self) -> torch.Tensor:
        """(B, L) bool: real tokens (False on padding)."""
        return self.seq.valid

    @property
    def instruction_mask(self) -> torch.Tensor:
        """(B, L) bool: the text tokens after the last visual token (the instruction)."""
        return self.seq.instruction_mask()

    # ---- signals computed on demand ------------------------------------------------------
    def attention(self, queries: str | torch.Tensor = "last", layer: str = "previous") -> torch.Tensor:
        """Head-mean softmax attention of query rows onto the visual tokens, (B, Nv).

        ``queries``: ``"last"`` (the last token, FastV/PDrop), ``"instruction"`` (mean over the
        instruction tokens, TransPrune), or a (B, L) bool mask. ``layer``: ``"previous"`` uses the
        attention of layer K-1 (FastV) from its captured keys; ``"current"`` uses layer K's own
        projections on the hidden states entering it (PyramidDrop). Only the requested query
        rows are projected: no full attention matrix, SDPA stays on.
        """
        from .signals import llm_attention

        return llm_attention(self, queries, layer)

    def keys(self) -> torch.Tensor:
        """Post-RoPE keys of layer K-1 for the current sequence, (B, H_kv, L, head_dim)."""
        from .signals import previous_layer_keys

        return previous_layer_keys(self)

    def cls_attention(self, layer: int = -2) -> torch.Tensor:
        """Vision site: head-mean [CLS]->patch attention of vision encoder layer ``layer``, (B, Nv).

        Row-end newline tokens of LLaVA-NeXT get 0.
        """
        from .signals import cls_attention

        return cls_attention(self, layer)

    def vision_features(self, layer: int | None = None) -> torch.Tensor:
        """Vision site: pre-projector patch features at encoder output ``layer`` (default: the
        layer the backbone feeds its projector), (B, Nv, Dv); newline tokens get zeros."""
        from .signals import vision_features

        return vision_features(self, layer)

    def vision_keys(self, layer: int = -1) -> torch.Tensor:
        """Vision site: head-mean keys of vision encoder layer ``layer`` per visual token, (B, Nv, head_dim)."""
        from .signals import vision_keys

        return vision_keys(self, layer)

    @property
    def image_grid(self) -> tuple[int, int]:
        """(rows, cols) of one image's base patch grid (LLaVA-NeXT: the global view)."""
        return self.engine.adapter.patch_grid


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))
