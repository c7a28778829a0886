"""Prefill latency of every pruner on a LLaVA-1.5-7B-shaped model, against its FLOPs-ideal speedup.

The model has LLaVA-1.5-7B's widths (Llama hidden 4096, MLP 11008, 32 heads; CLIP ViT-L/14-336
tower) with random weights and, by default, 4 of the 32 decoder layers and 3 of the 24 vision
layers so that it fits a CPU. Input: 35 system tokens + 576 image tokens + 40 instruction tokens.
For each method: the median prefill time over ``--repeats`` runs after ``--warmup`` runs (in rounds
that run every method once, so that drifts of the machine's speed reach all methods alike), the
measured speedup over ``none`` (also from the fastest run of each, ``measured/ideal (min)``: on a
shared CPU interference only ever adds time, so the minimum is the least disturbed estimate) (the same engine, no pruning), the FLOPs-ideal speedup (analytic
prefill FLOPs of ``none`` / of the method, vision tower and projector included, from the kept
counts the engine reports), and the time spent in the pruner's own ``select()``.

    python benchmarks/prefill.py                                  # every pruner, keep=64, CPU fp32
    python benchmarks/prefill.py --methods fastv,fastervlm --keep 64 --json prefill.jsonl
    python benchmarks/prefill.py --layers 32 --vision-layers 24 --dtype bfloat16   # real 7B shape, GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

from learned_prune import PRUNERS, load_pruner  # noqa: E402
from learned_prune.engine import parse_site  # noqa: E402
from learned_prune.evaluation.flops import prefill_flops  # noqa: E402


def build_model(a: argparse.Namespace) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=a.vision_hidden, intermediate_size=a.vision_intermediate, num_hidden_layers=a.vision_layers,
        num_attention_heads=a.vision_heads, image_size=a.image_size, patch_size=a.patch_size,
    )
    text = LlamaConfig(
        hidden_size=a.hidden, intermediate_size=a.intermediate, num_attention_heads=a.heads,
        num_key_value_heads=a.heads, num_hidden_layers=a.layers, vocab_size=a.vocab, max_position_embeddings=4096,
    )
    grid = a.image_size // a.patch_size
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=a.vocab - 1, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=grid * grid,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(a.device):
        model = LlavaForConditionalGeneration(config)
    return model.to(getattr(torch, a.dtype)).eval()


def make_inputs(a: argparse.Namespace, model) -> dict:
    g = torch.Generator().manual_seed(0)
    n_img = (a.image_size // a.patch_size) ** 2
    image = model.config.image_token_id
    ids = torch.cat([
        torch.randint(1, image, (a.system_tokens,), generator=g),
        torch.full((n_img,), image),
        torch.randint(1, image, (a.text_tokens,), generator=g),
    ])[None]
    pixels = torch.randn(1, 3, a.image_size, a.image_size, generator=g)
    return {"input_ids": ids.to(a.device), "attention_mask": torch.ones_like(ids).to(a.device),
            "pixel_values": pixels.to(a.device, getattr(torch, a.dtype))}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Timed:
    """One method's pruner with its own ``select()`` timed (this instance only)."""

    def __init__(self, name: str, a: argparse.Namespace) -> None:
        self.name, self.device = name, a.device
        self.pruner = load_pruner("none") if name == "none" else load_pruner(name, keep=a.keep)
        self.spent: list[float] = []
        self.times: list[float] = []
        self.selection: list[float] = []
        self.kept: dict[str, int] = {}
        if name != "none":
            original = self.pruner.select

            def timed_select(state):
                _sync(self.device)
                t = time.perf_counter()
                out = original(state)
                _sync(self.device)
                self.spent.append(time.perf_counter() - t)
                return out

            self.pruner.select = timed_select

    def run(self, model, inputs: dict, record: bool) -> None:
        """One prefill as ``generate()`` runs it (logits for the last token only), timed when ``record``."""
        self.spent.clear()
        with torch.inference_mode(), self.pruner(model) as engine:
            _sync(self.device)
            t = time.perf_counter()
            model(**inputs, use_cache=False, logits_to_keep=1)
            _sync(self.device)
            elapsed = time.perf_counter() - t
            self.kept = {s: int(v[0]) for s, v in engine.kept_tokens.items()}
        if record:
            self.times.append(elapsed * 1000)
            self.selection.append(sum(self.spent) * 1000)


def measure(model, inputs: dict, methods: list[str], a: argparse.Namespace) -> list[dict]:
    """Round-robin timing: each round runs every method once, so slow drifts of the machine's speed
    reach every method alike instead of whichever happened to run during them."""
    timed = [Timed(m, a) for m in methods]
    for i in range(a.warmup + a.repeats):
        for t in timed:
            t.run(model, inputs, record=i >= a.warmup)
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_text = inputs["input_ids"].shape[1] - n_img
    tc, vc = model.config.text_config, model.config.vision_config
    records = []
    for t in timed:
        flops = prefill_flops(
            n_text, n_img, {parse_site(s, tc.num_hidden_layers): k for s, k in t.kept.items()},
            num_layers=tc.num_hidden_layers, hidden=tc.hidden_size, intermediate=tc.intermediate_size,
            vision_layers=vc.num_hidden_layers, vision_hidden=vc.hidden_size,
            vision_intermediate=vc.intermediate_size, vision_tokens=n_img + 1,
        )
        records.append({"method": t.name, "keep": None if t.name == "none" else a.keep, "kept_tokens": t.kept,
                        "prefill_ms": statistics.median(t.times), "prefill_ms_min": min(t.times), "prefill_ms_all": t.times,
                        "selection_ms": statistics.median(t.selection), "prefill_tflops": flops.total / 1e12})
    return records


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(PRUNERS), help="comma-separated registry names")
    p.add_argument("--keep", type=lambda s: float(s) if "." in s else int(s), default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vision-hidden", type=int, default=1024)
    p.add_argument("--vision-intermediate", type=int, default=4096)
    p.add_argument("--vision-heads", type=int, default=16)
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--vocab", type=int, default=32064)
    p.add_argument("--system-tokens", type=int, default=35)
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, help="write one JSON record per method here")
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in PRUNERS]
    if unknown:
        p.error(f"unknown methods {unknown}; registered: {sorted(PRUNERS)}")
    if "none" not in methods:
        methods.insert(0, "none")
    model = build_model(a)
    inputs = make_inputs(a, model)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads "
               f"{torch.get_num_threads()}" + (f", {torch.cuda.get_device_name()}" if a.device.startswith("cuda") else ""))
    shape = (f"LLaVA-1.5-7B-shaped: {a.layers} decoder layers of hidden {a.hidden}, {a.vision_layers} vision layers, "
             f"{inputs['input_ids'].shape[1]} tokens, {a.dtype} on {a.device}")
    print(f"# machine: {machine}\n# model: {shape}\n")
    records = measure(model, inputs, methods, a)
    base = records[0]
    for r in records:
        r["speedup"] = base["prefill_ms"] / r["prefill_ms"]
        r["flops_ideal_speedup"] = base["prefill_tflops"] / r["prefill_tflops"]
        r["measured_over_ideal"] = r["speedup"] / r["flops_ideal_speedup"]
        r["measured_over_ideal_min"] = base["prefill_ms_min"] / r["prefill_ms_min"] / r["flops_ideal_speedup"]
        r["selection_share"] = r["selection_ms"] / r["prefill_ms"]
        r.update(layers=a.layers, vision_layers=a.vision_layers, dtype=a.dtype, device=a.device, machine=machine,
                 torch=torch.__version__, transformers=__import__("transformers").__version__)
    print("| method | keep | kept (per site) | prefill ms | speedup | FLOPs-ideal | measured/ideal | measured/ideal (min) "
          "| selection ms | selection % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        kept = ", ".join(f"{s}: {k}" for s, k in r["kept_tokens"].items()) or "all"
        print(f"| {r['method']} | {r['keep'] if r['keep'] is not None else '-'} | {kept} | {r['prefill_ms']:.1f} | "
              f"{r['speedup']:.2f}x | {r['flops_ideal_speedup']:.2f}x | {r['measured_over_ideal']:.2f} | "
              f"{r['measured_over_ideal_min']:.2f} | "
              f"{r['selection_ms']:.2f} | {100 * r['selection_share']:.2f}% |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


if __name__ == "__main__":
    main()
