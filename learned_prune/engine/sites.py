"""Site names, and which pruner acts (or observes) at which decoder layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .families import FamilyAdapter
    from .protocol import PrunerProtocol


def parse_site(site: str, num_layers: int) -> int:
    """``"vision"`` -> 0 (before the first decoder layer); ``"llm:K"`` -> K, validated."""
    if site == "vision":
        return 0
    if site.startswith("llm:"):
        try:
            k = int(site[4:])
        except ValueError:
            k = -1
        if 0 <= k < num_layers:
            return k
        raise ValueError(
            f"site {site!r}: the LLM has {num_layers} decoder layers, use llm:K with 0 <= K < {num_layers}"
        )
    raise ValueError(f"unknown site {site!r}: use 'vision' or 'llm:K'")


def site_table(
    pruners: list["PrunerProtocol"], adapter: "FamilyAdapter"
) -> dict[int, list[tuple["PrunerProtocol", str]]]:
    """Decoder layer -> the (pruner, site) pairs acting before it, in the pruners' order; the vision site
    acts before any ``llm:0`` pruner."""
    sites: dict[int, list[tuple["PrunerProtocol", str]]] = {}
    for p in pruners:
        for s in p.sites(adapter):
            sites.setdefault(parse_site(s, adapter.num_layers), []).append((p, s))
    for lst in sites.values():
        lst.sort(key=lambda ps: ps[1] != "vision")
    return sites


def observer_table(pruners: list["PrunerProtocol"], adapter: "FamilyAdapter") -> dict[int, list["PrunerProtocol"]]:
    """Decoder layer -> the pruners that watch it run (``observe_layers``)."""
    n = adapter.num_layers
    observers: dict[int, list["PrunerProtocol"]] = {}
    for p in pruners:
        for i in p.observe_layers(adapter):
            if not 0 <= i < n:
                raise ValueError(f"{type(p).__name__} observes layer {i}, but the LLM has {n} layers")
            observers.setdefault(i, []).append(p)
    return observers
