"""What every family adapter shares: the decoder parts, 1-D RoPE positions and the checks at install.

A family adapter is the engine's one read-only view of a model family (module lookup, positions,
the vision tower's signals, the image-token layout, the backbone signature a head checks, the
inputs of the FLOPs model). The engine and the pruners never look inside a model any other way.
Subclasses (one file per family, registered in :mod:`.` by ``model_type``) override what differs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from ..vision import VisionCapture

# What a pruner may need beyond the LLM's own hidden states and attention (``PrunerProtocol.needs``),
# and what each need means, for the refusal message on a family without it.
NEEDS = {
    "vision_cls": "the vision tower's [CLS] attention",
    "vision_grid": "the vision tower's per-patch states on one fixed square patch grid (pre-projector features, "
                   "keys or the tower's own layers)",
}


class FamilyAdapter:
    """Read-only view of one HF vision-language model for the engine (the base: a Llama-like decoder, 1-D RoPE).

    Attributes every family sets: ``model``, ``inner`` (``model.model``), ``lm`` (the decoder with
    ``layers``, ``embed_tokens``, ``norm``, ``rotary_emb``), ``config``, ``text_config``,
    ``vision_config``, ``image_token_id``. Class attributes: ``family`` (the registry key),
    ``mrope`` (positions are (B, L, 3) multimodal RoPE ids), ``signals`` (the :data:`NEEDS` the
    family offers), ``no_signal`` (why a missing one is missing), ``is_next`` (LLaVA-NeXT tiling).
    """

    family: ClassVar[str] = ""
    mrope: ClassVar[bool] = False
    is_next: ClassVar[bool] = False
    signals: ClassVar[frozenset[str]] = frozenset()
    no_signal: ClassVar[str] = ""
    lora_path: ClassVar[str] = "model.language_model"  # where LoRA finds the decoder (pruners/lora.py)

    def __init__(self, model: nn.Module) -> None:
        inner = getattr(model, "model", None)
        lm = getattr(inner, "language_model", None)
        if inner is None or lm is None:
            raise TypeError(f"{type(model).__name__} is not an HF vision-language model of the {self.family} family: "
                            "expected `.model.language_model`")
        for part in ("layers", "embed_tokens", "norm", "rotary_emb"):
            if not hasattr(lm, part):
                raise TypeError(
                    f"the language model {type(lm).__name__} has no `{part}`: only Llama-like decoders are supported"
                )
        self.model = model
        self.inner = inner
        self.lm = lm
        self.config = model.config
        self.text_config = lm.config
        self.image_token_id = int(self.config.image_token_id)

    # ---- the decoder ---------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.lm.layers)

    def project(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover - per family
        """The multi-modal projector on pre-projector vision features."""
        raise NotImplementedError(f"the {self.family} family has no projector the engine can apply to features")

    # ---- positions -----------------------------------------------------------------------
    def prefill_positions(self, position_ids: torch.Tensor | None, B: int, q: int, device: Any) -> torch.Tensor:
        """The engine's position ids for a prompt of ``q`` tokens: (B, q) here (``position_ids`` given or 0..q-1)."""
        if position_ids is None:
            return torch.arange(q, device=device)[None].expand(B, q)
        return position_ids.to(device).expand(B, q)

    def step_positions(self, position_ids: torch.Tensor | None, B: int, q: int, device: Any) -> torch.Tensor | None:
        """Scalar (B, q) positions of decoded tokens from the ``position_ids`` generate() passes, or None."""
        return None if position_ids is None else position_ids.to(device).expand(B, q)

    def from_scalar(self, pos: torch.Tensor) -> torch.Tensor:
        """Decoded (text) tokens' scalar positions (B, q) in the engine's position form."""
        return pos

    def rope(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the decoder's RoPE for positions ``pos`` in the engine's form (what layers take)."""
        return self.lm.rotary_emb(x, pos)

    def layer_position_ids(self, pos: torch.Tensor) -> torch.Tensor | None:
        """The ``position_ids`` a decoder layer is called with (flash attention reads them)."""
        return pos

    # ---- checks --------------------------------------------------------------------------
    def check_needs(self, pruner: Any) -> None:
        """Refuse, naming the family and why, a pruner that needs a signal this family's tower does not give."""
        missing = [n for n in getattr(pruner, "needs", ()) if n not in self.signals]
        for need in missing:
            if need not in NEEDS:
                raise ValueError(f"{type(pruner).__name__} declares an unknown need {need!r}; known: {sorted(NEEDS)}")
        if missing:
            what = "; ".join(NEEDS[n] for n in missing)
            raise ValueError(
                f"{type(pruner).__name__} cannot run on a {self.family} backbone: it needs {what}, and {self.no_signal} "
                "(docs/families.md lists what runs on each family)"
            )

    def check_inputs(self, kwargs: dict) -> None:
        """Refuse inputs the engine cannot prune on this family (called on every call of the inner model)."""

    def refuse_video(self, kwargs: dict) -> None:
        """Refuse video inputs, for a family whose model takes them but whose videos the engine cannot prune yet."""
        if kwargs.get("pixel_values_videos") is not None or (kwargs.get("mm_encoder_outputs") or {}).get("video") is not None:
            raise NotImplementedError(f"the pruning engine prunes images on {self.family}; video inputs "
                                      "(pixel_values_videos) are not supported yet: pass images only")

    # ---- heads and FLOPs -----------------------------------------------------------------
    def signature(self) -> dict[str, Any]:
        """The sizes (and family) a learned head depends on, recorded at export and checked at install."""
        tc = self.text_config
        return {"family": self.family, "text_hidden_size": tc.hidden_size,
                "num_hidden_layers": tc.num_hidden_layers, "num_attention_heads": tc.num_attention_heads}

    def vision_tokens(self, n_visual: int) -> int:
        """FLOPs input: how many tokens the vision tower encodes for an image that gives ``n_visual`` LLM tokens."""
        raise NotImplementedError(f"the {self.family} family gives no vision-token count for the FLOPs model")

    def vision_capture(self, out: Any, bound: dict, wants_vision: bool) -> "VisionCapture":  # pragma: no cover
        """The engine's record of one ``get_image_features`` call (:class:`~..vision.VisionCapture`)."""
        raise NotImplementedError

    def vision_layers(self) -> nn.ModuleList:
        """The vision tower's encoder blocks."""
        raise NotImplementedError(f"the {self.family} family gives no vision layers to pruners")
