"""benchmarks/position_gap.py: gap 0 is the plain forward, and shifting every position changes nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

SHAPES = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-llava-shapes"


@torch.no_grad()
def test_gap_zero_is_the_plain_forward_and_the_uniform_control_passes(tmp_path):
    import position_gap

    from learned_prune import load_backbone
    from learned_prune.testbed import ShapesVQADataModule

    out = tmp_path / "gaps.jsonl"
    records = position_gap.main(["--backbone", str(SHAPES), "--samples", "24", "--gaps=0,-3", "--json", str(out)])
    assert [r["gap"] for r in records] == [0, -3] and len(out.read_text().splitlines()) == 2
    model, processor = load_backbone(SHAPES)
    batch = next(iter(ShapesVQADataModule(processor, eval_batch_size=24, test_size=24).test_dataloader()))
    logits = model(input_ids=batch["prompt_input_ids"], attention_mask=batch["prompt_attention_mask"],
                   pixel_values=batch["pixel_values"]).logits[:, -1]
    first = [processor.tokenizer(" " + a, add_special_tokens=False)["input_ids"][0] for a in batch["answers"]]
    plain = float((logits.argmax(-1) == torch.tensor(first)).float().mean())
    assert records[0]["first_token_acc"] == plain > 0.5
    assert position_gap.first_token_accuracy(model, processor, batch, uniform=5) == plain
