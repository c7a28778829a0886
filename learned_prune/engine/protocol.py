"""The pruner protocol: the only contract the engine knows, with no-op defaults.

The engine calls these methods on every pruner it is given, and nothing else:

- ``sites(adapter)``: where the pruner acts (``"vision"`` or ``"llm:K"``);
- ``prepare(adapter)``: check the pruner fits the backbone, when the engine is built;
- ``select(state)``: the :class:`~.selection.Selection` at one site;
- ``repacks(site)``: whether kept tokens get contiguous RoPE positions at that site;
- ``observe_layers(adapter)`` / ``observe(layer, trace, state)``: watch decoder layers run;
- ``attach(adapter)`` / ``release(adapter)``: install extra parts for one ``with`` block (LoRA).

Every pruner derives from :class:`~learned_prune.pruners.base.PrunerBase`, which adds the
``with pruner(model):`` entry point to this class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .families import FamilyAdapter
    from .selection import LayerTrace, Selection
    from .state import PruneState


class PrunerProtocol:
    """Base of every pruner: what the engine calls, with no-op defaults.

    Subclasses set ``site`` (``"vision"`` or ``"llm:K"``) or override :meth:`sites`, and write
    :meth:`select`. ``repack_positions`` (None = the site's default: re-pack at ``vision``, keep
    original RoPE ids inside the LLM) says whether kept tokens get contiguous positions.
    """

    site: str = "vision"
    repack_positions: bool | None = None
    needs: tuple[str, ...] = ()  # signals beyond the LLM's (families.NEEDS); a family without one refuses the pruner

    def sites(self, adapter: "FamilyAdapter") -> list[str]:
        """The sites this pruner acts at."""
        return [self.site]

    def prepare(self, adapter: "FamilyAdapter") -> None:
        """Check the pruner fits the backbone (called when the engine is built). Raise with what to change."""

    def select(self, state: "PruneState") -> "Selection":  # pragma: no cover - abstract
        """The pruner's decision at one site."""
        raise NotImplementedError

    def repacks(self, site: str) -> bool:
        """Whether the tokens kept at ``site`` get contiguous positions: ``repack_positions``, else the
        site's default (re-pack at ``vision``, keep the original RoPE ids inside the LLM; on a multimodal-RoPE
        family the engine keeps them at every site unless ``repack_positions`` is set)."""
        return (site == "vision") if self.repack_positions is None else bool(self.repack_positions)

    def observe_layers(self, adapter: "FamilyAdapter") -> list[int]:
        """Decoder layers (0-based) after which :meth:`observe` is called; none by default."""
        return []

    def observe(self, layer: int, trace: "LayerTrace", state: "PruneState") -> None:
        """Called after decoder layer ``layer`` ran, with what it did (``trace``) and the sequence it ran on."""

    def attach(self, adapter: "FamilyAdapter") -> None:
        """Install extra parts on the model (e.g. a head's LoRA adapters) when the engine is entered."""

    def release(self, adapter: "FamilyAdapter") -> None:
        """Remove what :meth:`attach` installed; called on exit, also after an exception."""
