"""What ``eval.py`` does: build backbone + data, run the method x budget grid, write table and plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from .evaluation.grid import run_grid
from .evaluation.methods import check_methods
from .evaluation.report import accuracy_vs_flops_plot, markdown_table
from .pruners import PRUNERS


def head_folders(root: Path) -> list[str]:
    """Exported pruning heads under ``root``: folders whose config.json names a ``method``."""
    out = []
    for cfg in sorted(root.glob("*/config.json")):
        try:
            if "method" in json.loads(cfg.read_text()):
                out.append(str(cfg.parent))
        except json.JSONDecodeError:
            continue
    return out


def resolve_methods(methods: list[str] | None, checkpoints: Path) -> list[str]:
    """The grid's method specs: those given, or every registered pruner and every head folder."""
    if methods:
        return [str(m) for m in methods]  # checked by check_methods before the grid runs
    return list(PRUNERS) + head_folders(checkpoints)


def method_options(config_dir: Path) -> dict[str, dict]:
    """Constructor arguments per method from ``configs/method/<name>.yaml`` (the budget is the grid's).

    Each file is an instantiable config of the pruner class (``_target_`` plus its arguments); the
    method's name is the file's name, and ``_target_``/``name``/``keep`` are dropped.
    """
    import yaml

    out = {}
    for path in sorted(config_dir.glob("*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        name = values.pop("name", path.stem)
        out[name] = {k: v for k, v in values.items() if k not in ("_target_", "keep")}
    return out


def evaluate(cfg: DictConfig) -> list[dict[str, Any]]:
    pl.seed_everything(cfg.seed, workers=True)
    methods = resolve_methods(cfg.methods, Path(cfg.paths.checkpoints_dir))
    keeps = [float(k) if isinstance(k, float) else int(k) for k in cfg.keep]
    options = method_options(Path(cfg.paths.root_dir) / "configs" / "method")
    check_methods(methods, keeps, options)  # wrong arguments fail now, not after the methods before them
    model, processor = hydra.utils.instantiate(cfg.backbone)
    datamodule = hydra.utils.instantiate(cfg.data, processor=processor)
    loader = datamodule.test_dataloader()
    dataset = getattr(datamodule, "name", None) or \
        f"{type(datamodule).__name__.replace('DataModule', '').lower()}:{cfg.data.get('eval_split', 'test')}"
    max_new_tokens = getattr(datamodule, "max_new_tokens", None) or cfg.max_new_tokens
    timing = next(iter(datamodule._loader(datamodule.test_set, False, 1)))
    timing_inputs = {"input_ids": timing["prompt_input_ids"], "attention_mask": timing["prompt_attention_mask"],
                     "pixel_values": timing["pixel_values"]}
    out = Path(cfg.paths.output_dir)
    records = run_grid(model, processor, loader, timing_inputs, methods, keeps, dataset, out,
                       config=OmegaConf.to_container(cfg, resolve=True), repeats=cfg.timing.repeats,
                       warmup=cfg.timing.warmup, max_new_tokens=max_new_tokens,
                       metric_factory=getattr(datamodule, "metric", None),
                       options=options)
    records = [r for r in records if r["dataset"] == dataset]
    table = markdown_table(records)
    (out / "results.md").write_text(table)
    plot = accuracy_vs_flops_plot(records, out / "accuracy_vs_flops.png")
    logger_cfg = cfg.get("logger")
    if logger_cfg and "_target_" in logger_cfg:
        import wandb

        logger = hydra.utils.instantiate(logger_cfg)
        cols = ["method", "keep", "dataset", "accuracy", "prefill_tflops", "prefill_ms", "peak_mem_mb", "kv_cache_mb"]
        logger.experiment.log({
            "results": wandb.Table(columns=cols, data=[[str(r[c]) if c in ("keep",) else r[c] for c in cols]
                                                       for r in records]),
            "accuracy_vs_flops": wandb.Image(str(plot)),
        })
        logger.experiment.finish()
    print(table)
    print(f"results: {out / 'results.jsonl'}\ntable:   {out / 'results.md'}\nplot:    {plot}")
    return records
