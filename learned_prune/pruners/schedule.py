"""Transitional re-export: stage layouts moved to :mod:`.stages` (this name clashed with
``modules/schedule.py``). Delete once ``lvpruning.py`` imports ``from .stages import scale_layers``."""

from .stages import scale_layers, stage_counts

__all__ = ["scale_layers", "stage_counts"]
