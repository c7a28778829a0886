"""Choose a DyVTE head's per-router exit thresholds on validation, and compare it with random exits.

A DyVTE head removes every visual token of a sample from the first layer whose router's exit
probability beats that router's threshold. Before that layer the sample runs unpruned, so one
unpruned prefill gives every router's exit probability, and one run per fixed exit layer
(:class:`~learned_prune.pruners.dyvte.VisualExit`) gives each sample's answer for every possible
exit. From these two tables any set of thresholds is scored without another forward pass:

1. on ``--samples`` validation samples, a coordinate search over per-router values from
   ``--grid`` (started from every single value that is feasible) picks the largest analytic LLM
   prefill-FLOPs saving that loses at most ``--max-loss`` points of accuracy;
2. on the test split it reports the chosen thresholds, the same head with one value everywhere,
   and a *random exit* control: each sample exits at a layer drawn from the head's own exit
   distribution on that split (mean over ``--permutations`` shuffles), so compute is matched and
   only the choice of *which* samples exit differs.

    python benchmarks/dyvte_thresholds.py --head checkpoints/dyvte-tiny                 # 4,096 val, 1,000 test
    python benchmarks/dyvte_thresholds.py --head outputs/dyvte/export --save checkpoints/dyvte-tiny

``--thresholds`` scores given values instead of searching; ``--save`` writes the head with the
chosen thresholds (``save_pretrained``); ``--cache`` keeps the exit tables for another rule. The
FLOPs are FastV's per-layer formula (``learned_prune.evaluation.flops``) per sample, summed over
the split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learned_prune import load_backbone, load_pruner  # noqa: E402
from learned_prune.testbed import ShapesVQADataModule  # noqa: E402
from learned_prune.evaluation.flops import llm_layer_flops  # noqa: E402
from learned_prune.evaluation.vqa import greedy_answers, normalize_answer  # noqa: E402
from learned_prune.pruners.dyvte import DyVTEHead, VisualExit, _drop_visual, router_features  # noqa: E402


@torch.no_grad()
def exit_tables(model, processor, head: DyVTEHead, split: str, samples: int, batch_size: int = 128) -> dict:
    """Per sample: router exit probabilities on the unpruned path (N, L-1), correctness of the answer
    for an exit at layer 1..L-1 and for no exit (N, L), and the LLM FLOPs of each choice (N, L)."""
    dm = ShapesVQADataModule(processor, eval_batch_size=batch_size, val_size=samples, test_size=samples)
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    cfg = model.config.text_config
    L = head.num_layers
    probs, correct, flops = [], [], []
    record: dict[int, torch.Tensor] = {}

    def spy(state):  # record the router's exit probability, keep every token
        feats = router_features(state.hidden, state.instruction_mask, state.prompt_valid)
        record[state.layer] = head.exit_logits(state.layer, feats).softmax(-1)[:, 1]
        return _drop_visual(state, torch.zeros(len(feats), dtype=torch.bool, device=feats.device))

    for batch in loader:
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"].bool()
        record.clear()
        head.select = spy
        try:
            with head(model):
                model(input_ids=ids, attention_mask=batch["prompt_attention_mask"], pixel_values=batch["pixel_values"])
        finally:
            del head.select  # back to the class's method
        p = torch.zeros(len(ids), L - 1)
        for layer, v in record.items():
            p[:, layer - 1] = v
        probs.append(p)
        ok = []
        for layer in [*range(1, L), None]:
            if layer is None:
                answers = greedy_answers(model, processor, batch)
            else:
                with VisualExit(layer)(model):
                    answers = greedy_answers(model, processor, batch)
            ok.append([normalize_answer(a) == normalize_answer(t) for a, t in zip(answers, batch["answers"])])
        correct.append(torch.tensor(ok).T)
        n_vis = (ids == model.config.image_token_id).sum(1)
        n_all = mask.sum(1)
        f = torch.zeros(len(ids), L)
        for b in range(len(ids)):
            full = llm_layer_flops(int(n_all[b]), cfg.hidden_size, cfg.intermediate_size)
            text = llm_layer_flops(int(n_all[b] - n_vis[b]), cfg.hidden_size, cfg.intermediate_size)
            f[b] = torch.tensor([e * full + (L - e) * text for e in range(1, L)] + [L * full])
        flops.append(f)
    return {"probs": torch.cat(probs).numpy(), "correct": torch.cat(correct).numpy(),
            "flops": torch.cat(flops).numpy()}


def exits_for(probs: np.ndarray, thresholds: np.ndarray, min_layer: int = 1) -> np.ndarray:
    """Exit layer (1..L-1; L = no exit) of every sample under per-router ``thresholds`` (L-1,)."""
    over = probs > thresholds[None]
    over[:, : min_layer - 1] = False
    return np.where(over.any(1), over.argmax(1) + 1, probs.shape[1] + 1)


def score(tables: dict, exits: np.ndarray) -> tuple[float, float]:
    """(accuracy, fraction of LLM FLOPs saved) of the samples exiting at ``exits``."""
    rows = np.arange(len(exits))
    acc = float(tables["correct"][rows, exits - 1].mean())
    saved = 1 - float(tables["flops"][rows, exits - 1].sum() / tables["flops"][:, -1].sum())
    return acc, saved


def search(tables: dict, grid: list[float], max_loss: float, min_layer: int = 1) -> tuple[list[float], float, float]:
    """Per-router thresholds with the largest saving at most ``max_loss`` (fraction) under the full accuracy."""
    full = float(tables["correct"][:, -1].mean())
    n = tables["probs"].shape[1]

    def evaluate(t):
        acc, saved = score(tables, exits_for(tables["probs"], np.asarray(t), min_layer))
        return (saved if acc >= full - max_loss - 1e-12 else -1.0), acc, saved

    best = (-1.0, 0.0, 0.0, None)
    for start in grid:
        t = [start] * n
        value, acc, saved = evaluate(t)
        if value < 0:
            continue
        improved = True
        while improved:
            improved = False
            for k in range(n):
                for g in grid:
                    trial = t[:k] + [g] + t[k + 1:]
                    v, a, s = evaluate(trial)
                    if v > value + 1e-12:
                        t, value, acc, saved, improved = trial, v, a, s, True
        if value > best[0]:
            best = (value, acc, saved, t)
    if best[3] is None:
        raise RuntimeError(f"no thresholds from {grid} lose at most {100 * max_loss:.2f} points; widen --grid")
    return best[3], best[1], best[2]


def cached_tables(a: argparse.Namespace, model, processor, head: DyVTEHead, split: str, samples: int) -> dict:
    """:func:`exit_tables`, read from / written to ``a.cache`` when given (keyed by the head's weights)."""
    if not a.cache:
        return exit_tables(model, processor, head, split, samples)
    import hashlib

    digest = hashlib.sha1(Path(a.head, "model.safetensors").read_bytes() + Path(a.backbone, "model.safetensors").read_bytes())
    path = Path(a.cache) / f"{digest.hexdigest()[:12]}_{split}_{samples}.npz"
    if path.is_file():
        return dict(np.load(path))
    tables = exit_tables(model, processor, head, split, samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **tables)
    return tables


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head", default="checkpoints/dyvte-tiny")
    p.add_argument("--backbone", default="checkpoints/tiny-llava-shapes")
    p.add_argument("--samples", type=int, default=4096, help="validation samples for the search")
    p.add_argument("--test-samples", type=int, default=1000)
    p.add_argument("--max-loss", type=float, default=0.5, help="accuracy points the search may lose on validation")
    p.add_argument("--grid", default="0.5,0.55,0.6,0.65,0.7,0.75,0.8,0.85,0.9,0.95,0.99")
    p.add_argument("--thresholds", default=None, help="comma-separated per-router values: score these, no search")
    p.add_argument("--permutations", type=int, default=20)
    p.add_argument("--save", default=None, help="write the head with the chosen thresholds to this folder")
    p.add_argument("--json", default=None, help="write the result to this file")
    p.add_argument("--cache", default=None, help="folder for the exit tables (.npz), reused when head, split and size match")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model, processor = load_backbone(a.backbone)
    head = load_pruner(a.head)
    if not isinstance(head, DyVTEHead):
        raise TypeError(f"{a.head} is not a DyVTE head (got {type(head).__name__})")
    head.eval()
    grid = [float(g) for g in a.grid.split(",")]
    val = cached_tables(a, model, processor, head, "val", a.samples)
    if a.thresholds:
        thresholds = [float(t) for t in a.thresholds.split(",")]
        val_acc, val_saved = score(val, exits_for(val["probs"], np.asarray(thresholds), head.min_layer))
    else:
        thresholds, val_acc, val_saved = search(val, grid, a.max_loss / 100, head.min_layer)
    result = {"thresholds": thresholds, "val": {"samples": a.samples, "unpruned": float(val["correct"][:, -1].mean()),
                                                 "acc": val_acc, "llm_flops_saved": val_saved}}
    test = cached_tables(a, model, processor, head, "test", a.test_samples)
    exits = exits_for(test["probs"], np.asarray(thresholds), head.min_layer)
    acc, saved = score(test, exits)
    rng = np.random.default_rng(0)
    shuffled = [score(test, rng.permutation(exits)) for _ in range(a.permutations)]
    result["test"] = {
        "samples": a.test_samples, "unpruned": float(test["correct"][:, -1].mean()), "acc": acc, "llm_flops_saved": saved,
        "exit_fraction": {str(k): float((exits == k).mean()) for k in range(1, head.num_layers + 1)},
        "random_exit_acc": float(np.mean([s[0] for s in shuffled])),
        "random_exit_llm_flops_saved": float(np.mean([s[1] for s in shuffled])),
        "single": {str(g): dict(zip(("acc", "llm_flops_saved"),
                                    score(test, exits_for(test["probs"], np.full(head.num_layers - 1, g), head.min_layer))))
                   for g in grid},
    }
    print(json.dumps(result, indent=1))
    if a.save:
        load_pruner(a.head, threshold=thresholds).save_pretrained(a.save)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
