"""data=vqa: each benchmark's file layout read from a tmp folder, and its official metric against
values computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from learned_prune.data.vqa_files import VQABenchmarkDataModule
from learned_prune.evaluation.grid import run_grid
from learned_prune.data.vqa_metrics import (
    BenchmarkAccuracy, gqa_correct, pope_answer, pope_metrics, scienceqa_letter, vqa_accuracy, vqa_normalize,
)

from conftest import get_tiny


def _png(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)


def test_vqa_accuracy_by_hand():
    golds = ["two"] * 2 + ["three"] * 8
    # leave-one-out: the 2 subsets without a "two" still hold one "two" -> 1/3 each; the 8 without a
    # "three" hold both "two"s -> 2/3 each; mean = (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert vqa_accuracy("Two.", golds) == pytest.approx(0.6)
    assert vqa_accuracy("3", golds) == pytest.approx(1.0)  # 7 or 8 matches in every subset
    assert vqa_accuracy("four", golds) == 0.0
    assert vqa_normalize("The Dog's  bowl!") == "dog's bowl"
    assert vqa_normalize("1,000 dollars") == "1000 dollars"  # commas between digits go
    assert vqa_normalize("dont") == "don't"  # contractions written without the apostrophe get it back


def test_gqa_and_scienceqa_rules():
    assert gqa_correct("Yes.", "yes") and not gqa_correct("yes it is", "yes")
    assert scienceqa_letter("B", 3) == "B" and scienceqa_letter("C. a cat", 3) == "C"
    assert scienceqa_letter("The answer is A.", 2) == "A" and scienceqa_letter("D", 3) is None
    assert scienceqa_letter("I think so", 4) is None


def test_pope_metrics_by_hand():
    preds = ["Yes, there is.", "No.", "yes", "There is not a dog.", "Yes"]
    labels = ["yes", "no", "no", "yes", "yes"]
    assert [pope_answer(p) for p in preds] == ["yes", "no", "yes", "no", "yes"]
    # TP = 2 (1st, 5th), FP = 1 (3rd), TN = 1 (2nd), FN = 1 (4th)
    m = pope_metrics(preds, labels)
    assert m["acc"] == pytest.approx(3 / 5) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 5)
    metric = BenchmarkAccuracy("pope")
    metric.update(preds, labels, ["adversarial"] * 3 + ["random"] * 2)
    out = metric.compute_all()
    assert float(out["acc"]) == pytest.approx(0.6) and float(out["f1"]) == pytest.approx(2 / 3)
    assert float(out["acc_adversarial"]) == pytest.approx(2 / 3) and float(out["acc_random"]) == pytest.approx(0.5)


def _write_all(root):
    _png(root / "images" / "n1.jpg")
    (root / "testdev_balanced_questions.json").write_text(json.dumps(
        {"q1": {"imageId": "n1", "question": "What is it?", "answer": "cat"}}))
    _png(root / "val2014" / "COCO_1.jpg")
    (root / "coco_pope_adversarial.json").write_text("\n".join(json.dumps(r) for r in [
        {"question_id": 1, "image": "COCO_1.jpg", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "COCO_1.jpg", "text": "Is there a car in the image?", "label": "no"}]))
    _png(root / "images" / "test" / "7" / "image.png")
    (root / "problems.json").write_text(json.dumps({
        "7": {"question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1, "image": "image.png",
              "split": "test", "subject": "natural science"},
        "8": {"question": "No image here", "choices": ["a", "b"], "answer": 0, "image": None, "split": "test"}}))
    _png(root / "train_images" / "abc.jpg")
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"question_id": 5, "image_id": "abc", "question": "What brand?", "answers": ["nike"] * 9 + ["adidas"]}]}))


@pytest.mark.parametrize("name,n,answer", [("gqa", 1, "cat"), ("scienceqa", 1, "B"), ("textvqa", 1, "nike")])
def test_each_layout_reads(tmp_path, name, n, answer):
    _write_all(tmp_path)
    dm = VQABenchmarkDataModule(None, benchmark=name, root=str(tmp_path))
    assert len(dm.test_set) == n
    item = dm.test_set[0]
    assert item["answer"] == answer and item["image"].dtype == np.uint8 and item["image"].shape[-1] == 3
    if name == "scienceqa":
        assert "A. frog\nB. whale" in item["question"] and item["gold"] == "B|2"
        assert item["qtype"] == "natural science"
    if name == "textvqa":
        assert len(item["gold"]) == 10


def test_missing_files_say_what_to_set(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        VQABenchmarkDataModule(None, benchmark="pope", root=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="data.annotations"):
        VQABenchmarkDataModule(None, benchmark="pope", root=str(tmp_path))
    with pytest.raises(ValueError, match="data.benchmark"):
        VQABenchmarkDataModule(None, benchmark="vqav9", root=str(tmp_path))
    _write_all(tmp_path)
    dm = VQABenchmarkDataModule(None, benchmark="pope", root=str(tmp_path),
                                annotations="coco_pope_adversarial.json", image_folder="elsewhere")
    with pytest.raises(FileNotFoundError, match="data.image_folder"):
        dm.test_set[0]


def test_grid_scores_pope_with_its_metric(tmp_path):
    _write_all(tmp_path / "data")
    model, processor = get_tiny("llava")
    dm = VQABenchmarkDataModule(processor, benchmark="pope", root=str(tmp_path / "data"),
                                annotations="coco_pope_adversarial.json", eval_batch_size=2, max_new_tokens=3)
    batch = next(iter(dm.test_dataloader()))
    assert batch["golds"] == ["yes", "no"] and dm.name == "pope:test"
    timing = {"input_ids": batch["prompt_input_ids"][:1], "attention_mask": batch["prompt_attention_mask"][:1],
              "pixel_values": batch["pixel_values"][:1]}
    records = run_grid(model, processor, dm.test_dataloader(), timing, ["none", "random"], [0.5], dm.name,
                       tmp_path / "out", repeats=1, warmup=0, max_new_tokens=3, metric_factory=dm.metric)
    assert {"precision", "recall", "f1", "yes_ratio"} <= set(records[0]["metrics"])
    assert records[0]["accuracy_by_type"].keys() == {"acc_adversarial"}
