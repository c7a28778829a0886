"""Analytic prefill FLOPs (FastV's per-layer formula, with the gated MLP counted as 3ndm).

Per LLM decoder layer with n tokens, hidden d, MLP width m: ``4nd² + 2n²d + 3ndm`` (a SwiGLU MLP
has three matrices; FastV's paper writes 2ndm for a plain MLP). The vision tower (per layer with N
tokens, hidden dv, MLP mv: ``4N dv² + 2N² dv + 2N dv mv``), the 2-layer projector and the pruner's
own cost are counted separately, so tables can show where the compute goes.
"""

from __future__ import annotations

from dataclasses import dataclass


def llm_layer_flops(n: int, d: int, m: int, gated: bool = True) -> float:
    """FLOPs of one decoder layer on n tokens: attention projections, scores, MLP."""
    return 4 * n * d * d + 2 * n * n * d + (3 if gated else 2) * n * d * m


def vision_layer_flops(n: int, d: int, m: int) -> float:
    """FLOPs of one ViT encoder layer on n tokens (plain 2-matrix MLP)."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


@dataclass
class PrefillFlops:
    llm: float
    vision: float
    projector: float

    @property
    def total(self) -> float:
        return self.llm + self.vision + self.projector


def prefill_flops(
    n_text: int,
    n_visual: int,
    kept: dict[int, int],
    *,
    num_layers: int,
    hidden: int,
    intermediate: int,
    vision_layers: int,
    vision_hidden: int,
    vision_intermediate: int,
    vision_tokens: int,
    projected_tokens: int | None = None,
    gated: bool = True,
) -> PrefillFlops:
    """Prefill FLOPs of one sample.

    ``kept`` maps a decoder-layer index K to the visual tokens that enter layers K and later (a
    vision-site prune is K=0); later entries override earlier ones. ``vision_tokens`` is the tower's
    sequence (patches + [CLS]) times the number of tiles; ``projected_tokens`` (default: all
    ``n_visual``) is how many tokens the projector processes.
    """
    llm = 0.0
    visual = n_visual
    for layer in range(num_layers):
        if layer in kept:
            visual = kept[layer]
        llm += llm_layer_flops(n_text + visual, hidden, intermediate, gated)
    vision = vision_layers * vision_layer_flops(vision_tokens, vision_hidden, vision_intermediate)
    p = n_visual if projected_tokens is None else projected_tokens
    projector = 2 * p * (vision_hidden * hidden + hidden * hidden)
    return PrefillFlops(llm=llm, vision=vision, projector=projector)
