"""What a forward under the engine returns beside the logits: hidden states, attentions and the loss.

A pruned forward has fewer output rows than input rows (``engine.output_index`` maps them back).
Hidden states and attentions are returned for those rows: ``hidden_states[i]`` (B, L', D) holds, for
every output row, the token's state entering layer i (the last entry: after the final norm, as HF
gives it); ``attentions[i]`` (B, H, L', L') the attention of layer i between output rows (keys
dropped at a later site are left out, so rows of layers before a prune may sum to less than 1). In
a decoding step the keys are the prompt's output rows followed by the generated tokens. On a
keep-all run both equal plain HF. Attentions need eager attention (SDPA and flash attention
compute no weights). The loss follows HF's causal-LM loss (``labels`` or ``shift_labels``,
``num_items_in_batch``): each output row predicts the token after its own input position.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from .tokens import gather_rows

if TYPE_CHECKING:  # pragma: no cover
    from .loop import CacheLayout

EAGER_ONLY = (
    "output_attentions=True under the pruning engine needs eager attention: attn_implementation={impl!r} computes "
    "no attention weights (plain HF returns none either). Switch with model.set_attn_implementation('eager'), or "
    "drop output_attentions."
)


@dataclass
class Recorder:
    """The per-layer outputs one forward was asked for, recorded as the decoder loop runs."""

    hidden: list | None = None  # [(tensor, key layout index)] when hidden states are asked for
    attentions: dict | None = None  # layer -> attention weights when attentions are asked for
    wanted: set[int] | None = None  # hidden-state indices asked for (None: all)
    layers: list[int] = field(default_factory=list)  # layer -> key layout index

    @classmethod
    def asked(cls, kwargs: dict, config: Any, mask_kind: str) -> "Recorder":
        """Pop ``output_hidden_states`` / ``output_attentions`` / ``return_dict`` from ``kwargs`` (defaults from
        ``config``, as HF's language model does); raise for attentions without eager attention."""
        hs = kwargs.pop("output_hidden_states", None)
        at = kwargs.pop("output_attentions", None)
        kwargs.pop("return_dict", None)
        hs = getattr(config, "output_hidden_states", False) if hs is None else hs
        at = getattr(config, "output_attentions", False) if at is None else at
        if at and mask_kind != "additive":
            raise ValueError(EAGER_ONLY.format(impl=config._attn_implementation))
        wanted = None
        if not isinstance(hs, bool) and hs is not None:
            n = config.num_hidden_layers + 1
            wanted = {i % n for i in ([hs] if isinstance(hs, int) else hs) if -n <= i < n}
        return cls(hidden=[] if hs or wanted is not None else None, attentions={} if at else None, wanted=wanted)

    def add_hidden(self, hidden: torch.Tensor, layout: int) -> None:
        if self.hidden is not None:
            self.hidden.append((hidden, layout))

    @contextlib.contextmanager
    def attention_hooks(self, layers: nn.ModuleList) -> Iterator[None]:
        """Record each layer's attention weights (its ``self_attn``'s second output) while the block runs."""
        if self.attentions is None:
            yield
            return
        handles = [layer.self_attn.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.attentions[layer] = output[1]

        return hook

    def result(self, record: "CacheLayout", last: torch.Tensor, prefill: bool) -> tuple[tuple | None, tuple | None]:
        """(hidden_states, attentions) on the output rows; ``last`` (after the final norm) replaces the last state."""
        hidden = None
        if self.hidden is not None:
            states = [(h, g) for h, g in self.hidden[:-1]] + [(last, len(record.layouts) - 1)]
            hidden = tuple(
                None if self.wanted is not None and i not in self.wanted
                else (gather_rows(h, record.layouts[g].rows) if prefill else h)
                for i, (h, g) in enumerate(states)
            )
        attentions = None
        if self.attentions is not None:
            attentions = tuple(
                _attention_rows(self.attentions[i], record.layouts[record.layer_layout[i]], prefill)
                for i in sorted(self.attentions)
            )
        return hidden, attentions


def _attention_rows(weights: torch.Tensor, layout: Any, prefill: bool) -> torch.Tensor:
    """Attention weights (B, H, q, K) of one layer, queries and keys taken to the output rows."""
    B, H, q, K = weights.shape
    keys = torch.cat([layout.rows, torch.arange(layout.n_prompt, K, device=layout.rows.device).expand(B, -1)], 1)
    out = torch.gather(weights, 3, keys[:, None, None, :].expand(B, H, q, keys.shape[1]))
    if prefill:
        out = torch.gather(out, 2, layout.rows[:, None, :, None].expand(B, H, layout.rows.shape[1], keys.shape[1]))
    return out


def causal_lm_loss(
    logits: torch.Tensor,
    vocab_size: int,
    labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None,
    index: torch.Tensor | None,
    filler: torch.Tensor | None,
    num_items_in_batch: Any = None,
) -> torch.Tensor:
    """HF's causal-LM loss on the output rows: row r (input position ``index[:, r]``) predicts ``shift_labels`` at
    that position (``labels`` at the next input position when no ``shift_labels`` are given); rows that only fill
    left padding after a prune (``filler``) count for nothing."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    shift_labels = shift_labels.to(logits.device)
    if index is not None and not (index.shape == shift_labels.shape and bool((index == torch.arange(
            index.shape[1], device=index.device)).all())):
        shift_labels = torch.gather(shift_labels, 1, index.to(logits.device))
    if filler is not None:
        shift_labels = shift_labels.masked_fill(filler.to(logits.device), -100)
    return ForCausalLMLoss(logits, None, vocab_size, num_items_in_batch=num_items_in_batch,
                           shift_labels=shift_labels.contiguous())
