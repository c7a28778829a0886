"""lmms-eval integration: ``lmms-eval --model learned_prune --model_args pretrained=...,pruner=divprune,keep=64``.

:mod:`.adapter` holds the model (:class:`~.adapter.PrunedVLM`, no lmms-eval import); :mod:`.model` adds
lmms-eval's base class and is imported by lmms-eval only; :mod:`.plugin` is the manifest lmms-eval's
``lmms_eval.models`` entry point loads. Why the ``lmms`` extra is not installable beside the project's
own pins, and how to run it anyway: ``docs/lmms_eval.md``.
"""

from .adapter import PrunedVLM

__all__ = ["PrunedVLM"]
