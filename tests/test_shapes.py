"""ShapesVQA: determinism, disjoint splits, masks vs drawn objects, valid answers, the collator."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch

from learned_prune.data import VQACollator
from learned_prune.testbed import QUESTION_TYPES, VOCAB, ShapesVQADataModule, ShapesVQADataset
from learned_prune.testbed.scenes import COLOR_NAMES, NUMBERS, SHAPES, SIZE_NAMES, plural

from conftest import get_tiny


def _digest(sample) -> str:
    return hashlib.sha1(sample["image"].tobytes() + sample["question"].encode()).hexdigest()


def test_deterministic_per_seed_and_index():
    a, b = ShapesVQADataset("train", seed=3), ShapesVQADataset("train", seed=3)
    for i in (0, 7, 99_999):
        assert _digest(a[i]) == _digest(b[i]) and a[i]["answer"] == b[i]["answer"]
    assert _digest(ShapesVQADataset("train", seed=4)[0]) != _digest(a[0])


def test_splits_use_disjoint_seeds_and_images():
    splits = {s: ShapesVQADataset(s, size=200) for s in ("train", "val", "test", "hard", "shift")}
    assert len({d.split_seed for d in splits.values()}) == 5
    hashes = {s: {_digest(d[i]) for i in range(200)} for s, d in splits.items()}
    names = list(hashes)
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            assert not hashes[x] & hashes[y], (x, y)


def test_sparse_scenes_are_the_earlier_images_exactly():
    """scenes="sparse" draws what backbones before 2026-12-04 were trained and measured on (digests taken
    from the generator of that time), so their recorded figures stay reproducible."""
    for split, want in {"train": ["4449208b07578fb9", "65ffe85e7b4897e8"], "test": ["2b3a600fdb76a2c7", "44e0ba0b56aaf30e"]}.items():
        ds = ShapesVQADataset(split, size=10, scenes="sparse")
        assert [_digest(ds[i])[:16] for i in (0, 7)] == want
    assert _digest(ShapesVQADataset("test", size=1, scenes="redundant")[0]) != _digest(ShapesVQADataset("test", size=1)[0])
    with pytest.raises(ValueError, match="scenes must be one of"):
        ShapesVQADataset("test", scenes="dense")


def test_the_hard_split_asks_about_one_object_among_many():
    hard, test = ShapesVQADataset("hard", size=200, scenes="redundant"), ShapesVQADataset("test", size=200, scenes="redundant")
    items = [hard[i] for i in range(200)]
    assert min(len(s["objects"]) for s in items) >= 6 > max(len(test[i]["objects"]) for i in range(200)) - 1
    assert {s["qtype"] for s in items} == {"color", "shape", "size", "exist"}
    about = [len(set(s["patch_objects"][s["target_patches"]].tolist())) for s in items if s["target_patches"].any()]
    assert np.mean(np.array(about) == 1) > 0.9  # the question is about one object (exist: rarely two alike ones)
    # the question's object covers a small share of the patches: 16 of 144 tokens cannot cover them all
    fg = np.mean([s["patch_mask"].float().sum().item() for s in items])
    assert fg > 16


def test_objects_span_several_patches_so_neighbouring_tokens_are_redundant():
    ds = ShapesVQADataset("test", size=100, scenes="redundant")
    per_object = [np.bincount(s["patch_objects"][s["patch_objects"] >= 0].numpy()) for s in (ds[i] for i in range(100))]
    assert np.median(np.concatenate(per_object)) >= 5


def test_training_mixes_in_crowded_scenes():
    counts = [len(ShapesVQADataset("train", size=300, scenes="redundant")[i]["objects"]) for i in range(300)]
    assert 0.15 < np.mean(np.array(counts) >= 7) < 0.45


def test_masks_agree_with_drawn_objects():
    ds = ShapesVQADataset("test", size=50)
    g, ps = ds.image_size // ds.patch_size, ds.patch_size
    for i in range(50):
        s = ds[i]
        pix = s["pixel_mask"].numpy()
        cover = pix.reshape(g, ps, g, ps).mean((1, 3)).reshape(-1)
        assert np.array_equal(s["patch_mask"].numpy(), cover >= ds.fg_threshold)
        assert ((s["patch_labels"] >= 0) == s["patch_mask"]).all()
        for o, box in zip(s["objects"], s["boxes"]):
            x0, y0, x1, y1 = box.tolist()
            assert 0 <= x0 < o["cx"] < x1 <= ds.image_size and 0 <= y0 < o["cy"] < y1 <= ds.image_size
        # the pixel at each object's centre is foreground (objects stay mostly visible)
        assert all(pix[int(o["cy"]), int(o["cx"])] for o in s["objects"])
        assert s["patch_mask"].float().mean() < 0.6  # most patches are background


def test_patch_labels_name_the_covering_object():
    ds = ShapesVQADataset("val", size=30)
    for i in range(30):
        s = ds[i]
        classes = {COLOR_NAMES.index(o["color"]) * len(SHAPES) + SHAPES.index(o["shape"]) for o in s["objects"]}
        assert set(s["patch_labels"][s["patch_labels"] >= 0].tolist()) <= classes


def test_answers_are_valid_and_balanced():
    ds = ShapesVQADataset("train", size=2000)
    seen, yes = {q: 0 for q in QUESTION_TYPES}, []
    vocab = set(VOCAB)
    for i in range(1200):
        s = ds[i]
        seen[s["qtype"]] += 1
        q, a, objs = s["question"], s["answer"], s["objects"]
        assert set(re.findall(r"\w+|[^\w\s]", q)) <= vocab and a in vocab
        if s["qtype"] == "color":
            assert a in COLOR_NAMES
        elif s["qtype"] == "shape":
            assert a in SHAPES
        elif s["qtype"] == "size":
            assert a in SIZE_NAMES
        elif s["qtype"] == "count":
            word = q.split()[2]
            n = sum(o["color"] == word for o in objs) if word in COLOR_NAMES else \
                sum(plural(o["shape"]) == word for o in objs)
            assert a == NUMBERS[n]
        elif s["qtype"] == "exist":
            color, shape = q.split()[3:5]
            assert (a == "yes") == any(o["color"] == color and o["shape"] == shape for o in objs)
            yes.append(a == "yes")
        else:
            assert a in ("yes", "no")
    assert all(v > 0 for v in seen.values()), seen
    assert 0.35 < np.mean(yes) < 0.65


def test_shift_split_has_more_smaller_objects():
    test, shift = ShapesVQADataset("test", size=100), ShapesVQADataset("shift", size=100)
    n = lambda d: np.mean([len(d[i]["objects"]) for i in range(100)])  # noqa: E731
    r = lambda d: np.mean([o["r"] for i in range(100) for o in d[i]["objects"]])  # noqa: E731
    assert n(shift) > n(test) + 1 and r(shift) < r(test)


def test_collator_labels_only_the_answer():
    model, processor = get_tiny("llava")
    ds = ShapesVQADataset("val", size=8)
    batch = VQACollator(processor)([ds[i] for i in range(8)])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    image = model.config.image_token_id
    assert ((ids == image).sum(1) == 144).all()
    assert (mask[:, 0] == 0).any()  # left padding
    tok = processor.tokenizer
    for b in range(8):
        answer = labels[b][labels[b] != -100]
        assert tok.decode(answer[:-1]).strip() == batch["answers"][b] and answer[-1] == tok.eos_token_id
        prompt = batch["prompt_input_ids"][b][batch["prompt_attention_mask"][b].bool()]
        full = ids[b][mask[b].bool()]
        assert torch.equal(full[: prompt.numel()], prompt) and full.numel() == prompt.numel() + answer.numel()


def test_datamodule_batches():
    _, processor = get_tiny("llava")
    dm = ShapesVQADataModule(processor, batch_size=4, train_size=16, val_size=8, test_size=8)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape == (4, 3, 96, 96)
    raw = ShapesVQADataModule(None, batch_size=3, train_size=6)
    assert isinstance(next(iter(raw.train_dataloader())), list)
    with pytest.raises(ValueError, match="eval_split"):
        ShapesVQADataModule(processor, eval_split="tset")


def test_target_patches_cover_the_questioned_objects():
    ds = ShapesVQADataset("val", size=200)
    for i in range(200):
        s = ds[i]
        target, fg = s["target_patches"], s["patch_mask"]
        assert not (target & ~fg).any()
        if s["qtype"] in ("color", "shape", "size", "position"):
            assert target.any(), s["question"]
        if s["qtype"] == "exist" and s["answer"] == "no":
            assert not target.any()
        if s["qtype"] == "count" and s["answer"] == "zero":
            assert not target.any()


def test_relation_targets_name_the_asked_relation_and_agree_with_the_answer():
    ds = ShapesVQADataset("val", size=300, question_weights={"position": 1.0, "color": 1.0})
    seen = set()
    for i in range(300):
        s = ds[i]
        offset, relation = float(s["target_offset"]), int(s["target_relation"])
        if s["qtype"] != "position":
            assert np.isnan(offset) and relation == -100
            continue
        assert abs(offset) >= 0.1 - 1e-6  # position questions only ask about objects at least 10% apart
        assert (offset > 0) == (s["answer"] == "yes"), s["question"]
        assert f" {['left of', 'right of', 'above', 'below'][relation]} " in s["question"]
        seen.add(relation)
    assert len(seen) == 4


def test_the_generic_tiny_backbone_knows_no_testbed_words_and_the_testbed_builder_does():
    from learned_prune import tiny_llava
    from learned_prune.testbed import testbed_llava

    _, generic = tiny_llava("llava", text_layers=1, vision_layers=1)
    _, testbed = testbed_llava("llava", text_layers=1, vision_layers=1)
    unk = generic.tokenizer.unk_token_id
    assert generic.tokenizer.convert_tokens_to_ids("triangle") == unk
    assert all(testbed.tokenizer.convert_tokens_to_ids(w) != unk for w in VOCAB)
