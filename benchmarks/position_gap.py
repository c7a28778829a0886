"""How much a backbone's answers depend on the exact distance between the image and the question.

Pruners that drop visual tokens before the LLM and re-pack the rest (FasterVLM, VisionZip, DivPrune,
ToMe, ... by default, as in their official code) move every token after the image ``n_dropped``
positions closer to it. An LLM pre-trained on varied text does not mind; a backbone trained from
scratch on one prompt layout may have learned the exact distance instead. This script measures
that on the plain HF model (no engine, no pruning): it shifts the position ids of the tokens after
the image by ``gap`` (negative: what re-packing after dropping ``-gap`` tokens does to the text)
and reports the accuracy of the first answer token, greedy, on the ShapesVQA test split. A shift
of every position by the same amount (``--uniform``) must not change anything under RoPE, which
the script checks as a control.

    python benchmarks/position_gap.py                                   # the embedded backbone
    python benchmarks/position_gap.py --gaps=-44,-1,0,1 --samples 500 --json gaps.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learned_prune import load_backbone  # noqa: E402
from learned_prune.testbed import ShapesVQADataModule  # noqa: E402


@torch.no_grad()
def first_token_accuracy(model, processor, batch: dict, gap: int = 0, uniform: int = 0) -> float:
    """Greedy first-answer-token accuracy with the text after the image shifted by ``gap`` positions
    (and every position by ``uniform``)."""
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    tok = processor.tokenizer
    first = torch.tensor([tok(" " + a, add_special_tokens=False)["input_ids"][0] for a in batch["answers"]])
    idx = torch.arange(ids.shape[1]).expand_as(ids)
    is_image = ids == model.config.image_token_id
    after_image = idx > torch.where(is_image, idx, -1).amax(1, keepdim=True)
    positions = (mask.cumsum(1) - 1).clamp_min(0) + uniform + torch.where(after_image, gap, 0)
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                   position_ids=positions).logits[:, -1]
    return float((logits.argmax(-1) == first).float().mean())


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="checkpoints/tiny-llava-shapes")
    p.add_argument("--gaps", default="-100,-44,-20,-5,-1,0,1,5,44", help="comma-separated position shifts of the text")
    p.add_argument("--uniform", type=int, default=7, help="control: shift of every position (must not matter)")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--json", default=None, help="append one JSON record per gap to this file")
    a = p.parse_args(argv)
    model, processor = load_backbone(a.backbone)
    dm = ShapesVQADataModule(processor, eval_batch_size=a.samples, test_size=a.samples)
    batch = next(iter(dm.test_dataloader()))
    base = first_token_accuracy(model, processor, batch)
    control = first_token_accuracy(model, processor, batch, uniform=a.uniform)
    if abs(control - base) > 0.01:
        raise RuntimeError(f"a uniform shift of {a.uniform} changed the accuracy ({base:.3f} -> {control:.3f}): "
                           "the model does not use relative positions only")
    records = [dict(backbone=a.backbone, samples=a.samples, gap=int(g),
                    first_token_acc=first_token_accuracy(model, processor, batch, gap=int(g)))
               for g in a.gaps.split(",")]
    print(f"| gap (text positions shifted by) | first-answer-token accuracy |   ({a.backbone}, {a.samples} test samples;"
          f" uniform shift {a.uniform}: {control:.3f} vs {base:.3f})")
    print("|---|---|")
    for r in records:
        print(f"| {r['gap']} | {100 * r['first_token_acc']:.1f} |")
    if a.json:
        with open(a.json, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return records


if __name__ == "__main__":
    main()
