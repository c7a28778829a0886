"""benchmarks/dyvte_thresholds.py: the tables predict what the head does, and the search keeps its bound."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

SHAPES = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-llava-shapes"


@torch.no_grad()
def test_exit_tables_predict_the_heads_own_exits_and_answers():
    import dyvte_thresholds as dt

    from learned_prune import load_backbone
    from learned_prune.testbed import ShapesVQADataModule
    from learned_prune.evaluation.vqa import greedy_answers, normalize_answer
    from learned_prune.pruners.dyvte import DyVTEHead

    model, processor = load_backbone(SHAPES)
    cfg = model.config.text_config
    head = DyVTEHead(cfg.hidden_size, cfg.num_hidden_layers, threshold=0.6).eval()
    torch.manual_seed(0)
    for router in head.routers.values():
        torch.nn.init.normal_(router.w2.weight, std=0.05)  # spread the exits over the layers
    tables = dt.exit_tables(model, processor, head, "val", 24, batch_size=24)
    assert tables["probs"].shape == (24, 7) and tables["correct"].shape == tables["flops"].shape == (24, 8)
    predicted = dt.exits_for(tables["probs"], np.full(7, 0.6))
    assert len(set(predicted.tolist())) > 2  # the check below covers several exit layers

    batch = next(iter(ShapesVQADataModule(processor, eval_batch_size=24, val_size=24).val_dataloader()))
    with head(model):
        model(input_ids=batch["prompt_input_ids"], attention_mask=batch["prompt_attention_mask"],
              pixel_values=batch["pixel_values"])
        exits = head.exit_layer.numpy().copy()
        answers = greedy_answers(model, processor, batch)
    assert np.array_equal(exits, predicted)
    right = np.array([normalize_answer(a) == normalize_answer(t) for a, t in zip(answers, batch["answers"])])
    assert np.array_equal(tables["correct"][np.arange(24), predicted - 1], right)
    acc, saved = dt.score(tables, predicted)
    assert acc == right.mean() and 0 < saved < 1
    assert dt.score(tables, np.full(24, 8)) == (tables["correct"][:, -1].mean(), 0.0)  # no exit: nothing saved

    thresholds, acc, saved = dt.search(tables, [0.5, 0.6, 0.9, 0.99], max_loss=0.0)
    assert acc >= tables["correct"][:, -1].mean() and len(thresholds) == 7
    assert saved == dt.score(tables, dt.exits_for(tables["probs"], np.asarray(thresholds)))[1]
