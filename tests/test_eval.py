"""eval.py's pieces: metrics against hand counts, the grid's records and resumption, the outputs."""

from __future__ import annotations

import json

import torch

from learned_prune.testbed import ShapesVQADataModule
from learned_prune.evaluation import AnswerAccuracy, normalize_answer
from learned_prune.evaluation.grid import run_grid
from learned_prune.evaluation.measure import analytic_flops
from learned_prune.evaluation.report import accuracy_vs_flops_plot, load_records, markdown_table

from conftest import get_tiny


def test_answer_accuracy_by_hand():
    m = AnswerAccuracy(types=["color", "count"])
    m.update(["Red.", "blue", " two </s>", "yes"], ["red", "green", "two", "no"], ["color", "color", "count", "exist"])
    # correct: red (color), two (count); wrong: blue (color), yes (other)
    assert abs(float(m.compute()) - 2 / 4) < 1e-6
    allm = m.compute_all()
    assert abs(float(allm["acc_color"]) - 0.5) < 1e-6 and abs(float(allm["acc_count"]) - 1.0) < 1e-6
    assert normalize_answer("  Yes, it is") == "yes"


def _accuracy_on_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        m = AnswerAccuracy(types=["color", "count"])
        if rank == 0:  # this rank sees colour questions only, the other count questions only
            m.update(["red", "blue"], ["red", "green"], ["color", "color"])
        else:
            m.update(["two"], ["two"], ["count"])
        got = {k: float(v) for k, v in m.compute_all().items()}
        local = {"total": m.total.tolist()}  # the local counts are restored after the sync
        torch.save({"got": got, **local}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_answer_accuracy_is_summed_over_processes_with_the_same_keys_on_every_rank(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_accuracy_on_rank, args=(port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    want = {"acc": 2 / 3, "acc_color": 0.5, "acc_count": 1.0}
    for r in ranks:
        assert r["got"].keys() == want.keys()
        assert all(abs(r["got"][k] - want[k]) < 1e-6 for k in want)
    assert ranks[0]["total"][:2] == [2, 0] and ranks[1]["total"][:2] == [0, 1]


def test_teacher_forced_accuracy_by_hand():
    m = AnswerAccuracy(types=["color"])
    logits = torch.zeros(2, 4, 5)
    labels = torch.full((2, 4), -100)
    labels[:, 2:] = torch.tensor([[3, 1], [2, 1]])
    logits[0, 1, 3] = logits[0, 2, 1] = 1  # sample 0: both answer tokens right
    logits[1, 1, 4] = logits[1, 2, 1] = 1  # sample 1: first token wrong
    m.update_from_logits(logits, labels, ["color", "color"])
    assert float(m.compute()) == 0.5


def test_analytic_flops_follow_kept_counts():
    model, _ = get_tiny("llava")
    full = analytic_flops(model, 10, 144, {})
    pruned = analytic_flops(model, 10, 144, {"vision": 16})
    assert full["vision"] == pruned["vision"] and pruned["llm"] < full["llm"]
    tc = model.config.text_config
    d, m, L = tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers
    n = 26
    assert pruned["llm"] == L * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m)


def _grid(tmp_path, methods, keeps, repeats=1, config=None):
    model, processor = get_tiny("llava")
    dm = ShapesVQADataModule(processor, batch_size=4, test_size=8, val_size=4, train_size=4)
    batch = next(iter(dm._loader(dm.test_set, False, 1)))
    timing = {"input_ids": batch["prompt_input_ids"], "attention_mask": batch["prompt_attention_mask"],
              "pixel_values": batch["pixel_values"]}
    return run_grid(model, processor, dm.test_dataloader(), timing, methods, keeps, "shapes:test", tmp_path,
                    config=config or {"note": "test"}, repeats=repeats, warmup=0)


def test_grid_without_timing_records_accuracy_only(tmp_path):
    records = _grid(tmp_path, ["none", "fastv"], [16], repeats=0)
    assert all(r["prefill_ms"] is None and r["kv_cache_mb"] is None for r in records)
    assert records[1]["prefill_tflops"] < records[0]["prefill_tflops"]  # FLOPs are counted, not timed
    row = markdown_table(records).splitlines()[-1]
    assert row.endswith("| - | - | - | - |")


def test_grid_records_parse_resume_and_report(tmp_path):
    records = _grid(tmp_path, ["none", "fastv", "fastervlm"], [0.11, 32])
    assert [(r["method"], r["keep"]) for r in records] == [
        ("none", "all"), ("fastv", 0.11), ("fastv", 32), ("fastervlm", 0.11), ("fastervlm", 32)]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    required = {"method", "keep", "dataset", "accuracy", "kept_tokens", "prefill_tflops", "prefill_ms",
                "peak_mem_mb", "kv_cache_mb", "config", "generate_ms", "accuracy_by_type", "flops"}
    assert all(required <= set(r) for r in parsed)
    fastv = next(r for r in parsed if r["method"] == "fastv" and r["keep"] == 32)
    assert fastv["kept_tokens"] == {"llm:2": 32.0} and fastv["flops"]["pruner"] > 0
    assert fastv["prefill_tflops"] < parsed[0]["prefill_tflops"] and fastv["kv_cache_mb"] < parsed[0]["kv_cache_mb"]
    # resumption: a second run skips finished records and adds only the new budget
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"method": "truncated')  # an interrupted write
    again = _grid(tmp_path, ["none", "fastv", "fastervlm"], [0.11, 32, 16])
    assert len(load_records(tmp_path / "results.jsonl")) == 7
    assert sum(r["keep"] == 16 for r in again) == 2
    table = markdown_table(again)
    assert table.count("\n") == 2 + 7 and "fastervlm" in table
    png = accuracy_vs_flops_plot(again, tmp_path / "p.png")
    assert png.stat().st_size > 1000


def test_method_specs_parse_and_reject_with_the_choices():
    import pytest

    from learned_prune.evaluation.methods import check_spec, parse_spec

    assert parse_spec("fastv@layer=3,keep=0.5+random") == [("fastv", {"layer": 3, "keep": 0.5}), ("random", {})]
    assert parse_spec("h@threshold=[0.6,0.7],min_layer=2+fastv") == [("h", {"threshold": [0.6, 0.7], "min_layer": 2}),
                                                                     ("fastv", {})]
    for bad, match in [("fastv@layer", "key=value"), ("nope+fastv", "unknown method 'nope'"),
                       ("none+fastv", "cannot be composed"), ("+fastv", "empty name")]:
        with pytest.raises(ValueError, match=match):
            check_spec(bad)
    from learned_prune.evaluation.methods import check_methods

    check_methods(["none", "fastv@layer=3", "random@repack_positions=false+fastv"], [16])
    with pytest.raises(TypeError, match=r"random: .*unexpected keyword argument 'bogus'.*valid arguments"):
        check_methods(["fastv", "random@bogus=1"], [16])  # before anything runs, not after fastv


def test_grid_runs_specs_with_arguments_and_compositions(tmp_path):
    records = _grid(tmp_path, ["fastv@layer=3", "divprune+fastv", "fastv@keep=8"], [16], repeats=0)
    by_method = {r["method"]: r for r in records}
    assert set(by_method["fastv@layer=3"]["kept_tokens"]) == {"llm:3"}
    composed = by_method["divprune+fastv"]["kept_tokens"]  # both parts get the grid's budget
    assert composed["vision"] == 16 and composed["llm:2"] == 16
    assert by_method["fastv@keep=8"]["keep"] == "adaptive"  # its own budget: one row, not one per keep
    assert by_method["fastv@keep=8"]["kept_tokens"]["llm:2"] == 8


def test_the_plot_tells_every_method_apart_and_sets_heads_apart():
    from learned_prune.evaluation.report import flops_unit, method_label, plot_styles

    free = [f"method{i}" for i in range(20)]
    heads = ["/somewhere/checkpoints/atp-tiny", "checkpoints/dyvte-tiny@threshold=0.9+fastv"]
    styles = plot_styles(free + heads)
    looks = {(s["color"], s["linestyle"], s["marker"]) for s in styles.values()}
    assert len(looks) == len(styles)  # no two methods drawn alike
    assert len({(s["linestyle"], s["marker"]) for m, s in styles.items() if m in free}) == len(free)
    assert [styles[h]["learned"] for h in heads] == [True, True] and not any(styles[m]["learned"] for m in free)
    assert method_label(heads[0]) == ("atp-tiny", True)
    assert method_label(heads[1]) == ("dyvte-tiny@threshold=0.9+fastv", True)
    assert flops_unit([3.1e8, 4.8e7]) == (1e6, "MFLOPs") and flops_unit([3.8e12])[1] == "TFLOPs"


def test_a_grid_folder_of_another_setting_is_refused_not_mixed(tmp_path):
    import pytest

    setting = {"backbone": {"name_or_path": "a"}, "data": {"test_size": 8}, "max_new_tokens": 2}
    _grid(tmp_path, ["none"], [16], repeats=0, config=setting)
    assert len(_grid(tmp_path, ["none", "fastv"], [16], repeats=0, config=setting)) == 2  # same setting: resumes
    for key, value in [("backbone", {"name_or_path": "b"}), ("data", {"test_size": 9}), ("max_new_tokens", 5)]:
        with pytest.raises(ValueError, match=f"another setting.*{key}.*hydra.run.dir"):
            _grid(tmp_path, ["none", "fastv"], [16], repeats=0, config={**setting, key: value})
    assert len(load_records(tmp_path / "results.jsonl")) == 2  # nothing was appended
