"""The prefill benchmark's FLOPs formula against a hand count, and a run on a tiny shape."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from learned_prune.evaluation.flops import llm_layer_flops, prefill_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_llm_layer_flops_hand_count():
    # n=10 tokens, d=4, m=8: 4*10*16 + 2*100*4 + 3*10*4*8 = 640 + 800 + 960
    assert llm_layer_flops(10, 4, 8) == 2400
    assert llm_layer_flops(10, 4, 8, gated=False) == 640 + 800 + 640


def test_prefill_flops_hand_count():
    # 2 decoder layers (d=4, m=8), 3 text + 6 visual tokens, prune to 2 visual tokens before layer 1.
    # layer 0: n=9 -> 4*9*16 + 2*81*4 + 3*9*32 = 576 + 648 + 864 = 2088
    # layer 1: n=5 -> 4*5*16 + 2*25*4 + 3*5*32 = 320 + 200 + 480 = 1000
    # vision: 1 layer, N=7 (6 patches + CLS), dv=2, mv=4: 4*7*4 + 2*49*2 + 2*7*2*4 = 112 + 196 + 112 = 420
    # projector on 6 tokens: 2*6*(2*4 + 4*4) = 288
    f = prefill_flops(3, 6, {1: 2}, num_layers=2, hidden=4, intermediate=8, vision_layers=1, vision_hidden=2,
                      vision_intermediate=4, vision_tokens=7)
    assert (f.llm, f.vision, f.projector) == (3088, 420, 288)
    assert f.total == 3088 + 420 + 288


def test_prefill_benchmark_runs_on_a_tiny_shape(tmp_path):
    import prefill

    out = tmp_path / "r.jsonl"
    prefill.main([
        "--methods", "none,fastv,fastervlm", "--keep", "4", "--repeats", "1", "--warmup", "0", "--json", str(out),
        "--hidden", "64", "--intermediate", "128", "--heads", "4", "--layers", "3", "--vision-layers", "2",
        "--vision-hidden", "32", "--vision-intermediate", "64", "--vision-heads", "2", "--image-size", "56",
        "--patch-size", "14", "--vocab", "100", "--device", "cpu",
    ])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in records] == ["none", "fastv", "fastervlm"]
    for r in records:
        assert {"method", "keep", "prefill_ms", "speedup", "flops_ideal_speedup", "selection_share"} <= set(r)
        assert r["prefill_ms_min"] == min(r["prefill_ms_all"]) <= r["prefill_ms"]
        want = records[0]["prefill_ms_min"] / r["prefill_ms_min"] / r["flops_ideal_speedup"]
        assert r["measured_over_ideal_min"] == pytest.approx(want)
    assert records[0]["speedup"] == 1.0 and records[0]["flops_ideal_speedup"] == 1.0
    assert all(r["flops_ideal_speedup"] > 1 for r in records[1:])
    assert records[1]["kept_tokens"] == {"llm:2": 4} and records[2]["kept_tokens"] == {"vision": 4}
    with pytest.raises(SystemExit):
        prefill.main(["--methods", "nosuch"])
