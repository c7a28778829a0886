"""Installing the engine on one model instance, and removing every trace of it again.

Entering installs, on this model instance only: (1) hooks on the outer model that take the labels
(``labels`` / ``shift_labels``) out of the call and compute the loss on the (possibly shorter)
logits, (2) a pre-hook on the inner LLaVA model that records which input rows are image
placeholders (:mod:`.inputs`), (3) a wrapper of ``get_image_features`` that keeps the vision
tower's hidden states and checks the image-token count, (4) the engine's decoder loop as the
language model's ``forward``, (5) ``k_proj`` hooks on the layers just before LLM sites, (6) branch
hooks on the layers observers watch and (7) a refusal of continuous batching in place of
``init_continuous_batching``. Leaving removes all of it, also after an exception. Nothing is
patched on any class.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .cache import refuse_continuous_batching
from .inputs import follow_expansion, generated_image_tokens, visual_rows
from .loop import lm_forward
from .outputs import causal_lm_loss
from .vision import VisionCapture

if TYPE_CHECKING:  # pragma: no cover
    from .core import Engine


@dataclass
class Capture:
    """What the hooks record during a forward pass, for the decoder loop and the signals."""

    input_ids: torch.Tensor | None = None
    visual: torch.Tensor | None = None  # (B, L) image placeholders of this call; None when unknown
    generated: torch.Tensor | None = None  # (B, L) <image> ids generated after the prompt (use_cache=False)
    prompt: torch.Tensor | None = None  # ids of the last prompt whose placeholders matched its images
    labels: torch.Tensor | None = None
    shift_labels: torch.Tensor | None = None
    vision: VisionCapture | None = None
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its k_proj output
    branches: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def consumed(self) -> None:
        """Forget what one language-model call read (the ids and the rows found from them)."""
        self.input_ids = self.visual = self.generated = None

    def answer_mask(self) -> torch.Tensor | None:
        """(B, L) bool: the teacher-forced answer tokens (labels other than -100), from ``shift_labels`` when
        given (as HF's loss prefers them), else from ``labels``."""
        if self.labels is None:
            return None
        if self.shift_labels is None:
            return self.labels != -100
        answer = torch.zeros_like(self.shift_labels, dtype=torch.bool)  # shift_labels[t] labels token t + 1
        answer[:, 1:] = self.shift_labels[:, :-1] != -100
        return answer

    def clear(self) -> None:
        self.consumed()
        self.prompt = self.labels = self.shift_labels = self.vision = None
        self.keys.clear()
        self.branches.clear()


class Hooks:
    """The hooks and instance overrides of one :class:`~.core.Engine`; :meth:`install` and :meth:`remove`."""

    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        self.capture = engine.capture
        self.handles: list[Any] = []

    def install(self) -> None:
        """Install everything on the engine's model; on any failure, remove what was installed and re-raise."""
        e, a = self.engine, self.engine.adapter
        if "forward" in a.lm.__dict__:
            raise RuntimeError(
                "a pruner is already installed on this model; compose several with load_pruner([...]) "
                "instead of nesting"
            )
        try:
            self.handles.append(a.model.register_forward_pre_hook(self._pre_model, with_kwargs=True))
            self.handles.append(a.model.register_forward_hook(self._post_model, with_kwargs=True))
            self.handles.append(a.inner.register_forward_pre_hook(self._pre_inner, with_kwargs=True))
            a.inner.get_image_features = self._wrap_image_features(a.inner.get_image_features)
            a.lm.forward = functools.partial(lm_forward, e)  # the decoder loop with sites
            a.model.init_continuous_batching = refuse_continuous_batching
            for k in e.sites:
                if k >= 1:
                    kp = a.lm.layers[k - 1].self_attn.k_proj
                    self.handles.append(kp.register_forward_hook(self._key_hook(k - 1)))
            for i in e.observers:
                for part in ("self_attn", "mlp"):
                    branch = getattr(a.lm.layers[i], part)
                    self.handles.append(branch.register_forward_hook(self._branch_hook(i, part), with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every hook and instance override, and forget what was captured."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        a = self.engine.adapter
        a.inner.__dict__.pop("get_image_features", None)
        a.lm.__dict__.pop("forward", None)
        a.model.__dict__.pop("init_continuous_batching", None)
        self.capture.clear()

    # ---- the hooks -----------------------------------------------------------------------
    def _pre_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # Labels are applied by the engine: in hard mode the logits are shorter than the input.
        self.capture.labels = kwargs.pop("labels", None)
        self.capture.shift_labels = kwargs.pop("shift_labels", None)
        return args, kwargs

    def _post_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        c = self.capture
        labels, shift, c.labels, c.shift_labels = c.labels, c.shift_labels, None, None
        if labels is None or not hasattr(output, "logits"):  # HF computes a loss only when labels are given
            return output
        e = self.engine
        filler = None  # output slots that only left-pad a pruned sample (they hold a dropped row)
        if e.output_index is not None and e.output_valid is not None:
            mask = kwargs.get("attention_mask")
            given = torch.ones_like(e.output_index, dtype=torch.bool) if mask is None \
                else torch.gather(mask.bool().to(e.output_index.device), 1, e.output_index)
            filler = given & ~e.output_valid
        output.loss = causal_lm_loss(output.logits, output.logits.shape[-1], labels, shift, e.output_index, filler,
                                     kwargs.get("num_items_in_batch"))
        return output

    def _pre_inner(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        c, a = self.capture, self.engine.adapter
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        pixels = kwargs.get("pixel_values")
        a.check_inputs(kwargs)
        images = encoded is not None or (pixels is not None and pixels.numel() > 0)
        c.input_ids, c.generated = ids, None
        c.visual = visual_rows(a.image_token_id, a.lm.embed_tokens, ids, embeds, images)
        if encoded is None:
            c.vision = None  # get_image_features runs inside this forward (or there is no image)
            return None
        if c.vision is None or c.visual is None:
            return None
        c.vision = follow_expansion(c.vision, encoded.pooler_output)  # beam search repeats the images
        n_feats = c.vision.n_features
        if int(c.visual.sum()) > n_feats:  # use_cache=False re-reads generated tokens: an <image> id is text
            c.generated = generated_image_tokens(c.visual, ids, c.prompt, n_feats)
        if c.generated is None:
            self._check_image_tokens(c.visual, n_feats)
            c.prompt = ids
            return None
        c.visual = c.visual & ~c.generated
        filler = 0 if a.image_token_id != 0 else 1  # embedded as the <image> token again by the decoder loop
        ids = ids.masked_fill(c.generated, filler)
        if "input_ids" in kwargs:
            kwargs["input_ids"] = ids
        else:
            args = (ids, *args[1:])
        return args, kwargs

    def _check_image_tokens(self, visual: torch.Tensor, n_feats: int) -> None:
        n_tokens = int(visual.sum())
        if n_tokens != n_feats:
            raise ValueError(
                f"image-token count mismatch: the prompts hold {n_tokens} <image> placeholder tokens but the "
                f"images give {n_feats} visual features. Build inputs with the backbone's processor "
                "(processor(images=..., text=...)), which expands each <image> to the right number of "
                "tokens, and pass one image per <image> in the text."
            )

    def _wrap_image_features(self, original: Any) -> Any:
        sites = self.engine.sites
        wants_vision = 0 in sites and any(s == "vision" for _, s in sites[0])
        wants_vision = wants_vision and bool(self.engine.adapter.signals)  # a tower with signals to read
        signature = inspect.signature(original)

        @functools.wraps(original)  # generate() inspects the signature to pre-encode images
        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            if wants_vision:  # keep every vision hidden state, not only the projector's input
                kwargs["output_hidden_states"] = True
            out = original(*args, **kwargs)
            bound = signature.bind_partial(*args, **kwargs).arguments
            vision: VisionCapture = self.engine.adapter.vision_capture(out, bound, wants_vision)  # the family's record
            if self.capture.visual is not None:
                self._check_image_tokens(self.capture.visual, vision.n_features)
            self.capture.vision = vision
            return out

        return get_image_features

    def _branch_hook(self, layer: int, part: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]  # the normed input the branch reads
            self.capture.branches[(layer, part)] = (x, output[0] if isinstance(output, tuple) else output)

        return hook

    def _key_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.capture.keys[layer] = output

        return hook
