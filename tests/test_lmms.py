"""The lmms-eval model (learned_prune.lmms): lmms-eval's request interface, any pruner, batch > 1 == batch 1."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import get_tiny
from learned_prune import load_pruner
from learned_prune.lmms import PrunedVLM
from learned_prune.testbed import ShapesVQADataset

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "checkpoints" / "tiny-llava-shapes")


@dataclass
class Request:
    """lmms-eval's ``Instance`` as a model sees it: ``args`` (the request's arguments tuple)."""

    arguments: tuple

    @property
    def args(self) -> tuple:
        return self.arguments


def _docs(n: int) -> list[dict]:
    ds = ShapesVQADataset("test", size=n)
    return [{"image": Image.fromarray(ds[i]["image"]), "question": ds[i]["question"], "answer": ds[i]["answer"]}
            for i in range(n)]


def _requests(docs, gen_kwargs=None) -> list[Request]:
    gen = gen_kwargs or {"max_new_tokens": 2, "until": ["</s>"], "temperature": 0}
    return [Request((d["question"], dict(gen), lambda doc: [doc["image"]], i, "shapes", "test"))
            for i, d in enumerate(docs)]


def _vlm(pretrained: str = TINY, **kw) -> PrunedVLM:
    vlm = PrunedVLM(pretrained, **kw)
    return vlm


@pytest.mark.parametrize("pruner,keep", [("divprune", 64), ("fastv", 0.11), ("checkpoints/atp-tiny", None)])
def test_generate_until_batches_equal_batch_one_and_match_generate_by_hand(pruner, keep):
    docs = _docs(7)
    spec = str(ROOT / pruner) if pruner.startswith("checkpoints") else pruner
    one, four = _vlm(pruner=spec, keep=keep), _vlm(pruner=spec, keep=keep, batch_size=4)
    one.task_dict = four.task_dict = {"shapes": {"test": docs}}
    answers = one.generate_until(_requests(docs))
    assert four.generate_until(_requests(docs)) == answers
    model, processor = one.model, one.processor
    pr = load_pruner(spec, keep=keep) if keep is not None else load_pruner(spec)
    for d, a in zip(docs, answers):  # by hand: the LLaVA-1.5 prompt, generate under the pruner
        enc = processor(images=[d["image"]], text=f"USER: <image>\n{d['question']} ASSISTANT:", return_tensors="pt")
        with pr(model):
            out = model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
        text = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert a == text.split("</s>")[0]
    assert sum(a.strip() == d["answer"] for a, d in zip(answers, docs)) >= 4  # the shipped backbone answers


def test_llava_next_batches_equal_batch_one(tmp_path):
    model, processor = get_tiny("llava_next")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    docs = _docs(5)
    docs[1]["image"] = docs[1]["image"].resize((120, 80))  # another aspect ratio: other tiles
    one, three = _vlm(str(tmp_path), pruner="divprune", keep=0.3), _vlm(str(tmp_path), pruner="divprune", keep=0.3,
                                                                         batch_size=3)
    one.task_dict = three.task_dict = {"shapes": {"test": docs}}
    reqs = _requests(docs, {"max_new_tokens": 3, "until": [], "temperature": 0})
    assert three.generate_until(reqs) == one.generate_until(reqs)


def test_loglikelihood_scores_the_continuation_by_hand():
    docs = _docs(3)
    vlm = _vlm(pruner="none")
    vlm.task_dict = {"shapes": {"test": docs}}
    reqs = [Request((d["question"], " " + d["answer"], lambda doc: [doc["image"]], i, "shapes", "test"))
            for i, d in enumerate(docs)]
    scores = vlm.loglikelihood(reqs)
    model, processor = vlm.model, vlm.processor
    for d, (score, greedy) in zip(docs, scores):
        prompt = f"USER: <image>\n{d['question']} ASSISTANT:"
        enc = processor(images=[d["image"]], text=prompt + " " + d["answer"], return_tensors="pt")
        n = processor(images=[d["image"]], text=prompt, return_tensors="pt")["input_ids"].shape[1]
        with torch.no_grad():
            logits = model(**enc).logits[0]  # plain HF, no engine
        ids = enc["input_ids"][0, n:]
        logp = torch.log_softmax(logits[n - 1:-1].float(), -1)
        assert math.isclose(score, float(logp.gather(1, ids[:, None]).sum()), rel_tol=1e-4, abs_tol=1e-4)
        assert greedy == bool((logp.argmax(-1) == ids).all())
    pruned = _vlm(pruner="divprune", keep=16)
    pruned.task_dict = vlm.task_dict
    assert [s for s, _ in pruned.loglikelihood(reqs)] != [s for s, _ in scores]  # the pruner acts


def test_bad_model_args_and_sampling_are_refused():
    with pytest.raises(ValueError, match="unknown --model_args \\['temprature'\\]"):
        PrunedVLM(TINY, temprature=0)
    with pytest.raises(ValueError, match="not_a_pruner"):
        PrunedVLM(TINY, pruner="not_a_pruner")
    vlm = _vlm()
    vlm.task_dict = {"shapes": {"test": _docs(1)}}
    with pytest.raises(ValueError, match="decodes greedily"):
        vlm.generate_until(_requests(_docs(1), {"temperature": 0.7, "max_new_tokens": 2}))
    with pytest.raises(NotImplementedError):
        vlm.generate_until_multi_round([])


def test_registered_with_lmms_eval_when_it_is_installed():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installable beside the project's pins (docs/lmms_eval.md)")
    from lmms_eval.api.model import lmms
    from lmms_eval.models import get_model

    cls = get_model("learned_prune")
    assert issubclass(cls, lmms) and issubclass(cls, PrunedVLM)


TASK = """task: shapes_tiny
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function shapes_tiny_utils.doc_to_visual
doc_to_text: !function shapes_tiny_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 2
  temperature: 0
  do_sample: false
  num_beams: 1
  until: ["</s>"]
process_results: !function shapes_tiny_utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
UTILS = """def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
"""


@pytest.mark.timeout(1200)  # lmms-eval's start-up imports take minutes on a loaded CPU
def test_lmms_eval_cli_runs_a_local_task(tmp_path):
    """lmms-eval's own entry point, on a task the test writes (4 ShapesVQA questions saved as an HF dataset)."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installable beside the project's pins (docs/lmms_eval.md)")
    datasets = pytest.importorskip("datasets")
    import json
    import os
    import subprocess
    import sys

    docs = _docs(4)
    datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)}).save_to_disk(str(tmp_path / "data"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "shapes_tiny.yaml").write_text(TASK.format(data=tmp_path / "data"))
    (tasks / "shapes_tiny_utils.py").write_text(UTILS)
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "learned_prune", "--model_args",
           f"pretrained={TINY},pruner=divprune,keep=64", "--tasks", "shapes_tiny", "--include_path",
           str(tasks), "--batch_size", "3", "--output_path", str(tmp_path / "out"), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    found = list((tmp_path / "out").rglob("*results.json"))  # lmms-eval exits 0 on a model error: look for results
    assert run.returncode == 0 and found, (run.stdout + run.stderr)[-3000:]
    results = found[0]
    score = json.loads(results.read_text())["results"]["shapes_tiny"]["exact_match,none"]
    vlm = _vlm(pruner="divprune", keep=64)
    vlm.task_dict = {"shapes": {"test": docs}}
    answers = vlm.generate_until(_requests(docs))
    assert score == pytest.approx(sum(a.strip().lower() == d["answer"] for a, d in zip(answers, docs)) / len(docs))
