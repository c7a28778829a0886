"""The testbed recipe's stages: each runs a few steps from its config, and does what it is for."""

from __future__ import annotations

import torch

from learned_prune.testbed.contrastive import describe, retrieval_accuracy

from helpers import compose_train

TINY = ["backbone.vision_hidden=32", "backbone.text_hidden=32", "backbone.text_layers=2", "backbone.vision_layers=2",
        "backbone.intermediate_size=64", "logger=csv", "~callbacks.progress_bar", "trainer.enable_progress_bar=false"]


def test_captions_list_the_objects_from_left_to_right():
    objects = [dict(cx=50.0, size="small", color="blue", shape="cross"), dict(cx=10.0, size="large", color="red", shape="circle")]
    assert describe(objects) == "a large red circle , a small blue cross"


def test_retrieval_accuracy_counts_identical_captions_as_right():
    logits = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert float(retrieval_accuracy(logits, ["a", "a", "b"])) == 1.0
    assert abs(float(retrieval_accuracy(logits, ["a", "b", "c"])) - 1 / 3) < 1e-6


def test_the_contrastive_stage_teaches_cls_to_retrieve_its_caption(tmp_path):
    from learned_prune.run import build

    cfg = compose_train(tmp_path, ["module=contrastive", *TINY, "data.batch_size=16", "data.train_size=16",
                                   "data.val_size=16", "trainer.max_steps=40", "trainer.val_check_interval=40",
                                   "module.warmup_steps=4", "module.lr=3e-3"])
    parts = build(cfg)
    module, dm = parts["module"], parts["datamodule"]
    frozen = {k: v.clone() for k, v in module.model.model.language_model.state_dict().items()}
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        before = float(retrieval_accuracy(module.similarity(batch), batch["captions"]))
    parts["trainer"].fit(module, datamodule=dm)
    module.eval()
    with torch.no_grad():
        after = float(retrieval_accuracy(module.similarity(batch), batch["captions"]))
    chance = 1 / 16
    print(f"retrieval on the training batch: {before:.2f} before, {after:.2f} after")
    assert after > max(before, 3 * chance), (before, after)  # the [CLS] now finds its own caption
    lm = module.model.model.language_model.state_dict()
    assert all(torch.equal(frozen[k], lm[k]) for k in frozen), "only the tower (and the text side) may train"
    assert (tmp_path / "export" / "model.safetensors").is_file()


def _changed(before: dict, module) -> set[str]:
    after = module.model.state_dict()
    return {k.split(".")[1] if k.startswith("model.") else k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}


def _run_stage(tmp_path, stage: str):
    from learned_prune.run import build

    cfg = compose_train(tmp_path, [f"module={stage}", *TINY, "data.batch_size=4", "data.train_size=8", "data.val_size=4",
                                   "trainer.max_steps=3", "trainer.val_check_interval=3", "module.warmup_steps=1"])
    parts = build(cfg)
    module = parts["module"]
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    parts["trainer"].fit(module, datamodule=parts["datamodule"])
    assert "val/next_token_acc" in parts["trainer"].callback_metrics
    assert (tmp_path / "export" / "model.safetensors").is_file()
    return _changed(before, module)


def test_the_text_stage_trains_the_llm_alone(tmp_path):
    assert _run_stage(tmp_path, "text_pretrain") == {"language_model", "lm_head"}


def test_the_align_stage_trains_the_projector_alone(tmp_path):
    assert _run_stage(tmp_path, "align") == {"multi_modal_projector"}


def test_the_text_stage_sees_descriptions_questions_and_answers_with_labels_on_every_token():
    from learned_prune.testbed import ShapesVQADataset, testbed_llava
    from learned_prune.testbed.lm_stages import SceneText

    _, processor = testbed_llava("llava", text_layers=1, vision_layers=1)
    items = [ShapesVQADataset("val", size=2)[i] for i in range(2)]
    batch = SceneText(processor)(items)
    tok = processor.tokenizer
    first = tok.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert first.startswith(describe(items[0]["objects"])) and items[0]["question"] in first
    assert first.endswith(f"{items[0]['answer']} {tok.eos_token}") or first.endswith(f"{items[0]['answer']}{tok.eos_token}")
    assert torch.equal(batch["labels"] != -100, batch["attention_mask"].bool())
    assert tok.unk_token_id not in batch["input_ids"][batch["attention_mask"].bool()]


def test_the_instruct_stage_trains_every_part_from_the_aligned_export_without_resetting_its_positions(tmp_path):
    from learned_prune.run import build
    from learned_prune.testbed import testbed_llava

    model, processor = testbed_llava("llava", vision_hidden=32, text_hidden=32, text_layers=2, vision_layers=2,
                                     intermediate_size=64)
    model.save_pretrained(tmp_path / "aligned")
    processor.save_pretrained(tmp_path / "aligned")
    positions = model.model.vision_tower.embeddings.position_embedding.weight.detach().clone()
    cfg = compose_train(tmp_path, ["module=instruct", f"backbone.name_or_path={tmp_path / 'aligned'}", *TINY[5:],
                                   "data.batch_size=4", "data.train_size=8", "data.val_size=4", "data.test_size=4",
                                   "trainer.max_steps=3", "trainer.val_check_interval=3", "module.warmup_steps=1",
                                   "test=false"])
    parts = build(cfg)
    module = parts["module"]
    tower = module.model.model.vision_tower.embeddings.position_embedding.weight
    assert torch.equal(tower.detach(), positions)  # the contrastive stage's positions are kept, not re-initialised
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    parts["trainer"].fit(module, datamodule=parts["datamodule"])
    assert _changed(before, module) == {"vision_tower", "multi_modal_projector", "language_model", "lm_head"}
    rates = [g["lr"] for g in parts["trainer"].optimizers[0].param_groups]
    assert abs(min(rates) / max(rates) - module.hparams.tower_lr_scale) < 1e-6  # the tower runs at its lower rate
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_hard_negative_captions_are_wrong_about_exactly_one_attribute():
    import numpy as np

    from learned_prune.testbed import ShapesVQADataset
    from learned_prune.testbed.contrastive import perturbed

    for i in range(20):
        objects = ShapesVQADataset("train", size=20)[i]["objects"]
        changed = perturbed(objects, np.random.default_rng(i))
        diffs = [(k, a[k], b[k]) for a, b in zip(objects, changed) for k in ("color", "shape", "size") if a[k] != b[k]]
        assert len(diffs) == 1, diffs
        assert describe(changed) != describe(objects)
