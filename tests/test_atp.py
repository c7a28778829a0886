"""ATP end to end: fast dev run, frozen backbone untouched, export/load round trip, sweep file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from learned_prune import load_pruner
from learned_prune.testbed import testbed_llava as tiny_testbed  # not named test*: pytest would collect it
from learned_prune.run import build, train

from conftest import make_batch
from helpers import compose_train
from test_configs import CONFIGS

TINY = [
    "module=atp", "backbone=tiny_init", "backbone.vision_hidden=32", "backbone.text_hidden=32",
    "backbone.text_layers=8", "backbone.vision_layers=2", "backbone.intermediate_size=64", "data.batch_size=4",
    "data.val_size=4", "data.test_size=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
    "logger=csv", "~callbacks.progress_bar", "trainer.enable_progress_bar=false",
]


def _cfg(out, *overrides):
    return compose_train(out, [*TINY, *overrides], "atp-head")


def test_atp_trains_on_a_frozen_backbone_and_exports_a_small_head(tmp_path):
    cfg = _cfg(tmp_path, "trainer.max_steps=3", "test=false")
    parts = build(cfg)
    model, module, trainer = parts["model"], parts["module"], parts["trainer"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head_before = {k: v.clone() for k, v in module.head.state_dict().items()}
    trainer.fit(module, datamodule=parts["datamodule"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the frozen backbone changed"
    assert any(not torch.equal(head_before[k], v) for k, v in module.head.state_dict().items()), "head did not train"
    # Lightning checkpoints hold the head only, plus where the backbone came from
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all(k.startswith("head.") for k in ckpt["state_dict"])
    assert ckpt["backbone_ref"] == "tiny_llava"
    export = tmp_path / "atp-head"
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    config_dims = yaml.safe_load((CONFIGS / "backbone" / "tiny_init.yaml").read_text())
    dims = {k: v for k, v in config_dims.items() if not k.startswith("_") and k != "seed"}
    default_backbone, _ = tiny_testbed(**dims)  # the embedded default's shape
    from learned_prune.pruners.atp import ATPHead

    head = ATPHead(dims["text_hidden"], dims["text_layers"])
    n_head = sum(p.numel() for p in head.parameters())
    assert n_head < 0.02 * sum(p.numel() for p in default_backbone.parameters())
    config = json.loads((export / "config.json").read_text())
    assert config["method"] == "atp" and config["backbone"]["text_hidden_size"] == 32


def test_export_load_round_trip_and_size_check(tmp_path):
    train(_cfg(tmp_path, "trainer.max_steps=2", "test=false"))
    head = load_pruner(str(tmp_path / "atp-head"))
    model, processor = tiny_testbed("llava", vision_hidden=32, text_hidden=32, text_layers=8, vision_layers=2,
                                  intermediate_size=64, seed=0)
    batch = make_batch(processor, 3)
    with torch.no_grad(), head(model) as engine:
        out = model(**batch)
    assert out.logits.shape[1] < batch["input_ids"].shape[1]
    assert set(engine.kept_tokens) == {f"llm:{k}" for k in head.layers}
    with pytest.raises(ValueError, match="keep"):
        load_pruner(str(tmp_path / "atp-head"), keep=16)
    other, _ = tiny_testbed("llava", text_hidden=64, text_layers=8, vision_hidden=32, vision_layers=2)
    with pytest.raises(ValueError, match="hidden size 32.*hidden size 64"):
        with head(other):
            pass


GRID = {r * 12 + c for r in (2, 6, 10) for c in (2, 6, 10)}  # stride 4 on a 12 x 12 grid: rows and cols 2, 6, 10


def _spied_atp(model):
    """An ATP head with input-dependent thresholds whose every site records (scores, sources, valid, selection)."""
    from learned_prune.pruners.atp import ATPHead

    tc = model.config.text_config
    torch.manual_seed(0)
    head = ATPHead(tc.hidden_size, tc.num_hidden_layers).eval()
    for stage in head.modules_by_site.values():
        torch.nn.init.normal_(stage.mlp[-1].weight, std=0.05)
    seen = {}
    scores, select = head.scores, head.select

    def spy_scores(state):
        out = scores(state)
        seen[state.site] = {"scores": out, "source": state.visual_source.clone(), "valid": state.visual_valid.clone()}
        return out

    def spy_select(state):
        sel = select(state)
        seen[state.site]["selection"] = sel
        return sel

    head.scores, head.select = spy_scores, spy_select
    return head, seen


@torch.no_grad()
def test_atp_spatial_grid_by_hand():
    """The spatial branch scores 1 exactly on every 4th row AND column (offset 2), wherever the token now stands."""
    model, processor = tiny_testbed("llava", text_layers=8, seed=0)
    head, seen = _spied_atp(model)
    with head(model):
        model(**make_batch(processor, 3))
    first, second = (seen[f"llm:{k}"] for k in head.layers)
    assert first["valid"].all() and first["source"].shape[1] == 144
    for site in (first, second):
        s_sp, source, valid = site["scores"][1], site["source"], site["valid"]
        want = torch.tensor([[int(s) in GRID for s in row] for row in source]) & valid
        assert torch.equal(s_sp.bool(), want)
    assert int(first["scores"][1][0].sum()) == 9


@torch.no_grad()
def test_atp_hard_decisions_by_hand():
    """Hard mode keeps a token when its redundancy score is ABOVE its threshold or it lies on the grid
    (spatial score above the spatial threshold); the count varies per instance."""
    model, processor = tiny_testbed("llava", text_layers=8, seed=0)
    head, seen = _spied_atp(model)
    with head(model) as engine:
        model(**make_batch(processor, 3))
    for k in head.layers:
        site = seen[f"llm:{k}"]
        (s_red, s_sp, th), valid = site["scores"], site["valid"]
        by_red, by_grid = (s_red > th[:, :1]) & valid, (s_sp > th[:, 1:]) & valid
        want = by_red | by_grid
        assert want.any(1).all() and (~want & valid).any(1).all()  # some kept, some dropped: a real decision
        assert (by_red & ~by_grid).any() and (by_grid & ~by_red).any()  # both branches decide something
        got = site["selection"].indices
        for b in range(len(got)):
            assert got[b][got[b] >= 0].tolist() == want[b].nonzero()[:, 0].tolist(), (k, b)
    counts = engine.kept_tokens[f"llm:{head.layers[-1]}"]
    assert len(set(counts.tolist())) > 1, "the kept count should vary per instance"


@torch.no_grad()
def test_atp_soft_keep_probability_by_hand():
    """Soft mode: p = max(sigmoid((s_red - t_red) T), sigmoid((s_sp - t_sp) T)): high where the score is above."""
    model, processor = tiny_testbed("llava", text_layers=8, seed=0)
    head, seen = _spied_atp(model)
    with head(model, mode="soft"):
        model(**make_batch(processor, 3))
    (s_red, s_sp, th), valid = seen[f"llm:{head.layers[0]}"]["scores"], seen[f"llm:{head.layers[0]}"]["valid"]
    T = head.temperature
    want = torch.maximum(torch.sigmoid((s_red - th[:, :1]) * T), torch.sigmoid((s_sp - th[:, 1:]) * T))
    got = seen[f"llm:{head.layers[0]}"]["selection"].keep_prob
    torch.testing.assert_close(got, want.masked_fill(~valid, 0))
    grid = s_sp.bool()
    assert (got[grid] > 0.5).all()  # the grid tokens are kept, whatever their redundancy score


def test_sweep_parameters_are_valid_overrides():
    sweeps = sorted((CONFIGS.parent / "sweeps" / "wandb").glob("*.yaml"))
    assert {p.stem for p in sweeps} == {"atp", "bavit", "dyvte", "lvpruning", "flashsloth", "quecc"}
    for path in sweeps:
        sweep = yaml.safe_load(path.read_text())
        assert sweep["program"] == "train.py" and "${args_no_hyphens}" in sweep["command"]
        # each run selects its recipe through hparams_search=<head> (which sets the module and the budget metric)
        search = next(c for c in sweep["command"] if str(c).startswith("hparams_search="))
        overrides = [search]
        for key, spec in sweep["parameters"].items():
            value = spec["values"][0] if "values" in spec else spec.get("min", spec.get("value"))
            overrides.append(f"{key}={value}")
        cfg = compose_train("/tmp/unused", overrides)  # raises on an unknown key
        for key in sweep["parameters"]:
            node = cfg
            for part in key.split("."):
                node = node[part]
        assert sweep["metric"]["name"] == cfg.optimized_metric
