"""Installing the engine on one model instance, and removing every trace of it again.

Entering installs, on this model instance only: (1) hooks on the outer model that take the labels
out of the call and compute the loss on the (possibly shorter) logits, (2) a pre-hook on the inner
LLaVA model that records ``input_ids``, (3) a wrapper of ``get_image_features`` that keeps the
vision tower's hidden states and checks the image-token count, (4) the engine's decoder loop as the
language model's ``forward``, (5) ``k_proj`` hooks on the layers just before LLM sites and (6)
branch hooks on the layers observers watch. Leaving removes all of it, also after an exception.
Nothing is patched on any class.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .loop import lm_forward
from .vision import VisionCapture

if TYPE_CHECKING:  # pragma: no cover
    from .core import Engine


@dataclass
class Capture:
    """What the hooks record during a forward pass, for the decoder loop and the signals."""

    input_ids: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    vision: VisionCapture | None = None
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its k_proj output
    branches: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def clear(self) -> None:
        self.input_ids = self.labels = self.vision = None
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
        self.capture.clear()

    # ---- the hooks -----------------------------------------------------------------------
    def _pre_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # Labels are applied by the engine: in hard mode the logits are shorter than the input.
        self.capture.labels = kwargs.pop("labels", None)
        return args, kwargs

    def _post_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        labels, self.capture.labels = self.capture.labels, None
        if labels is None or not hasattr(output, "logits"):
            return output
        index = self.engine.output_index
        if index is not None and index.shape[1] != labels.shape[1]:
            labels = torch.gather(labels, 1, index.to(labels.device))
        logits = output.logits.float()
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
        output.loss = nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        return output

    def _pre_inner(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.capture.input_ids = ids
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None:
            self.capture.vision = None  # get_image_features runs inside this forward (or there is no image)
        elif self.capture.vision is not None and ids is not None:
            self._check_image_tokens(ids, self.capture.vision.n_features)  # generate() encoded images beforehand

    def _check_image_tokens(self, ids: torch.Tensor, n_feats: int) -> None:
        n_tokens = int((ids == self.engine.adapter.image_token_id).sum())
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
        signature = inspect.signature(original)

        @functools.wraps(original)  # generate() inspects the signature to pre-encode images
        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            if wants_vision:  # keep every vision hidden state, not only the projector's input
                kwargs["output_hidden_states"] = True
            out = original(*args, **kwargs)
            feats = out.pooler_output
            n_feats = sum(int(f.shape[0]) if f.dim() == 2 else int(f.shape[0] * f.shape[1]) for f in feats)
            if self.capture.input_ids is not None:
                self._check_image_tokens(self.capture.input_ids, n_feats)
            self.capture.vision = VisionCapture(
                n_features=n_feats,
                hidden_states=out.hidden_states if wants_vision else None,
                n_tiles=out.hidden_states[0].shape[0] if wants_vision else 0,
                image_sizes=signature.bind_partial(*args, **kwargs).arguments.get("image_sizes"),
            )
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
