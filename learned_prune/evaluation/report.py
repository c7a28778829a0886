"""Results files: ``results.jsonl`` (resumable), ``results.md`` (a table) and the accuracy-vs-FLOPs plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def record_key(record: dict[str, Any]) -> tuple:
    return (str(record["method"]), str(record["keep"]), str(record["dataset"]))


def load_records(path: Path) -> list[dict[str, Any]]:
    """Records already written (a truncated last line from an interrupted run is ignored)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (after terminating a line an interrupted write left unfinished)."""
    if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with path.open("a") as f:
            f.write("\n")
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _fmt_kept(kept: dict[str, float]) -> str:
    return ", ".join(f"{s}: {v:.0f}" for s, v in kept.items()) or "all"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(records: list[dict[str, Any]]) -> str:
    """One row per (method, keep, dataset), sorted by dataset, keep and accuracy."""
    qtypes = sorted({k[4:] for r in records for k in r.get("accuracy_by_type", {}) if k.startswith("acc_")})
    extra = sorted({k for r in records for k in r.get("metrics", {})})  # POPE: precision, recall, f1, yes_ratio
    head = ["method", "keep", "dataset", "accuracy", *qtypes, *extra, "kept visual tokens", "prefill TFLOPs",
            "prefill ms", "generate ms", "peak MB", "KV MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ordered = sorted(records, key=lambda r: (r["dataset"], str(r["keep"]), -r["accuracy"]))
    for r in ordered:
        by_type = r.get("accuracy_by_type", {})
        cells = [r["method"], str(r["keep"]), r["dataset"], f"{100 * r['accuracy']:.1f}",
                 *[f"{100 * by_type.get('acc_' + q, float('nan')):.1f}" for q in qtypes],
                 *[f"{100 * r.get('metrics', {}).get(k, float('nan')):.1f}" for k in extra],
                 _fmt_kept(r["kept_tokens"]), f"{r['prefill_tflops']:.4f}", _num(r.get("prefill_ms"), 1),
                 _num(r.get("generate_ms"), 1), _num(r.get("peak_mem_mb"), 1), _num(r.get("kv_cache_mb"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def accuracy_vs_flops_plot(records: list[dict[str, Any]], path: Path) -> Path:
    """One curve per method (accuracy against prefill TFLOPs); the unpruned model as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    methods = sorted({r["method"] for r in records if r["method"] != "none"})
    for m in methods:
        pts = sorted((r["prefill_tflops"], 100 * r["accuracy"]) for r in records if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    for r in records:
        if r["method"] == "none":
            ax.axhline(100 * r["accuracy"], color="black", linestyle="--", linewidth=1,
                       label=f"unpruned ({100 * r['accuracy']:.1f}%)")
            break
    ax.set_xlabel("prefill TFLOPs per sample (LLM + vision + projector)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
