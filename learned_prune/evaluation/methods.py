"""Method specs of ``eval.py``: which pruner one grid row runs, with its arguments and compositions.

A spec is a registry name or a head folder (``fastv``, ``checkpoints/atp-tiny``), optionally with
constructor arguments after ``@`` (``checkpoints/dyvte-tiny@threshold=0.7``, ``fastv@layer=3,keep=32``;
values are read as YAML, so lists work: ``checkpoints/dyvte-tiny@threshold=[0.6,0.7,0.9,0.9,0.9,0.9,0.8]``),
and several specs joined by ``+`` are composed, applied in order (``checkpoints/dyvte-tiny+fastv``,
the pairing of the DyVTE paper). The grid's budget goes to every part that takes one; a spec whose
parts all choose their own kept count is evaluated once, at its mean. Arguments given in the spec
override those of ``configs/method/<name>.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..pruners import PRUNERS, Compose, load_pruner
from ..pruners.base import validate_keep
from ..pruners.heads import is_adaptive
from ..pruners.registry import looks_like_path

BUDGET_HELP = "a budget is a token count (64) or a ratio of the visual tokens in (0, 1] (0.11), e.g. keep=[16,32]"


def _split_arguments(args: str) -> list[str]:
    """Split ``k=v,k2=[a,b]`` at the commas outside brackets (YAML lists and mappings keep theirs)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(args):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            items.append(args[start:i])
            start = i + 1
    return items + [args[start:]]


def parse_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """``"a@k=v,k2=v2+b"`` -> ``[("a", {"k": v, "k2": v2}), ("b", {})]``."""
    parts = []
    for part in str(spec).split("+"):
        name, _, args = part.partition("@")
        name, kwargs = name.strip(), {}
        if not name:
            raise ValueError(f"method {spec!r}: empty name; write name, name@key=value or name+name")
        for item in filter(None, (a.strip() for a in _split_arguments(args))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"method {spec!r}: arguments are written name@key=value,key=value; got {item!r}")
            kwargs[key.strip()] = yaml.safe_load(value)
        parts.append((name, kwargs))
    return parts


def check_spec(spec: str) -> None:
    """Raise with the valid choices if a part of ``spec`` is neither a registered pruner nor a head folder."""
    for name, _ in parse_spec(spec):
        if name not in PRUNERS and not Path(name).is_dir() and looks_like_path(name):
            raise ValueError(f"method {spec!r}: no head folder at {name} (from {Path.cwd()}); give the path of an "
                             "exported head (e.g. checkpoints/atp-tiny) or a registry name")
        if name not in PRUNERS and not Path(name).is_dir():
            raise ValueError(f"unknown method {name!r} in {spec!r}: use registry names {sorted(PRUNERS)} or "
                             "head folders (e.g. checkpoints/atp-tiny), optionally name@key=value and a+b")
    if "+" in str(spec) and any(name == "none" for name, _ in parse_spec(spec)):
        raise ValueError(f"method {spec!r}: `none` cannot be composed")


def spec_is_adaptive(spec: str) -> bool:
    """True when every part sets its own kept count (the grid runs it once, not per budget)."""
    return all(is_adaptive(name) or "keep" in kwargs for name, kwargs in parse_spec(spec))


def build_pruner(spec: str, keep: Any = "adaptive", options: dict[str, dict] | None = None) -> Any:
    """The pruner of one grid row: ``keep`` (a count, a ratio, ``"adaptive"`` or ``"all"``) is given
    to every part that takes a budget and was not given one in the spec."""
    pruners = []
    for name, kwargs in parse_spec(spec):
        kw = {**(options or {}).get(name, {}), **kwargs}
        if keep not in ("adaptive", "all") and name != "none" and not is_adaptive(name):
            kw.setdefault("keep", keep)
        pruners.append(load_pruner(name, **kw))
    return pruners[0] if len(pruners) == 1 else Compose(pruners)


def parse_methods(value: Any) -> list[str] | None:
    """``methods=`` of eval.py as a list of specs: None (unset: the default grid), one spec (``methods=fastv``)
    or a list. An empty list is refused: it would otherwise read as "unset" and run the whole default grid."""
    if value is None:
        return None
    specs = [str(value)] if isinstance(value, str) else [str(m) for m in value]
    if not specs:
        raise ValueError("methods=[] names no method: list some (methods=[none,fastv]) or leave methods unset "
                         "(methods=null) for every registered pruner and head folder")
    return specs


def parse_keeps(value: Any) -> list[int | float]:
    """``keep=`` of eval.py as a list of budgets: a list, or one number (``keep=16`` is ``keep=[16]``).
    Each must be a count >= 1 or a ratio in (0, 1]; anything else fails naming the value."""
    if value is None:
        raise ValueError(f"keep=null: {BUDGET_HELP}")
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    for k in items:
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise ValueError(f"keep={_show(items)}: {k!r} is not a budget; {BUDGET_HELP}")
        try:
            validate_keep(k)
        except ValueError as e:
            raise ValueError(f"keep={_show(items)}: {e}") from None
    return items


def _show(items: list[Any]) -> str:
    return "[" + ",".join(str(k) for k in items) + "]"


def check_grid(specs: Sequence[str], keeps: Sequence[Any]) -> None:
    """Refuse a grid that would silently skip or repeat runs: a method or budget listed twice (duplicate
    records), or no budget while some method needs one (it would be dropped)."""
    for what, values in (("methods", [str(s) for s in specs]), ("keep", [str(k) for k in keeps])):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise ValueError(f"{what} lists {', '.join(twice)} more than once; each would run and be recorded "
                             f"twice: list each once")
    budgeted = [s for s in specs if s != "none" and not spec_is_adaptive(s)]
    if not keeps and budgeted:
        raise ValueError(f"keep=[] gives no budget, so {', '.join(budgeted[:4])}"
                         f"{' ...' if len(budgeted) > 4 else ''} would not run; {BUDGET_HELP}")


def check_methods(specs: list[str], keeps: list[Any], options: dict[str, dict] | None = None,
                  model: Any = None) -> None:
    """Build every spec's pruner once, at the first budget, so that a wrong argument fails before the grid
    runs (and not after the methods before it), with the constructor's message and valid arguments.
    With ``model``, each pruner is also checked against it (sites such as ``llm:K`` within its layers, a
    head's backbone sizes and fingerprint) without being installed."""
    for spec in specs:
        check_spec(spec)
        pruner = build_pruner(spec, keeps[0] if keeps and not spec_is_adaptive(spec) else "adaptive", options)
        if model is not None:
            try:
                pruner(model)  # the engine's constructor prepares the pruners and validates their sites
            except (ValueError, TypeError) as e:
                raise type(e)(f"method {spec!r}: {e}") from None
