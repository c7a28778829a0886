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


def _num(value: float | None, digits: int, missing: str = "-") -> str:
    return missing if value is None else f"{value:.{digits}f}"


def markdown_table(records: list[dict[str, Any]]) -> str:
    """One row per (method, keep, dataset), sorted by dataset, keep and accuracy. Timing skipped shows "-";
    peak memory that cannot be measured (CPU) shows "n/a"."""
    qtypes = sorted({k[4:] for r in records for k in r.get("accuracy_by_type", {}) if k.startswith("acc_")})
    extra = sorted({k for r in records for k in r.get("metrics", {})})  # POPE: precision, recall, f1, yes_ratio
    head = ["method", "keep", "dataset", "accuracy", *qtypes, *extra, "kept visual tokens", "prefill TFLOPs",
            "prefill ms", "generate ms", "peak MB", "KV MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ordered = sorted(records, key=lambda r: (r["dataset"], str(r["keep"]), -r["accuracy"]))
    for r in ordered:
        by_type = r.get("accuracy_by_type", {})
        peak_missing = "-" if r.get("prefill_ms") is None else "n/a"  # timing skipped / not measurable (CPU)
        cells = [r["method"], str(r["keep"]), r["dataset"], f"{100 * r['accuracy']:.1f}",
                 *[f"{100 * by_type.get('acc_' + q, float('nan')):.1f}" for q in qtypes],
                 *[f"{100 * r.get('metrics', {}).get(k, float('nan')):.1f}" for k in extra],
                 _fmt_kept(r["kept_tokens"]), f"{r['prefill_tflops']:.4f}", _num(r.get("prefill_ms"), 1),
                 _num(r.get("generate_ms"), 1), _num(r.get("peak_mem_mb"), 1, peak_missing),
                 _num(r.get("kv_cache_mb"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def method_label(spec: str) -> tuple[str, bool]:
    """A plot label for a method spec and whether it is a learned head: head folders are named by their
    folder name (``/work/x/checkpoints/atp-tiny@threshold=0.9`` -> ``atp-tiny@threshold=0.9``)."""
    parts, learned = [], False
    for piece in str(spec).split("+"):
        base, at, args = piece.partition("@")
        if "/" in base or Path(base).is_dir():
            base, learned = Path(base).name, True
        parts.append(base + at + args)
    return "+".join(parts), learned


def flops_unit(values: list[float]) -> tuple[float, str]:
    """The scale and name of the FLOPs unit that fits ``values`` (a tiny model's MFLOPs, a 7B's TFLOPs)."""
    top = max(values, default=0.0)
    for scale, name in ((1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs")):
        if top >= scale:
            return scale, name
    return 1.0, "FLOPs"


def plot_styles(methods: list[str]) -> dict[str, dict[str, Any]]:
    """A distinct matplotlib style per method spec: colour *and* marker/line style differ between
    training-free methods (tab20 colours; 4 line styles x 7 markers); learned heads are drawn thicker
    with large star-like markers. Each style carries its ``label`` and whether it is ``learned``."""
    import itertools

    from matplotlib import colormaps

    colours = itertools.cycle(colormaps["tab20"].colors)
    free = itertools.cycle(itertools.product(["-", "--", ":", "-."], ["o", "s", "^", "v", "D", "P", "X"]))
    head_markers = itertools.cycle(["*", "h", "p", "8"])
    out = {}
    for i, m in enumerate(sorted(methods, key=lambda m: method_label(m)[0])):
        label, learned = method_label(m)
        if learned:
            style = dict(linestyle="-", marker=next(head_markers), markersize=12, linewidth=2.5)
        else:  # every other method hollow, so that methods with equal results still show both markers
            line, marker = next(free)
            style = dict(linestyle=line, marker=marker, markersize=7, linewidth=1.3, fillstyle="full" if i % 2 else "none")
        out[m] = dict(style, color=next(colours), label=label, learned=learned)
    return out


def accuracy_vs_flops_plot(records: list[dict[str, Any]], path: Path) -> Path:
    """One curve per method (accuracy against prefill FLOPs, in the unit that fits the model), styled by
    :func:`plot_styles`, learned heads in a legend of their own; the unpruned model as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = flops_unit([1e12 * r["prefill_tflops"] for r in records])
    fig, ax = plt.subplots(figsize=(12, 6.5))
    handles: dict[bool, list] = {False: [], True: []}
    for m, style in plot_styles([m for m in {r["method"] for r in records} if m != "none"]).items():
        learned = style.pop("learned")
        pts = sorted((1e12 * r["prefill_tflops"] / scale, 100 * r["accuracy"]) for r in records if r["method"] == m)
        (h,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], **style)
        handles[learned].append(h)
    for r in records:
        if r["method"] == "none":
            handles[False].insert(0, ax.axhline(100 * r["accuracy"], color="black", linestyle="--", linewidth=1,
                                                label=f"unpruned ({100 * r['accuracy']:.1f}%)"))
            break
    ax.set_xlabel(f"prefill {unit} per sample (LLM + vision + projector + the pruner's own)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    legends = [ax.legend(handles=handles[False], title="training-free", fontsize=8, loc="upper left",
                         bbox_to_anchor=(1.01, 1.0))]  # outside the axes: 18+ curves leave no empty corner
    if handles[True]:
        ax.add_artist(legends[0])
        legends.append(ax.legend(handles=handles[True], title="learned heads", fontsize=8, loc="lower left",
                                 bbox_to_anchor=(1.01, 0.0)))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight", bbox_extra_artists=legends)  # keeps the legends beside the axes
    plt.close(fig)
    return path
