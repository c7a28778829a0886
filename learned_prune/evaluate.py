"""What ``eval.py`` does: build backbone + data, run the method x budget grid, write table and plot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from .evaluation.grid import run_grid
from .evaluation.methods import check_grid, check_methods, parse_keeps, parse_methods
from .evaluation.report import accuracy_vs_flops_plot, markdown_table
from .pruners import PRUNERS
from .pruners.checked_io import read_json


def head_folders(root: Path) -> list[str]:
    """Exported pruning heads under ``root``: folders whose config.json names a ``method``. A config.json
    that is not valid JSON fails naming the file, rather than leaving its folder out of the grid unseen."""
    out = []
    for cfg in sorted(root.glob("*/config.json")):
        try:
            config = read_json(cfg, "config")
        except ValueError as e:
            raise ValueError(f"{e}. The default grid reads every {root}/*/config.json to find the head folders: fix "
                             "this file, move its folder away, or name the methods (methods=[...])") from None
        if "method" in config:
            out.append(str(cfg.parent))
    return out


def resolve_methods(methods: Any, checkpoints: Path) -> list[str]:
    """The grid's method specs: those given, or (unset) every registered pruner and every head folder."""
    specs = parse_methods(methods)  # an empty list is refused, not read as "unset"
    return specs if specs is not None else list(PRUNERS) + head_folders(checkpoints)


def resume_command(out: Path) -> str:
    """The command that resumes this eval.py run: its overrides (when Hydra ran it) and its run folder."""
    from hydra.core.hydra_config import HydraConfig

    overrides = []
    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.run.dir=")]
    return " ".join(["python eval.py", *(f"'{o}'" if any(c in o for c in "[]@+ ") else o for o in overrides),
                     f"hydra.run.dir={out}"])


def main(cfg: DictConfig) -> list[dict[str, Any]]:
    """``eval.py``: :func:`evaluate`, and on Ctrl-C one line saying how to resume (finished runs are kept)."""
    try:
        return evaluate(cfg)
    except KeyboardInterrupt:
        out = Path(cfg.paths.output_dir)
        print(f"\ninterrupted; finished runs are kept in {out / 'results.jsonl'}. Resume: {resume_command(out)}",
              file=sys.stderr, flush=True)
        raise SystemExit(130) from None


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
    """Run the grid ``cfg`` describes into ``cfg.paths.output_dir`` (resuming what is there); every method
    spec and budget is checked, on the loaded model too, before the first run."""
    out = Path(cfg.paths.output_dir)
    print(f"eval run folder: {out} (an interrupted grid resumes with hydra.run.dir={out})", flush=True)
    pl.seed_everything(cfg.seed, workers=True)
    methods = resolve_methods(OmegaConf.to_object(cfg.methods) if OmegaConf.is_config(cfg.methods) else cfg.methods,
                              Path(cfg.paths.checkpoints_dir))
    keeps = parse_keeps(OmegaConf.to_object(cfg.keep) if OmegaConf.is_config(cfg.keep) else cfg.keep)
    check_grid(methods, keeps)
    options = method_options(Path(cfg.paths.root_dir) / "configs" / "method")
    check_methods(methods, keeps, options)  # wrong arguments fail now, not after the methods before them
    model, processor = hydra.utils.instantiate(cfg.backbone)
    check_methods(methods, keeps, options, model=model)  # and what only the model can tell (e.g. llm:K in range)
    turns = int(cfg.data.get("turns", 1))
    if turns not in (1, 2):
        raise ValueError(f"data.turns={turns}: 1 (one question per image) or 2 (ShapesVQA's follow-up question)")
    data_cfg = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "turns"}
    splits = data_cfg.get("eval_split", "test")
    splits = [splits] if isinstance(splits, str) else list(splits)
    if not splits:
        raise ValueError("data.eval_split is an empty list: name a split (test) or several ([test,hard])")
    records = []
    for split in splits:  # one grid per evaluation split, all in one results file (the dataset column)
        if "eval_split" in data_cfg:
            data_cfg["eval_split"] = split
        records += _evaluate_split(cfg, model, processor, data_cfg, turns, methods, keeps, options, out)
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


def _evaluate_split(cfg: DictConfig, model: Any, processor: Any, data_cfg: dict, turns: int, methods: list[str],
                    keeps: list, options: dict[str, dict], out: Path) -> list[dict[str, Any]]:
    """The method x budget grid on one evaluation split (``data_cfg``'s ``eval_split``); its records."""
    datamodule = hydra.utils.instantiate(data_cfg, processor=processor)
    if len(datamodule.test_set) == 0:
        raise ValueError(f"the evaluation split is empty (data.test_size={cfg.data.get('test_size')}): "
                         "set data.test_size to at least 1")
    loader = datamodule.test_dataloader()
    if turns == 2:  # the follow-up about another object, on the first turn's pruned KV cache
        from .testbed.followup import followup_loader

        loader = followup_loader(datamodule)
    dataset = getattr(datamodule, "name", None) or \
        f"{type(datamodule).__name__.replace('DataModule', '').lower()}:{data_cfg.get('eval_split', 'test')}"
    max_new_tokens = getattr(datamodule, "max_new_tokens", None) or cfg.max_new_tokens
    dataset += ":turns=2" if turns == 2 else ""
    timing = next(iter(datamodule._loader(datamodule.test_set, False, 1)))
    from .data.collate import prompt_inputs

    timing_inputs = prompt_inputs(timing)  # the family's image inputs too (Qwen-VL: grid, token types)
    records = run_grid(model, processor, loader, timing_inputs, methods, keeps, dataset, out,
                       config=OmegaConf.to_container(cfg, resolve=True), repeats=cfg.timing.repeats,
                       warmup=cfg.timing.warmup, max_new_tokens=max_new_tokens,
                       metric_factory=getattr(datamodule, "metric", None),
                       options=options, turns=turns)
    records = [r for r in records if r["dataset"] == dataset]
    return records
