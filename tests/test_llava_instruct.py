"""data=llava_instruct: LLaVA-format records, chat-template labels by hand, bad records, and ATP trained from a file."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from learned_prune.backbones import load_backbone
from learned_prune.data.llava_instruct import LengthGroupedShuffle, LlavaInstructDataModule

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "checkpoints" / "tiny-llava-shapes"
TURNS = [("<image>\nwhat color is the circle ?", "red"), ("what shape is the red object ?", "circle"),
         ("is there a blue square ?", "no")]


def write_llava(folder: Path, n: int = 20, text_only: tuple[int, ...] = (7,)) -> Path:
    """``n`` LLaVA-format records with PNG images under ``folder/img`` (1-3 turns; ``text_only`` indices have
    no image; record 4 puts its ``<image>`` after the question, as many LLaVA-665K records do)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        turns = TURNS[: 1 + i % 3]
        conv = []
        for q, a in turns:
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        row = {"id": f"r{i}", "conversations": conv}
        if i in text_only:
            conv[0]["value"] = "how many objects are there ?"
        else:
            Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
            row["image"] = f"img/{i}.png"
            if i == 4:
                conv[0]["value"] = "what color is the circle ?\n<image>"
        rows.append(row)
    path = folder / "llava.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def tiny_backbone():
    return load_backbone(str(TINY))


def _module(path: Path, processor, **kw) -> LlavaInstructDataModule:
    kw.setdefault("val_size", 2)
    return LlavaInstructDataModule(processor, annotations=str(path), image_folder=str(path.parent), batch_size=4, **kw)


def test_labels_follow_the_llava15_format_by_hand(tmp_path, tiny_backbone):
    model, processor = tiny_backbone
    assert not getattr(processor, "chat_template", None)  # the shipped backbone has none: LLaVA-1.5's format
    dm = _module(write_llava(tmp_path), processor, template="llava15")
    by_index = {r.index: r for r in dm.train_records + dm.val_records}
    items = [dm.train_set[i] for i, r in enumerate(dm.train_records) if r.index in (2, 7)]
    batch = dm.collate(sorted(items, key=lambda s: s["index"]))
    tok, image = processor.tokenizer, model.config.image_token_id
    n_image = int((batch["input_ids"][0] == image).sum())
    assert n_image == 144 and int((batch["input_ids"][1] == image).sum()) == 0  # 12 x 12 patches; text-only row
    expected = [
        "USER: <image>\nwhat color is the circle ? ASSISTANT: red</s>USER: what shape is the red object ? "
        "ASSISTANT: circle</s>USER: is there a blue square ? ASSISTANT: no</s>",
        "USER: how many objects are there ? ASSISTANT: red</s>USER: what shape is the red object ? ASSISTANT: circle</s>",
    ]
    answers = [["red", "</s>", "circle", "</s>", "no", "</s>"], ["red", "</s>", "circle", "</s>"]]
    for b, (text, ans) in enumerate(zip(expected, answers)):
        ids = tok(text)["input_ids"]
        k = ids.index(image) if image in ids else len(ids)
        ids = ids[:k] + [image] * (n_image if b == 0 else 0) + ids[k + 1 if b == 0 else k:]
        row = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
        assert row == ids
        labels = batch["labels"][b][batch["attention_mask"][b].bool()].tolist()
        # by hand: every answer token right after "ASSISTANT :", and nothing else
        want = [-100] * len(ids)
        starts = [j + 2 for j in range(len(ids) - 1) if tok.convert_ids_to_tokens(ids[j: j + 2]) == ["assistant", ":"]]
        for s in starts:
            want[s], want[s + 1] = ids[s], ids[s + 1]
        assert labels == want and tok.convert_ids_to_tokens([x for x in labels if x != -100]) == ans
        assert (batch["labels"][b][~batch["attention_mask"][b].bool()] == -100).all()
    # the prompt of the last answer: everything up to its "ASSISTANT:", left-padded
    prompt = batch["prompt_input_ids"][0][batch["prompt_attention_mask"][0].bool()].tolist()
    assert tok.decode([x for x in prompt if x != image]).endswith("user : is there a blue square ? assistant :")
    assert batch["answers"] == ["no", "circle"] and batch["index"].tolist() == [2, 7]
    assert batch["pixel_values"].shape[0] == 1  # one image for the two records
    # an <image> after the question is moved to the front of its turn, as LLaVA does
    moved = dm.collate([dm.train_set[i] for i, r in enumerate(dm.train_records) if r.index == 4])
    assert tok.convert_ids_to_tokens(moved["input_ids"][0, :3].tolist()) == ["user", ":", "<image>"]
    assert by_index[7].images == []


TEMPLATE = ("{% for m in messages %}{{ m['role'] }} :{% for c in m['content'] %}{% if c['type'] == 'image' %} <image>"
            "{% else %} {{ c['text'] }}{% endif %}{% endfor %}{% if m['role'] == 'assistant' %} </s>{% endif %}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")


def test_the_processors_chat_template_is_used_when_it_has_one(tmp_path, tiny_backbone):
    model, processor = tiny_backbone
    processor = copy.deepcopy(processor)
    processor.chat_template = TEMPLATE
    dm = _module(write_llava(tmp_path), processor)  # template=auto: the processor's own
    item = next(dm.train_set[i] for i, r in enumerate(dm.train_records) if r.index == 10)
    batch = dm.collate([item])
    tok = processor.tokenizer
    text = "user : <image> what color is the circle ?\nassistant : red </s>\nuser : what shape is the red object ?\n" \
           "assistant : circle </s>\n"
    row = [x for x in batch["input_ids"][0].tolist() if x != model.config.image_token_id]
    assert row == [x for x in tok(text)["input_ids"] if x != model.config.image_token_id]
    labelled = tok.convert_ids_to_tokens([x for x in batch["labels"][0].tolist() if x != -100])
    assert labelled == ["red", "</s>", "circle", "</s>"]
    with pytest.raises(ValueError, match="data.template=llava15"):
        _module(write_llava(tmp_path / "b"), load_backbone(str(TINY))[1], template="chat_template")


BAD = {
    "missing image": (lambda r: r.update(image="img/nope.png"), "record 3 \\(id 'r3'\\): image .*nope.png.* 'image' key"),
    "no <image>": (lambda r: r["conversations"][0].update(value="what color ?"),
                   "record 3 .*0 <image> placeholder\\(s\\) for 1 image.*add <image> to the first human turn"),
    "two <image>": (lambda r: r["conversations"][0].update(value="<image> <image> what ?"),
                    "record 3 .*2 <image> placeholder\\(s\\) for 1 image"),
    "empty": (lambda r: r.update(conversations=[]), "record 3 .*'conversations' is missing or empty"),
    "no answer": (lambda r: r.update(conversations=r["conversations"][:1]), "record 3 .*no 'gpt' turn"),
    "empty answer": (lambda r: r["conversations"][1].update(value=" "), "record 3 .*conversations\\[1\\].value .* empty"),
}


@pytest.mark.parametrize("fault", list(BAD))
def test_a_bad_record_fails_naming_it_or_is_skipped_and_counted(tmp_path, tiny_backbone, fault, caplog):
    _, processor = tiny_backbone
    path = write_llava(tmp_path)
    rows = json.loads(path.read_text())
    BAD[fault][0](rows[3])
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=BAD[fault][1]) as err:
        _module(path, processor)
    assert "data.skip_bad=true" in str(err.value)
    with caplog.at_level(logging.INFO, logger="learned_prune.data.llava_instruct"):
        dm = _module(path, processor, skip_bad=True)
    assert sum(dm.skipped.values()) == 1 and len(dm.train_records) + len(dm.val_records) == 19
    assert 3 not in {r.index for r in dm.train_records + dm.val_records}
    assert "skipped 1 of 20 records" in caplog.text


def test_validation_slice_filters_and_length_groups(tmp_path, tiny_backbone):
    _, processor = tiny_backbone
    path = write_llava(tmp_path)
    dm = _module(path, processor, val_size=0.25)
    assert len(dm.val_records) == 5 and all(r.images for r in dm.val_records)  # held out: records with an image
    assert not {r.index for r in dm.val_records} & {r.index for r in dm.train_records}
    assert all(r.images for r in _module(path, processor, text_only=False).train_records)
    single = _module(path, processor, single_turn_only=True)
    assert all(len(r.messages) == 2 for r in single.train_records + single.val_records)
    with pytest.raises(ValueError, match="data.val_size"):
        _module(path, processor, val_size=0)
    lengths = [3, 9, 1, 7, 5, 2, 8, 4]
    s = LengthGroupedShuffle(lengths, batch_size=2, seed=0, mega=2)
    order = s.order(0)
    assert sorted(order) == list(range(8))
    for i in range(0, 8, 4):  # each megabatch of 2 x 2 is sorted, longest first
        assert [lengths[j] for j in order[i: i + 4]] == sorted((lengths[j] for j in order[i: i + 4]), reverse=True)
    assert sorted(order[:4]) == sorted(s.__class__.__mro__[1].order(s, 0)[:4])  # the same seeded draw, regrouped


def test_atp_trains_from_a_llava_file_through_train_py(tmp_path):
    from helpers import compose_train

    from learned_prune.run import train

    path = write_llava(tmp_path / "data")
    cfg = compose_train(tmp_path / "run", [
        "module=atp", "data=llava_instruct", f"data.annotations={path}", f"data.image_folder={path.parent}",
        "data.batch_size=6", "data.val_size=2", "trainer.max_steps=3", "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1", "logger=csv", "~callbacks.progress_bar", "trainer.enable_progress_bar=false",
        "data.template=llava15", "optimized_metric=train/loss",
    ], "atp-export")
    before = {k: v.clone() for k, v in load_backbone(str(TINY))[0].state_dict().items()}
    loss = train(cfg)
    assert loss is not None and np.isfinite(loss)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == 3 and "val/acc" in summary["metrics"]
    assert (tmp_path / "run" / "atp-export" / "model.safetensors").is_file()
    after = load_backbone(str(TINY))[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the shipped backbone is untouched


def test_saved_hf_dataset_folder(tmp_path, tiny_backbone):
    datasets = pytest.importorskip("datasets", reason="reading a saved HF dataset needs `pip install datasets`")
    _, processor = tiny_backbone
    path = write_llava(tmp_path)
    rows = json.loads(path.read_text())
    for r in rows:
        r.setdefault("image", "")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    dm = LlavaInstructDataModule(processor, annotations=str(tmp_path / "hf"), image_folder=str(tmp_path),
                                 batch_size=4, val_size=2)
    assert len(dm.train_records) + len(dm.val_records) == 20
    batch = dm.collate([dm.train_set[0], dm.train_set[1]])
    assert (batch["labels"] != -100).any()


PAPER = {  # what each experiment config states, read from the paper / official code (configs/experiment/*)
    "atp": {"module.optimizer.lr": 2e-5, "data.batch_size": 16, "trainer.accumulate_grad_batches": 8,
            "module.head.target": 0.25, "trainer.max_epochs": 1},
    "lvpruning": {"module.optimizer.lr": 2e-6, "data.batch_size": 8, "trainer.accumulate_grad_batches": 8,
                  "module.head.ratios": [0.5, 0.3, 0.1], "data.text_only": False, "trainer.gradient_clip_val": 1.0},
    "dyvte": {"module.optimizer.lr": 6e-5, "data.batch_size": 16, "trainer.accumulate_grad_batches": 8,
              "data.fraction": 0.01, "data.single_turn_only": True, "module.replay": 0, "module.layers_per_step": 1},
}


@pytest.mark.parametrize("head", list(PAPER))
def test_paper_recipes_compose_and_train_on_the_tiny_backbone(tmp_path, head):
    from helpers import compose_train
    from omegaconf import OmegaConf

    from learned_prune.run import train

    path = write_llava(tmp_path / "data")
    base = [f"module={head}", f"experiment={head}_llava_instruct", f"data.annotations={path}",
            f"data.image_folder={path.parent}", "data.template=llava15"]
    cfg = compose_train(tmp_path / "cfg", base, "x")
    assert cfg.data._target_.endswith("LlavaInstructDataModule")
    for key, value in PAPER[head].items():
        got = OmegaConf.select(cfg, key)
        assert (OmegaConf.to_object(got) if OmegaConf.is_config(got) else got) == value, key
    run = compose_train(tmp_path / "run", [*base, "data.batch_size=4", "trainer.accumulate_grad_batches=1",
                                           "trainer.max_steps=2", "data.val_size=2", "data.fraction=1.0",
                                           "trainer.limit_val_batches=1", "logger=csv", "~callbacks.progress_bar",
                                           "trainer.enable_progress_bar=false", "optimized_metric=train/loss",
                                           "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null"],
                        f"{head}-export")
    loss = train(run)
    assert loss is not None and np.isfinite(loss)
    assert (tmp_path / "run" / f"{head}-export" / "model.safetensors").is_file()
