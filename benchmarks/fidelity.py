"""Does the testbed rank methods as a real VLM does? Testbed vs LLaVA-1.5-7B at 64 of 576 tokens.

Runs every training-free method of the reference file that the registry has at the same fraction of
the visual tokens (64/576 = 11.1%) on the embedded testbed, and prints, per method, the testbed's
accuracy as % of unpruned next to the published LLaVA-1.5-7B figure
(``benchmarks/reference/llava15_7b_64tokens.json``, figures with their sources), then the Spearman
rank correlation of the two columns. Methods of the file that the registry lacks are listed, not
counted. Methods run with the options of ``configs/method/<name>.yaml``, as ``eval.py`` runs them.

    python benchmarks/fidelity.py                                    # the embedded testbed, 1,000 test samples
    python benchmarks/fidelity.py --samples 300 --json fidelity.json
    python benchmarks/fidelity.py --results outputs/eval/results.jsonl --keep 0.11   # reuse an eval.py grid
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learned_prune import PRUNERS, load_backbone  # noqa: E402
from learned_prune.evaluate import method_options  # noqa: E402
from learned_prune.evaluation.grid import accuracy_and_tokens, load_records  # noqa: E402
from learned_prune.testbed import ShapesVQADataModule  # noqa: E402

REFERENCE = ROOT / "benchmarks" / "reference" / "llava15_7b_64tokens.json"  # a copy of the steering repo's file


def compare(testbed: dict[str, float], reference: dict[str, float]) -> dict:
    """Per-method rows (testbed %, reference %), the methods left out, and the Spearman correlation."""
    both = sorted(m for m in reference if m in testbed)
    rows = [{"method": m, "testbed": testbed[m], "reference": reference[m]} for m in both]
    rho = float(spearmanr([r["testbed"] for r in rows], [r["reference"] for r in rows]).statistic) \
        if len(rows) >= 3 else float("nan")
    random_ref, random_bed = reference.get("random"), testbed.get("random")
    below = [r["method"] for r in rows if random_ref is not None and random_bed is not None and r["method"] != "random"
             and r["reference"] > random_ref and r["testbed"] < random_bed]
    return {"rows": rows, "missing": sorted(m for m in reference if m not in testbed), "spearman": rho,
            "above_random_in_reference_below_on_testbed": below}


def testbed_relative(args: argparse.Namespace, methods: list[str], keep: float) -> dict[str, float]:
    """Testbed accuracy of each method as % of the unpruned model's, run here or read from a grid."""
    if args.results:
        acc = {r["method"]: r["accuracy"] for r in load_records(Path(args.results))
               if r["keep"] in (keep, "all") and r["method"] in methods + ["none"]}
    else:
        model, processor = load_backbone(args.backbone)
        dm = ShapesVQADataModule(processor, eval_batch_size=100, test_size=args.samples, eval_split=args.split,
                                 scenes=args.scenes)
        loader = list(dm.test_dataloader())
        options = method_options(ROOT / "configs" / "method")
        acc = {}
        for m in ["none", *methods]:
            torch.manual_seed(0)
            acc[m] = accuracy_and_tokens(model, processor, loader, m, "all" if m == "none" else keep,
                                         options=options, metric_factory=dm.metric)["accuracy"]
            print(f"  {m:12s} {100 * acc[m]:.1f}%", flush=True)
    if "none" not in acc:
        raise SystemExit("the results hold no `none` row: the unpruned accuracy is needed")
    return {m: 100 * a / acc["none"] for m, a in acc.items() if m != "none"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default=str(ROOT / "checkpoints" / "tiny-llava-shapes"))
    p.add_argument("--reference", default=str(REFERENCE))
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--split", default="test")
    p.add_argument("--scenes", default="sparse", help="ShapesVQA scenes: sparse (the shipped backbone's) or redundant")
    p.add_argument("--results", default=None, help="an eval.py results.jsonl with keep=0.111 rows (and `none`)")
    p.add_argument("--keep", type=float, default=None,
                   help="the budget ratio (default: the reference's, 64/576 = 0.111; 0.11 also keeps 16 of 144)")
    p.add_argument("--json", default=None, help="write the comparison to this file")
    p.add_argument("--also", default="pool,downsample",
                   help="comma-separated registry methods without a reference figure to run and print beside (not counted)")
    a = p.parse_args(argv)
    ref = json.loads(Path(a.reference).read_text())
    keep = a.keep if a.keep is not None else round(ref["budget_tokens"] / ref["of"], 3)
    reference = ref["relative_accuracy"]
    methods = [m for m in reference if m in PRUNERS]
    also = [m for m in (a.also.split(",") if a.also else []) if m and m not in methods]
    unknown = [m for m in also if m not in PRUNERS]
    if unknown:
        raise SystemExit(f"--also names methods the registry lacks: {unknown}; choose from {sorted(PRUNERS)}")
    testbed = testbed_relative(a, methods + also, keep)
    out = compare(testbed, reference)
    out.update(keep=keep, reference_model=ref["model"], also={m: testbed[m] for m in also if m in testbed})
    print(f"\nkeep={keep} of the visual tokens; % of unpruned accuracy")
    print(f"| method | testbed | {ref['model']} (published) |\n|---|---|---|")
    for r in sorted(out["rows"], key=lambda r: -r["reference"]):
        print(f"| {r['method']} | {r['testbed']:.1f} | {r['reference']:.1f} |")
    for m, v in out["also"].items():
        print(f"| {m} | {v:.1f} | (no published figure: not counted) |")
    print(f"\nSpearman rank correlation over {len(out['rows'])} methods: {out['spearman']:.2f}")
    if out["missing"]:
        print(f"not in the registry (not counted): {', '.join(out['missing'])}")
    if out["above_random_in_reference_below_on_testbed"]:
        print("above random in the reference but below random on the testbed: "
              + ", ".join(out["above_random_in_reference_below_on_testbed"]))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
