"""Efficiency measurements of one pruner on one batch: FLOPs, latency, peak memory, KV-cache bytes."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..engine import parse_site
from ..engine.adapter import adapter_for
from .flops import prefill_flops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_selection_flops(pruner: Any) -> list[float]:
    """Wrap ``select`` on this pruner instance (and composed ones) to count its matmul FLOPs per call."""
    calls: list[float] = []
    for p in getattr(pruner, "pruners", [pruner]):
        if not hasattr(p, "select"):
            continue
        original = p.select

        def select(state, original=original, owner=p):
            # counted calls are inference: parameters that require grad make the counter's module tracker
            # hook autograd on them (which fails for a learned head's parameters used as module inputs)
            params = [q for q in owner.parameters() if q.requires_grad] if hasattr(owner, "parameters") else []
            for q in params:
                q.requires_grad_(False)
            try:
                with FlopCounterMode(display=False) as counter:
                    out = original(state)
            finally:
                for q in params:
                    q.requires_grad_(True)
            calls.append(float(counter.get_total_flops()))
            return out

        p.select = select
    return calls


def analytic_flops(model: torch.nn.Module, n_text: int, n_visual: int, kept: dict[str, float]) -> dict[str, float]:
    """Prefill FLOPs of one sample split into LLM / vision / projector, from per-site kept counts."""
    tc, vc = model.config.text_config, model.config.vision_config
    n_layers = tc.num_hidden_layers
    per_layer = {parse_site(s, n_layers): round(k) for s, k in kept.items()}
    f = prefill_flops(
        n_text, n_visual, per_layer, num_layers=n_layers, hidden=tc.hidden_size, intermediate=tc.intermediate_size,
        vision_layers=vc.num_hidden_layers, vision_hidden=vc.hidden_size, vision_intermediate=vc.intermediate_size,
        vision_tokens=adapter_for(model).vision_tokens(n_visual),  # the family's tower: tiles, [CLS], merged patches
    )
    return {"llm": f.llm, "vision": f.vision, "projector": f.projector}


TIMING_FIELDS = ("prefill_ms", "generate_ms", "peak_mem_mb", "kv_cache_mb")


@torch.no_grad()
def time_prefill_and_generation(
    model: torch.nn.Module, pruner: Any, inputs: dict, repeats: int = 5, warmup: int = 2, max_new_tokens: int = 2
) -> dict[str, float | None]:
    """Median prefill latency (after warm-up), total generation latency, peak memory, KV-cache MB.

    Peak memory is the CUDA allocator's peak above what was allocated before the prefill. On CPU it is
    None (shown as "n/a"): the process's resident memory does not tell one run's peak (the allocator
    reuses memory freed by earlier runs, so its growth reads 0 for most methods)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: time at least one prefill (the eval grid skips timing at 0)")
    device = next(model.parameters()).device
    with pruner(model):
        for _ in range(warmup):
            model(**inputs, use_cache=False, logits_to_keep=1)  # prefill as generate() runs it
        times = []
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            model(**inputs, use_cache=False, logits_to_keep=1)
            _sync(device)
            times.append((time.perf_counter() - t) * 1000)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
        cache = out.past_key_values
        kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
                 if t is not None)
        _sync(device)
        t = time.perf_counter()
        model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        _sync(device)
        gen = (time.perf_counter() - t) * 1000
    return {"prefill_ms": statistics.median(times), "generate_ms": gen, "peak_mem_mb": peak,
            "kv_cache_mb": kv / 2**20}
