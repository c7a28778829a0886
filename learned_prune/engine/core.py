"""The pruning engine: runs an HF LLaVA with pruning sites, as a context manager.

Entering installs, on this model instance only, (1) a pre-hook on the inner LLaVA model that
records ``input_ids``, (2) a wrapper of ``get_image_features`` that keeps the vision tower's
hidden states and checks the image-token count, (3) the engine's own decoder loop as the
language model's ``forward`` and (4) ``k_proj`` hooks on the layers just before LLM sites.
Leaving removes all of it, also on an exception. Nothing is patched on any class.

The loop is ``LlamaModel.forward`` with sites: at ``vision`` (before decoder layer 0, on the
projected image tokens) and ``llm:K`` (before decoder layer K) each pruner returns a
:class:`~learned_prune.engine.state.Selection`. Hard mode gathers the kept tokens (they keep
their RoPE position ids unless the pruner re-packs them; later layers get matching RoPE
tables, masks and shorter KV caches); soft mode multiplies keep-probabilities into an
additive log-mask on the keys of later layers (DynamicViT), so gradients reach a predictor.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from .adapter import LlavaAdapter
from .sites import _Group, _Run, parse_site
from .sequence import Sequence, build_mask, compact_index, mask_kind
from .state import LayerTrace, PruneState, Selection

MODES = ("hard", "soft")

__all__ = ["Engine", "MODES", "parse_site"]


class Engine:
    """Install ``pruners`` on ``model`` for the duration of a ``with`` block.

    ``mode="hard"`` removes tokens (inference); ``mode="soft"`` keeps them and masks keys with
    log keep-probabilities (training). After a prefill, ``kept_tokens`` maps each site to the
    per-sample count of visual tokens it let through, ``output_index`` (B, L') maps rows of the
    output back to input positions and ``output_valid`` (B, L') marks real (non-padding) rows.
    """

    def __init__(self, model: nn.Module, pruners: list[Any], mode: str = "hard", soft_eps: float = 1e-6) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.adapter = LlavaAdapter(model)
        self.model = model
        self.pruners = list(pruners)
        self.mode = mode
        self.soft_eps = soft_eps
        n = self.adapter.num_layers
        self.sites: dict[int, list[tuple[Any, str]]] = {}
        for p in self.pruners:
            if hasattr(p, "prepare"):
                p.prepare(self.adapter)
            for s in p.sites(self.adapter):
                self.sites.setdefault(parse_site(s, n), []).append((p, s))
        for lst in self.sites.values():  # the vision site acts before any llm:0 pruner
            lst.sort(key=lambda ps: ps[1] != "vision")
        # pruners that watch layers run (e.g. TransPrune's token transitions): layer -> pruners
        self.observers: dict[int, list[Any]] = {}
        for p in self.pruners:
            for i in getattr(p, "observe_layers", lambda adapter: [])(self.adapter):
                if not 0 <= i < n:
                    raise ValueError(f"{type(p).__name__} observes layer {i}, but the LLM has {n} layers")
                self.observers.setdefault(i, []).append(p)
        self._handles: list[Any] = []
        self._installed = False
        self._input_ids: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._vision: dict[str, Any] | None = None
        self._captured_keys: dict[int, torch.Tensor] = {}
        self._captured_branch: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._run: _Run | None = None
        self.kept_tokens: dict[str, torch.Tensor] = {}
        self.output_index: torch.Tensor | None = None
        self.output_valid: torch.Tensor | None = None

    # ---- install / remove ----------------------------------------------------------------
    def __enter__(self) -> "Engine":
        a = self.adapter
        mask_kind(a.lm.config._attn_implementation, self.mode)  # refuse an attention the engine cannot mask
        if "forward" in a.lm.__dict__:
            raise RuntimeError(
                "a pruner is already installed on this model; compose several with load_pruner([...]) instead of nesting"
            )
        try:
            self._handles.append(a.model.register_forward_pre_hook(self._pre_model, with_kwargs=True))
            self._handles.append(a.model.register_forward_hook(self._post_model, with_kwargs=True))
            self._handles.append(a.inner.register_forward_pre_hook(self._pre_inner, with_kwargs=True))
            original = a.inner.get_image_features
            a.inner.get_image_features = self._wrap_image_features(original)
            a.lm.forward = self._lm_forward
            for k in self.sites:
                if k >= 1:
                    kp = a.lm.layers[k - 1].self_attn.k_proj
                    self._handles.append(kp.register_forward_hook(self._key_hook(k - 1)))
            for i in self.observers:
                for part in ("self_attn", "mlp"):
                    branch = getattr(a.lm.layers[i], part)
                    self._handles.append(branch.register_forward_hook(self._branch_hook(i, part), with_kwargs=True))
            for p in self.pruners:  # e.g. a head's LoRA adapters, removed again on exit
                if hasattr(p, "attach"):
                    p.attach(self.adapter)
            self._installed = True
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        for p in self.pruners:
            if hasattr(p, "release"):
                p.release(self.adapter)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        a = self.adapter
        a.inner.__dict__.pop("get_image_features", None)
        a.lm.__dict__.pop("forward", None)
        self._run = None
        self._vision = None
        self._input_ids = None
        self._captured_keys.clear()
        self._captured_branch.clear()
        self._installed = False

    # ---- hooks ---------------------------------------------------------------------------
    def _pre_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # Labels are applied by the engine: in hard mode the logits are shorter than the input.
        self._labels = kwargs.pop("labels", None)
        return args, kwargs

    def _post_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        labels, self._labels = self._labels, None
        if labels is None or not hasattr(output, "logits"):
            return output
        if self.output_index is not None and self.output_index.shape[1] != labels.shape[1]:
            labels = torch.gather(labels, 1, self.output_index.to(labels.device))
        logits = output.logits.float()
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
        output.loss = nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        return output

    def _pre_inner(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._input_ids = ids
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None:
            self._vision = None  # get_image_features runs inside this forward (or there is no image)
        elif self._vision is not None and ids is not None:
            self._check_image_tokens(ids, self._vision["n_features"])  # generate() encoded images beforehand

    def _check_image_tokens(self, ids: torch.Tensor, n_feats: int) -> None:
        n_tokens = int((ids == self.adapter.image_token_id).sum())
        if n_tokens != n_feats:
            raise ValueError(
                f"image-token count mismatch: the prompts hold {n_tokens} <image> placeholder tokens but the "
                f"images give {n_feats} visual features. Build inputs with the backbone's processor "
                "(processor(images=..., text=...)), which expands each <image> to the right number of "
                "tokens, and pass one image per <image> in the text."
            )

    def _wrap_image_features(self, original: Any) -> Any:
        wants_vision = 0 in self.sites and any(s == "vision" for _, s in self.sites[0])

        signature = inspect.signature(original)

        @functools.wraps(original)  # generate() inspects the signature to pre-encode images
        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            if wants_vision:  # keep every vision hidden state, not only the projector's input
                kwargs["output_hidden_states"] = True
            out = original(*args, **kwargs)
            feats = out.pooler_output
            n_feats = sum(int(f.shape[0]) if f.dim() == 2 else int(f.shape[0] * f.shape[1]) for f in feats)
            if self._input_ids is not None:
                self._check_image_tokens(self._input_ids, n_feats)
            self._vision = {
                "n_features": n_feats,
                "hidden_states": out.hidden_states if wants_vision else None,
                "n_tiles": out.hidden_states[0].shape[0] if wants_vision else 0,
                "image_sizes": signature.bind_partial(*args, **kwargs).arguments.get("image_sizes"),
            }
            return out

        return get_image_features

    def _branch_hook(self, layer: int, part: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]  # the normed input the branch reads
            self._captured_branch[(layer, part)] = (x, output[0] if isinstance(output, tuple) else output)

        return hook

    def _key_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self._captured_keys[layer] = output

        return hook

    # ---- the decoder loop ----------------------------------------------------------------
    def _lm_forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        lm = self.adapter.lm
        kwargs.pop("output_attentions", None)
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("return_dict", None)
        if inputs_embeds is None:
            inputs_embeds = lm.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = lm.config.use_cache and not self.adapter.model.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=lm.config)
        B, q = inputs_embeds.shape[:2]
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("the pruning engine takes a 2-D attention_mask (batch, seq); got a "
                             f"{attention_mask.dim()}-D one")
        new_valid = (
            attention_mask[:, -q:].bool() if attention_mask is not None
            else torch.ones(B, q, dtype=torch.bool, device=inputs_embeds.device)
        )
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past == 0:
            hidden = self._prefill(inputs_embeds, new_valid, position_ids, past_key_values, use_cache, kwargs)
        else:
            hidden = self._decode(inputs_embeds, new_valid, position_ids, past_key_values, use_cache, kwargs)
        self._input_ids = None  # consumed: a later generate() pre-encoding must not see stale ids
        hidden = lm.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values if use_cache else None)

    def _prefill(self, embeds, valid, position_ids, cache, use_cache, kwargs) -> torch.Tensor:
        lm = self.adapter.lm
        B, q = embeds.shape[:2]
        device = embeds.device
        if position_ids is None:
            pos = torch.arange(q, device=device)[None].expand(B, q)
        else:
            pos = position_ids.to(device).expand(B, q)
        ids = self._input_ids
        if ids is not None and ids.shape == (B, q):
            visual = ids.to(device) == self.adapter.image_token_id
        else:
            visual = torch.zeros(B, q, dtype=torch.bool, device=device)
        rank = torch.where(visual, visual.long().cumsum(1) - 1, torch.full_like(pos, -1))
        seq = Sequence(hidden=embeds, pos=pos, valid=valid, visual_rank=rank, n_visual_original=visual.sum(1))
        if self._labels is not None and self._labels.shape == (B, q):  # teacher-forced: mark the answer
            seq.extras["answer"] = self._labels.to(device) != -100
        self.kept_tokens = {}
        self.output_index = torch.arange(q, device=device)[None].expand(B, q)
        zeros = torch.zeros(B, dtype=torch.long, device=device)
        group = _Group(valid=seq.valid, logmask=None, offset=zeros, next_pos=zeros)
        run = _Run(cache=weakref.ref(cache) if cache is not None else None, groups=[group])
        rope = lm.rotary_emb(embeds, seq.pos)
        kind = mask_kind(lm.config._attn_implementation, self.mode)  # the mask this attention takes
        mask = build_mask(seq.valid, None, q, embeds.dtype, kind)
        self._captured_keys.clear()
        self._captured_branch.clear()
        for i, layer in enumerate(lm.layers):
            if i in self.sites and bool(seq.is_visual.any()):
                seq, offset = self._apply_sites(i, seq, group.offset)
                logmask = self._logmask(seq)
                group = _Group(valid=seq.valid, logmask=logmask, offset=offset, next_pos=zeros)
                run.groups.append(group)
                rope = lm.rotary_emb(seq.hidden, seq.pos)
                mask = build_mask(seq.valid, logmask, seq.hidden.shape[1], seq.hidden.dtype, kind)
            run.layer_group.append(len(run.groups) - 1)
            seq.prev_input = seq.hidden
            seq.hidden = layer(
                seq.hidden,
                attention_mask=mask,
                position_ids=seq.pos,
                past_key_values=cache,
                use_cache=use_cache,
                position_embeddings=rope,
                **kwargs,
            )
            seq.prev_keys = self._captured_keys.pop(i, None)
            if i in self.observers:  # each branch's normed input and output, and the residual stream
                attn_in, attn_out = self._captured_branch.pop((i, "self_attn"))
                mlp_in, mlp_out = self._captured_branch.pop((i, "mlp"))
                trace = LayerTrace(h_in=seq.prev_input, attn_in=attn_in, attn_out=attn_out,
                                   mlp_in=mlp_in, mlp_out=mlp_out, h_out=seq.hidden)
                for p in self.observers[i]:
                    p.observe(i, trace, seq)
        last_pos = torch.where(seq.valid, seq.pos, torch.full_like(seq.pos, -1)).amax(1) + 1
        for g in run.groups:
            g.next_pos = last_pos + (group.offset - g.offset)
        self._run = run if use_cache else None
        self._captured_keys.clear()
        self.output_valid = seq.valid
        return seq.hidden

    def _decode(self, embeds, valid, position_ids, cache, use_cache, kwargs) -> torch.Tensor:
        lm = self.adapter.lm
        run = self._run
        if run is None or run.cache is None or run.cache() is not cache:
            raise RuntimeError(
                "this KV cache was not filled by the installed pruner: run the prefill (or generate()) inside the "
                "same `with pruner(model):` block"
            )
        B, q = embeds.shape[:2]
        ar = torch.arange(q, device=embeds.device)[None]
        kind = mask_kind(lm.config._attn_implementation, self.mode)
        per_group = []
        for g in run.groups:
            pos = (position_ids.to(embeds.device).expand(B, q) - g.offset[:, None]) if position_ids is not None \
                else g.next_pos[:, None] + ar
            g.next_pos = pos[:, -1] + 1
            g.valid = torch.cat([g.valid, valid], 1)
            if g.logmask is not None:
                g.logmask = torch.cat([g.logmask, torch.zeros_like(valid, dtype=g.logmask.dtype)], 1)
            per_group.append((pos, lm.rotary_emb(embeds, pos), build_mask(g.valid, g.logmask, q, embeds.dtype, kind)))
        hidden = embeds
        for i, layer in enumerate(lm.layers):
            pos, rope, mask = per_group[run.layer_group[i]]
            hidden = layer(hidden, attention_mask=mask, position_ids=pos, past_key_values=cache,
                           use_cache=use_cache, position_embeddings=rope, **kwargs)
        return hidden

    # ---- applying a site -----------------------------------------------------------------
    def _logmask(self, seq: Sequence) -> torch.Tensor | None:
        if seq.keep_prob is None:
            return None
        return torch.where(seq.is_visual, torch.log(seq.keep_prob + self.soft_eps), torch.zeros_like(seq.keep_prob))

    def _apply_sites(self, layer: int, seq: Sequence, offset: torch.Tensor) -> tuple[Sequence, torch.Tensor]:
        for pruner, site in self.sites[layer]:
            vpos, vvalid = seq.visual_positions()
            if vpos.shape[1] == 0:
                break
            state = PruneState(site=site, layer=layer, mode=self.mode, seq=seq, engine=self,
                               visual_pos=vpos, visual_valid=vvalid)
            sel = pruner.select(state)
            if not isinstance(sel, Selection):
                raise TypeError(f"{type(pruner).__name__}.select must return a Selection, got {type(sel).__name__}")
            repack = getattr(pruner, "repack_positions", None)
            repack = (site == "vision") if repack is None else repack
            if self.mode == "soft":
                seq = self._soft(seq, vpos, vvalid, sel)
                kept = torch.gather(seq.keep_prob, 1, vpos).masked_fill(~vvalid, 0)
                self.kept_tokens[site] = kept.sum(1)
            else:
                seq, removed = self._hard(seq, vpos, vvalid, sel, repack)
                offset = offset + removed
                self.kept_tokens[site] = seq.is_visual.logical_and(seq.valid).sum(1)
        return seq, offset

    def _soft(self, seq: Sequence, vpos, vvalid, sel: Selection) -> Sequence:
        B, L = seq.valid.shape
        if sel.values is not None:
            raise ValueError("merging pruners (Selection.values) have no soft mode; train with a selecting pruner")
        if sel.keep_prob is not None:
            p = sel.keep_prob.to(seq.hidden.dtype)
        else:  # a hard choice used in soft mode: exact 0/1 probabilities
            p = torch.zeros(vpos.shape, dtype=seq.hidden.dtype, device=vpos.device)
            idx = sel.indices
            p.scatter_(1, idx.clamp_min(0), (idx >= 0).to(p.dtype))
        full = torch.ones(B, L, dtype=p.dtype, device=p.device)
        full = full.scatter(1, vpos, torch.where(vvalid, p, torch.ones_like(p)))
        seq.keep_prob = full if seq.keep_prob is None else seq.keep_prob * full
        return seq

    def _hard(self, seq: Sequence, vpos, vvalid, sel: Selection, repack: bool) -> tuple[Sequence, torch.Tensor]:
        if sel.indices is None:
            raise ValueError("the pruner returned keep-probabilities in hard mode; hard mode needs indices")
        idx = sel.indices.to(vpos.device)
        ok = idx >= 0
        if bool((idx >= vvalid.sum(1, keepdim=True)).any()):
            raise ValueError("a Selection index points past the sample's visual tokens")
        slot = torch.gather(vpos, 1, idx.clamp_min(0))  # sequence positions of kept tokens
        B, L = seq.valid.shape
        keep_visual = torch.zeros(B, L + 1, dtype=torch.bool, device=vpos.device)
        keep_visual.scatter_(1, torch.where(ok, slot, L), True)  # padded entries land in a spare column
        keep = ~seq.is_visual | keep_visual[:, :L]
        if sel.values is not None:
            values = sel.values
            if sel.values_space == "vision":
                values = self.adapter.projector(values.to(self.adapter.projector.linear_1.weight.dtype))
            values = values.to(seq.hidden.dtype)
            hidden = seq.hidden.clone()
            cur = torch.gather(hidden, 1, slot.unsqueeze(-1).expand(*slot.shape, hidden.shape[-1]))
            values = torch.where(ok.unsqueeze(-1), values, cur)
            hidden.scatter_(1, slot.unsqueeze(-1).expand(*slot.shape, hidden.shape[-1]), values)
            seq.hidden = hidden
        dropped = seq.is_visual & ~keep & seq.valid
        removed = dropped.sum(1)
        if repack:
            seq.pos = seq.pos - dropped.long().cumsum(1)
        index, slot_valid = compact_index(keep)
        self.output_index = torch.gather(self.output_index, 1, index)
        new = seq.gather(index, slot_valid)
        return new, (removed if repack else torch.zeros_like(removed))
