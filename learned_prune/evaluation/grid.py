"""The method x budget grid of ``eval.py``: accuracy, kept tokens, FLOPs, latency, memory — resumable.

Fair-comparison rules, enforced here: every method runs on the same engine, model, prompts and
greedy decoding, with fixed seeds; timing follows warm-up runs and uses the same sample; a budget
``keep`` is the number (or ratio) of visual tokens a method lets reach the LLM's later layers, and
the per-site counts each method actually kept are recorded (progressive and adaptive methods are
compared at their mean count, which the records and the plot show).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .measure import TIMING_FIELDS, analytic_flops, count_selection_flops, time_prefill_and_generation
from .methods import build_pruner, check_grid, spec_is_adaptive
from .multiturn import two_turn_answers
from .report import append_record, load_records, record_key
from .vqa import AnswerAccuracy, greedy_answers


# the parts of eval.py's config that change a result (the grid's own methods/keep lists do not)
SETTING_KEYS = ("backbone", "data", "max_new_tokens", "seed", "timing")


def result_setting(config: dict[str, Any]) -> dict[str, Any]:
    """What, besides method and budget, decides a record's numbers: backbone, data, generation and timing."""
    return {k: config[k] for k in SETTING_KEYS if k in config}


def check_same_setting(records: list[dict[str, Any]], setting: dict[str, Any], path: Path) -> None:
    """Refuse to resume a results file written under another setting (its records would pass for new ones)."""
    for r in records:
        old = r.get("setting", result_setting(r.get("config", {})))
        if old != setting:
            diff = [f"{k}: {old.get(k)!r} -> {setting.get(k)!r}" for k in sorted(set(old) | set(setting))
                    if old.get(k) != setting.get(k)]
            raise ValueError(
                f"{path} holds results of another setting ({'; '.join(diff)[:600]}); mixing them would pass old "
                "records for new ones. Write to a new folder (hydra.run.dir=...) or move that file away."
            )


@torch.no_grad()
def accuracy_and_tokens(model, processor, loader: Iterable[dict], method: str, keep: Any,
                        max_new_tokens: int = 2, options: dict[str, dict] | None = None,
                        metric_factory: Callable[[], Any] | None = None, turns: int = 1) -> dict[str, Any]:
    """Accuracy (overall, per question type) and mean kept visual tokens / FLOPs per sample.

    ``turns=2`` (batches with ``followup_prompts``): each sample's follow-up is asked in the same
    conversation on the pruned KV cache (:func:`~.multiturn.two_turn_answers`); ``metrics`` then holds
    ``turn1`` (= ``accuracy``) and ``turn2``, the follow-up's accuracy (the FLOPs are the first turn's).

    ``metric_factory`` builds the accuracy metric (default: ShapesVQA's exact match; ``data=vqa``
    gives each benchmark's official metric, scored against the batch's ``golds``)."""
    pruner = build_pruner(method, keep, options)
    select_flops = count_selection_flops(pruner)
    metric = metric_factory() if metric_factory is not None else AnswerAccuracy()
    second = metric_factory() if metric_factory is not None else AnswerAccuracy()
    kept_sum: dict[str, float] = defaultdict(float)
    flops_sum: dict[str, float] = defaultdict(float)
    n = 0
    image_token = model.config.image_token_id
    for batch in loader:
        with pruner(model) as engine:
            if turns == 2:
                answers, followups = two_turn_answers(model, processor, batch, max_new_tokens)
                second.update(followups, batch["followup_answers"], batch["followup_qtypes"])
            else:
                answers = greedy_answers(model, processor, batch, max_new_tokens=max_new_tokens)
            kept = {s: v.float().cpu() for s, v in engine.kept_tokens.items()}
        metric.update(answers, batch.get("golds", batch["answers"]), batch.get("qtypes"))
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"].bool()
        n_visual = ((ids == image_token) & mask).sum(1)
        n_text = mask.sum(1) - n_visual
        for b in range(ids.shape[0]):
            per_site = {s: float(v[b]) for s, v in kept.items()}
            for part, value in analytic_flops(model, int(n_text[b]), int(n_visual[b]), per_site).items():
                flops_sum[part] += value
            for s, v in per_site.items():
                kept_sum[s] += v
        n += ids.shape[0]
    scores = {k: float(v) for k, v in metric.compute_all().items()}
    by_type = {k: v for k, v in scores.items() if k.startswith("acc_")}
    extra = {k: v for k, v in scores.items() if k != "acc" and not k.startswith("acc_")}  # e.g. POPE's F1
    if turns == 2:
        extra.update(turn1=float(metric.compute()), turn2=float(second.compute()))
    flops = {k: v / n for k, v in flops_sum.items()}
    flops["pruner"] = sum(select_flops) / max(n, 1)
    return {
        "accuracy": float(metric.compute()),
        "accuracy_by_type": by_type,
        "metrics": extra,
        "kept_tokens": {s: v / n for s, v in kept_sum.items()},
        "flops": flops,
        "prefill_tflops": sum(flops.values()) / 1e12,
        "n_samples": n,
    }


def run_grid(
    model: torch.nn.Module,
    processor: Any,
    loader: Iterable[dict],
    timing_inputs: dict,
    methods: Sequence[str],
    keeps: Sequence[Any],
    dataset: str,
    out_dir: Path,
    config: dict | None = None,
    repeats: int = 5,
    warmup: int = 2,
    max_new_tokens: int = 2,
    options: dict[str, dict] | None = None,
    metric_factory: Callable[[], Any] | None = None,
    turns: int = 1,
) -> list[dict[str, Any]]:
    """Evaluate every (method, keep); append each finished record to ``out_dir/results.jsonl``.

    ``repeats=0`` skips the timing (accuracy-only sweeps): its fields are recorded as ``None``; so is the
    peak memory on CPU, where it cannot be measured per run (``measure.time_prefill_and_generation``).
    A method or budget listed twice, or no budget for a method that needs one, is refused.
    Records already in that file are skipped, so an interrupted grid resumes where it stopped.
    ``none`` runs once (its budget is ``"all"``), adaptive heads once (``"adaptive"``, compared at their
    mean kept count). ``options`` maps a method to its constructor arguments (configs/method/<name>.yaml).
    """
    check_grid(methods, keeps)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.jsonl"
    records = load_records(path)
    setting = result_setting(config or {})
    check_same_setting(records, setting, path)
    done = {record_key(r) for r in records}
    grid = [("none", "all")] if "none" in methods else []
    for m in methods:
        if m != "none":
            grid += [(m, "adaptive")] if spec_is_adaptive(m) else [(m, k) for k in keeps]
    todo = [(m, k) for m, k in grid if record_key({"method": m, "keep": k, "dataset": dataset}) not in done]
    bar = tqdm(todo, desc="eval grid", unit="run", initial=len(grid) - len(todo), total=len(grid))
    for method, keep in bar:
        bar.set_postfix_str(f"{method} keep={keep}")
        start = time.time()
        torch.manual_seed(0)
        result = accuracy_and_tokens(model, processor, loader, method, keep, max_new_tokens, options, metric_factory,
                                     turns)
        timing = (time_prefill_and_generation(model, build_pruner(method, keep, options), timing_inputs, repeats, warmup,
                                              max_new_tokens) if repeats > 0 else dict.fromkeys(TIMING_FIELDS))
        record = {"method": method, "keep": keep, "dataset": dataset, **result, **timing,
                  "seconds": round(time.time() - start, 1), "setting": setting,
                  "options": (options or {}).get(method.split("@")[0], {}), "config": config or {}}
        append_record(path, record)
        records.append(record)
    return records
