"""The token sequence as the engine carries it through the decoder, and the masks built from it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sequence:
    """Per-token state of a batch inside the LLM.

    ``valid`` is False on padding; ``visual_rank`` is a token's index among its sample's
    original visual tokens (-1 for text); ``keep_prob`` (soft mode) is the cumulative
    keep-probability (1 for text). Order along L is always the original token order, so
    causality by index equals causality by position.
    """

    hidden: torch.Tensor  # (B, L, D)
    pos: torch.Tensor  # (B, L) RoPE position ids
    valid: torch.Tensor  # (B, L) bool
    visual_rank: torch.Tensor  # (B, L) long
    n_visual_original: torch.Tensor  # (B,)
    keep_prob: torch.Tensor | None = None  # (B, L) soft mode only
    prev_input: torch.Tensor | None = None  # input of the layer just run (signals of layer K-1)
    prev_keys: torch.Tensor | None = None  # k_proj output of the layer just run, (B, L, H_kv*hd)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token (B, L) state of pruners

    @property
    def is_visual(self) -> torch.Tensor:
        return self.visual_rank >= 0

    def visual_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Nv) positions of visual tokens in sequence order and their validity mask."""
        vis = self.is_visual & self.valid
        counts = vis.sum(1)
        nv = int(counts.max()) if counts.numel() else 0
        order = torch.argsort((~vis).to(torch.int8), dim=1, stable=True)[:, :nv]
        valid = torch.arange(nv, device=vis.device)[None] < counts[:, None]
        return torch.where(valid, order, torch.zeros_like(order)), valid

    @property
    def prompt_valid(self) -> torch.Tensor:
        """(B, L) bool: valid tokens of the prompt. In a teacher-forced training pass the answer
        tokens (``extras["answer"]``, from the labels) are left out, so that what a pruner reads
        matches what it reads at inference, where the answer is not there yet."""
        answer = self.extras.get("answer")
        return self.valid if answer is None else self.valid & ~answer

    def instruction_mask(self) -> torch.Tensor:
        """(B, L) bool: valid prompt text tokens after each sample's last visual token."""
        L = self.valid.shape[1]
        idx = torch.arange(L, device=self.valid.device).expand_as(self.valid)
        last_visual = torch.where(self.is_visual, idx, torch.full_like(idx, -1)).amax(1, keepdim=True)
        return self.prompt_valid & ~self.is_visual & (idx > last_visual)

    def gather(self, index: torch.Tensor, slot_valid: torch.Tensor) -> "Sequence":
        """Keep rows ``index`` (B, L') of every per-token tensor; ``slot_valid`` marks real slots."""

        def rows(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            if x.dim() == 2:
                return torch.gather(x, 1, index)
            return torch.gather(x, 1, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))

        return Sequence(
            hidden=rows(self.hidden),
            pos=rows(self.pos),
            valid=rows(self.valid) & slot_valid,
            visual_rank=rows(self.visual_rank),
            n_visual_original=self.n_visual_original,
            keep_prob=rows(self.keep_prob),
            prev_input=rows(self.prev_input),
            prev_keys=rows(self.prev_keys),
            extras={k: rows(v) for k, v in self.extras.items()},
        )


def compact_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a (B, L) bool keep-mask into a left-padded gather index.

    Returns ``index`` (B, L') with L' = max kept per sample, kept positions in order and
    right-aligned (so padding stays on the left), and ``slot_valid`` (B, L').
    """
    counts = keep.sum(1)
    new_len = int(counts.max())
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)  # dropped first, then kept in order
    index = order[:, keep.shape[1] - new_len :]
    slot_valid = torch.arange(new_len, device=keep.device)[None] >= (new_len - counts)[:, None]
    return index, slot_valid


# How each attention implementation takes its mask, read off transformers' own mask factories
# (masking_utils.ALL_MASK_ATTENTION_FUNCTIONS): the engine hands every implementation the kind of
# mask HF itself would build for it, so a hub kernel registered with a known factory works too.
# Flex attention is not among them: it wants a BlockMask compiled per shape, and the dense float
# mask its integration also accepts (through a score_mod) crashed its compiled CPU kernel.
MASK_KINDS = {"sdpa_mask": "sdpa", "eager_mask": "additive", "flash_attention_mask": "padding"}
SUPPORTED = "'sdpa' (the default), 'eager' or a flash attention ('flash_attention_2', ...)"


def mask_kind(attn_implementation: str | None, mode: str = "hard") -> str:
    """The mask the engine must build for ``attn_implementation`` (the text model's config value).

    ``"sdpa"``: None where plain causal attention is exact (SDPA's ``is_causal`` path), else a bool
    (B, 1, q, K) mask. ``"additive"`` (eager): a float (B, 1, q, K) mask, since eager attention
    applies no causal mask of its own and adds whatever mask it gets. ``"padding"`` (flash
    attention): None or a (B, K) key-validity mask; the kernel is causal by itself. Raises
    ValueError, naming the implementation and what to use instead, for any other implementation
    (flex attention, paged attention, custom kernels) and for flash attention in soft mode (it
    cannot add the keep-probability log-mask).
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    impl = attn_implementation or "eager"  # HF falls back to eager attention for None
    try:
        factory = ALL_MASK_ATTENTION_FUNCTIONS[impl]
    except KeyError:
        factory = None
    kind = MASK_KINDS.get(getattr(factory, "__name__", ""))
    if kind is None:
        raise ValueError(
            f"the pruning engine does not support attn_implementation={impl!r}: it builds its own attention "
            f"masks and knows how to hand them only to {SUPPORTED}. Load or switch the model with "
            "model.set_attn_implementation('sdpa') (or 'eager')."
        )
    if kind == "padding" and mode == "soft":
        raise ValueError(
            f"soft mode adds log keep-probabilities to the attention scores, which {impl!r} cannot take "
            "(flash attention accepts only a padding mask). Train with model.set_attn_implementation('sdpa') "
            "or 'eager'; hard-mode inference works with flash attention."
        )
    return kind


def build_mask(
    key_valid: torch.Tensor,
    key_logmask: torch.Tensor | None,
    q_len: int,
    dtype: torch.dtype,
    kind: str = "sdpa",
) -> torch.Tensor | None:
    """Attention mask for ``q_len`` new queries over ``key_valid.shape[1]`` keys (the last q_len are the queries).

    ``kind`` is :func:`mask_kind` of the model's attention implementation. ``"sdpa"``: None when
    plain causal attention is exact (SDPA then takes its causal fast path), a bool (B, 1, q, K)
    mask for padding, or a float additive mask when soft log-masks are present. ``"additive"``
    (eager): the float additive mask, causal part included (None only for one query over
    all-valid keys). ``"padding"`` (flash): None when every key is valid, else the (B, K) bool
    key-validity mask, as HF's ``flash_attention_mask``. Every query may attend to itself, so
    padded rows never produce NaNs.
    """
    B, K = key_valid.shape
    past = K - q_len
    if kind == "padding":
        if key_logmask is not None:
            raise ValueError("flash attention cannot take the soft-mode log-mask")
        return None if bool(key_valid.all()) else key_valid
    if key_logmask is None and bool(key_valid.all()) and (q_len == 1 or (kind == "sdpa" and past == 0)):
        return None  # one query sees every key; SDPA's is_causal covers an unpadded prefill
    device = key_valid.device
    q_idx = torch.arange(q_len, device=device)[:, None] + past
    k_idx = torch.arange(K, device=device)[None, :]
    causal = k_idx <= q_idx  # (q, K)
    diag = k_idx == q_idx
    allowed = (causal[None] & key_valid[:, None, :]) | diag[None]  # (B, q, K)
    if key_logmask is None and kind == "sdpa":
        return allowed[:, None]
    if key_logmask is None:
        bias = torch.zeros((), dtype=dtype, device=device).expand(B, q_len, K)
    else:
        bias = key_logmask[:, None, :].to(dtype).expand(B, q_len, K)
        bias = torch.where(diag[None], torch.zeros((), dtype=dtype, device=device), bias)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.where(allowed, bias, neg)[:, None]
