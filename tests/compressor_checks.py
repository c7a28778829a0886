"""Checks shared by the learned compressors' tests (test_flashsloth.py, test_quecc.py): export round trip,
training on a frozen tiny backbone, and the eval grid loading a head folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from learned_prune import load_pruner
from learned_prune.evaluation.grid import run_grid
from learned_prune.pruners.compress import CompressorHead
from learned_prune.testbed import ShapesVQADataModule, testbed_llava

from conftest import get_tiny, make_batch
from helpers import compose_train, fit_frozen, load_exported

TINY = [
    "backbone=tiny_init", "backbone.vision_hidden=32", "backbone.text_hidden=32", "backbone.text_layers=2",
    "backbone.vision_layers=2", "backbone.intermediate_size=64", "data.batch_size=8", "data.val_size=4",
    "data.test_size=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "logger=csv", "test=false",
    "~callbacks.progress_bar", "trainer.enable_progress_bar=false", "module.warmup_steps=0",
]
HeadFactory = Callable[[torch.nn.Module], CompressorHead]


def sizes(model: torch.nn.Module) -> dict[str, int]:
    vc, tc = model.config.vision_config, model.config.text_config
    return {"vision_hidden": vc.hidden_size, "hidden_size": tc.hidden_size, "grid": vc.image_size // vc.patch_size}


def _logits(head: CompressorHead, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    with torch.no_grad(), head(model) as engine:
        out = model(**batch).logits
    return out, engine.kept_tokens


def check_round_trip(tmp_path: Path, make: HeadFactory) -> None:
    """save_pretrained -> load_pruner(folder) rebuilds the same head (class, hyper-parameters, weights, answers),
    and the loaded head refuses a backbone of the same sizes with other weights."""
    model, processor = get_tiny("llava")
    head = make(model).eval()
    batch = make_batch(processor)
    before, kept = _logits(head, model, batch)
    n = head.n_tokens
    assert list(kept) == ["vision"] and kept["vision"].tolist() == [n, n, n]
    unpruned = model(**batch).logits
    assert before.shape[1] == unpruned.shape[1] - 144 + n  # the image's 144 tokens became n
    head.save_pretrained(tmp_path / "head")
    loaded = load_pruner(str(tmp_path / "head"))
    assert type(loaded) is type(head) and loaded.hparams() == head.hparams()
    torch.testing.assert_close(loaded.state_dict(), head.state_dict())
    after, _ = _logits(loaded, model, batch)
    torch.testing.assert_close(after, before)
    other, _ = testbed_llava("llava", text_layers=4, seed=1)  # same sizes, other weights
    with pytest.raises(ValueError, match="weights differ"):
        _logits(loaded, other, batch)
    with pytest.raises(ValueError, match="hard mode"):
        with torch.no_grad(), head(model, mode="soft"):
            model(**batch)


def _answer_loss(module: torch.nn.Module, batch: dict) -> float:
    module.head.eval()
    with torch.no_grad(), module.head(module.model, mode="hard"):
        return float(module.model(**module._inputs(batch), labels=batch["labels"], use_cache=False).loss)


def check_training_lowers_the_loss(make: HeadFactory, steps: int = 15) -> None:
    """A few steps of the module's own training step (hard mode, answer loss + distillation) on the tiny
    conftest model lower the answer loss of the batch, train only the head and leave the backbone bit-identical."""
    from learned_prune.modules.compressor import CompressorModule

    model, processor = get_tiny("llava")
    torch.manual_seed(0)
    module = CompressorModule(model, make(model), processor=processor, distill_weight=0.5)
    dm = ShapesVQADataModule(processor, batch_size=8, test_size=4, val_size=4, train_size=8)
    batch = next(iter(dm.train_dataloader()))
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in module.head.parameters()}
    start = _answer_loss(module, batch)
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    module.head.train()
    for _ in range(steps):
        optimizer.zero_grad()
        module.training_step(batch, 0).backward()
        optimizer.step()
    end = _answer_loss(module, batch)
    assert end < start - 0.1, (start, end)
    assert all(torch.equal(frozen[k], v) for k, v in model.state_dict().items()), "the frozen backbone changed"


def check_train_py_exports(tmp_path: Path, module: str, cls: type, *overrides: str) -> None:
    """``python train.py module=<module>`` (its config, Lightning, export) trains the head on a frozen tiny
    backbone and exports a folder that loads with the trained weights."""
    parts = fit_frozen(tmp_path, [f"module={module}", *TINY, "trainer.max_steps=2", *overrides], "export")
    head = load_exported(tmp_path / "export", parts["module"], cls)
    assert head.backbone["text_hidden_size"] == 32 and head.backbone.get("fingerprint")


def check_grid_loads_the_folder(tmp_path: Path, make: HeadFactory) -> None:
    """The eval grid runs a head folder once, at the head's own token count, with its answers and FLOPs."""
    model, processor = get_tiny("llava")
    head = make(model).eval()
    _logits(head, model, make_batch(processor))  # records the backbone it runs on, as training does
    folder = head.save_pretrained(tmp_path / f"{head.method}-tiny")
    dm = ShapesVQADataModule(processor, batch_size=4, test_size=8, val_size=4, train_size=4)
    batch = next(iter(dm._loader(dm.test_set, False, 1)))
    timing = {"input_ids": batch["prompt_input_ids"], "attention_mask": batch["prompt_attention_mask"],
              "pixel_values": batch["pixel_values"]}
    records = run_grid(model, processor, dm.test_dataloader(), timing, ["none", str(folder)], [16], "shapes:test",
                       tmp_path / "grid", config={"note": "test"}, repeats=0, warmup=0)
    none, mine = records
    assert mine["method"] == str(folder) and mine["n_samples"] == 8
    assert mine["keep"] == "adaptive" and mine["kept_tokens"] == {"vision": float(head.n_tokens)}  # its own count
    assert mine["flops"]["pruner"] > 0  # the head's own FLOPs are counted
    assert mine["prefill_tflops"] < none["prefill_tflops"]


def compose(tmp_path: Path, module: str, *overrides: str):
    return compose_train(tmp_path, [f"module={module}", *TINY, *overrides], "export")
