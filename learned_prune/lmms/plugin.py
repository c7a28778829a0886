"""lmms-eval's ``lmms_eval.models`` entry point: the manifest naming :class:`~.model.LearnedPruneLMMS`.

Registered in ``pyproject.toml`` (``[project.entry-points."lmms_eval.models"]``); lmms-eval (0.7) calls
:func:`manifest` when it builds its model registry, and imports the class only when the model is asked for.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "learned_prune"
CLASS_PATH = "learned_prune.lmms.model.LearnedPruneLMMS"


def manifest() -> Any:
    """``ModelManifest(model_id="learned_prune", simple_class_path=...)`` (needs lmms-eval)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
