"""The attention masks the engine hands each attention implementation (SDPA, eager, flash)."""

from __future__ import annotations

import torch


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
