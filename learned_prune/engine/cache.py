"""The KV cache under the engine: which caches it takes, and how a cache it filled follows it.

The engine's caches are dynamic: after an in-LLM prune, later layers hold fewer keys than earlier
ones, and each run of layers between two prunes has its own key layout (:class:`~.loop.KeyLayout`).
:func:`check_cache` refuses, by name, caches that preallocate one length for every layer (static,
quantized, paged). :func:`adopt` makes a cache the engine filled follow it: generate()'s batch
operations on the cache (beam-search reordering, batch selection and repetition, cropping) move
the key layouts too, and a pruned cache used after its engine is gone raises a clear error
instead of a shape error deep inside attention.
"""

from __future__ import annotations

import types
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
from transformers.cache_utils import DynamicCache

if TYPE_CHECKING:  # pragma: no cover
    from .core import Engine

FOLLOWED = ("reorder_cache", "batch_select_indices", "batch_repeat_interleave", "crop", "update")

CONTINUOUS_BATCHING = (
    "continuous batching (model.generate_batch / init_continuous_batching / continuous_batching_context_manager) "
    "is not supported while a pruner is installed: it packs the requests into one sequence over a paged KV cache, "
    "which the engine's per-sample masks and pruned caches cannot describe. Use model.generate() on a left-padded "
    "batch (processor(images=..., text=[...], padding=True, return_tensors='pt')) inside the `with pruner(model):` "
    "block, or leave the block to batch continuously without pruning."
)


def check_cache(cache: Any) -> None:
    """Raise, naming the cache and what to use instead, unless ``cache`` is None or a dynamic cache."""
    if cache is None or isinstance(cache, DynamicCache):
        return
    name = type(cache).__name__
    raise ValueError(
        f"the pruning engine does not support a {name}: a pruned model's later layers hold fewer keys than its "
        "earlier ones, which only a dynamic cache can store (static, quantized and paged caches give every layer the "
        "same slots). Drop cache_implementation=... from generate() (it then uses a DynamicCache), or pass "
        "past_key_values=DynamicCache(config=model.config.text_config)."
    )


def refuse_continuous_batching(*args: Any, **kwargs: Any) -> Any:
    """Stands in for ``model.init_continuous_batching`` while an engine is installed: raises what to use instead."""
    raise NotImplementedError(CONTINUOUS_BATCHING)


def _current(cache: Any, ref: "weakref.ref[Engine]") -> Any:
    """The engine's record of ``cache`` (:class:`~.loop.CacheLayout`) while it is installed and the record current."""
    engine = ref()
    record = None if engine is None else engine.cache_layout
    if record is None or record.cache is None or record.cache() is not cache:
        return None
    return record


def _outside(cache: Any) -> RuntimeError:
    return RuntimeError(
        f"this KV cache ({type(cache).__name__}) holds a pruned prompt: its layers hold fewer keys than the prompt "
        "has tokens, so plain HF layers cannot continue it, and the pruner that filled it is no longer installed "
        "(its `with` block exited) or has since run another prompt. Continue decoding inside the same "
        "`with pruner(model):` block, right after the prefill (generate() does), or run the prompt again without "
        "the pruner."
    )


def adopt(cache: Any, engine: "Engine", pruned: bool) -> None:
    """Make ``cache``, just filled by a prefill under ``engine``, follow it.

    Beam-search reordering, batch selection and repetition and cropping are applied to the
    engine's key layouts as to the cache. When ``pruned`` (a site acted), writing to the cache
    after the engine left it (its ``with`` block exited, or it ran another prompt) raises a clear
    error; a cache emptied again (``reset()``) and refilled without the engine is a plain cache.
    """
    ref = weakref.ref(engine)
    cls = type(cache)

    def follow(name: str, apply: Callable[[Any, Any], None]) -> Callable[..., Any]:
        def method(self: Any, arg: Any, *args: Any, **kwargs: Any) -> Any:
            out = getattr(cls, name)(self, arg, *args, **kwargs)
            record = _current(self, ref)
            if record is not None:
                for layout in record.layouts:
                    apply(layout, arg)
            return out

        return method

    def crop(layout: Any, tokens: int) -> None:
        if tokens < 0:
            layout.drop_last(-tokens)

    def update(self: Any, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        if _current(self, ref) is None:
            if self.get_seq_length(layer_idx) > 0:
                raise _outside(self)
            release(self)  # filled again from empty, without the engine: a plain cache
        return cls.update(self, keys, values, layer_idx, *args, **kwargs)

    methods = {
        "reorder_cache": follow("reorder_cache", lambda g, i: g.map_batch(lambda t: t.index_select(0, i.to(t.device)))),
        "batch_select_indices": follow("batch_select_indices", lambda g, i: g.map_batch(lambda t: t[i.to(t.device)])),
        "batch_repeat_interleave": follow("batch_repeat_interleave",
                                          lambda g, r: g.map_batch(lambda t: t.repeat_interleave(r, 0))),
        "crop": follow("crop", crop),
    }
    if pruned:
        methods["update"] = update
    for name, fn in methods.items():
        setattr(cache, name, types.MethodType(fn, cache))


def release(cache: Any) -> None:
    """Remove what :func:`adopt` installed on ``cache``."""
    for name in FOLLOWED:
        cache.__dict__.pop(name, None)
