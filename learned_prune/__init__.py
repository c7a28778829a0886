"""learned_prune: learned and training-free visual-token pruning for LLaVA-style VLMs.

>>> from learned_prune import load_backbone, load_pruner
>>> model, processor = load_backbone("checkpoints/tiny-llava-shapes")  # doctest: +SKIP
>>> with load_pruner("fastv", layer=2, keep=64)(model):                 # doctest: +SKIP
...     out = model.generate(**inputs)
"""

from .backbones import load_backbone, tiny_llava
from .engine import Engine, PruneState, Selection
from .pruners import PRUNERS, Compose, PrunerBase, load_pruner, register_pruner

from .version import __version__

__all__ = [
    "PRUNERS", "Compose", "Engine", "PruneState", "PrunerBase", "Selection", "load_backbone", "load_pruner",
    "register_pruner", "tiny_llava", "__version__",
]
