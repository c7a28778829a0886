"""The lmms-eval model class (imports lmms-eval: loaded by lmms-eval through :mod:`.plugin`)."""

from __future__ import annotations

from typing import Any

from lmms_eval.api.model import lmms

from .adapter import PrunedVLM


class LearnedPruneLMMS(PrunedVLM, lmms):
    """:class:`~.adapter.PrunedVLM` as an lmms-eval simple model (``--model learned_prune``)."""

    is_simple = True

    def __init__(self, pretrained: str, **kwargs: Any) -> None:
        lmms.__init__(self)
        PrunedVLM.__init__(self, pretrained, **kwargs)
