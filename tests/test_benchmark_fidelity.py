"""benchmarks/fidelity.py: the testbed's ranking of methods against published LLaVA-1.5-7B figures."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("fidelity", ROOT / "benchmarks" / "fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_ranks_lists_missing_and_flags_methods_below_random():
    fidelity = _script()
    ref = {"a": 95.0, "b": 90.0, "random": 85.0, "c": 70.0, "absent": 99.0}
    same_order = fidelity.compare({"a": 99.0, "b": 80.0, "random": 70.0, "c": 10.0}, ref)
    assert same_order["spearman"] == 1.0 and same_order["missing"] == ["absent"]
    assert same_order["above_random_in_reference_below_on_testbed"] == []
    reversed_ = fidelity.compare({"a": 1.0, "b": 2.0, "random": 3.0, "c": 4.0}, ref)
    assert math.isclose(reversed_["spearman"], -1.0)
    assert reversed_["above_random_in_reference_below_on_testbed"] == ["a", "b"]


def test_fidelity_runs_every_reference_method_the_registry_has(tmp_path):
    fidelity = _script()
    out = fidelity.main(["--samples", "8", "--json", str(tmp_path / "f.json")])
    reference = json.loads(fidelity.REFERENCE.read_text())["relative_accuracy"]
    from learned_prune import PRUNERS

    assert [r["method"] for r in out["rows"]] == sorted(m for m in reference if m in PRUNERS)
    assert out["missing"] == sorted(m for m in reference if m not in PRUNERS)
    assert -1.0 <= out["spearman"] <= 1.0
    assert json.loads((tmp_path / "f.json").read_text())["keep"] == 0.111
    assert set(out["also"]) == {"pool", "downsample"}  # run and printed beside, not counted
    assert not {"pool", "downsample"} & {r["method"] for r in out["rows"]}
