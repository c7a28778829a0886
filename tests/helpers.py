"""Independent references built from plain HF modules, for the engine's invariants."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def hf_hidden(model, batch: dict, layer: int) -> torch.Tensor:
    """Hidden states entering decoder layer ``layer`` of the plain HF model (0 = merged embeddings)."""
    out = model(**batch, output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer]


@torch.no_grad()
def hf_tail_logits(model, hidden: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, start: int) -> torch.Tensor:
    """Run the plain HF decoder layers ``start..`` (+ norm + lm_head) on given hidden states/positions."""
    lm = model.model.language_model
    layers, n = lm.layers, lm.config.num_hidden_layers
    try:
        lm.layers = nn.ModuleList(list(layers)[start:])
        lm.config.num_hidden_layers = n - start
        out = lm(inputs_embeds=hidden, position_ids=pos, attention_mask=valid.long(), use_cache=False)
    finally:
        lm.layers = layers
        lm.config.num_hidden_layers = n
    return model.lm_head(out.last_hidden_state)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return torch.gather(x, 1, idx)
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def site_layer(pruner, model) -> int:
    from learned_prune.engine import parse_site
    from learned_prune.engine.adapter import LlavaAdapter

    sites = pruner.sites(LlavaAdapter(model))
    assert len(sites) == 1
    return parse_site(sites[0], len(model.model.language_model.layers)), sites[0]


@torch.no_grad()
def pooled_embeddings(model, batch: dict, rows: int, cols: int, h: int, w: int) -> torch.Tensor:
    """Projector(avg-pooled base-view patch features), (B, h*w, D): the pool baseline by hand."""
    pv = batch["pixel_values"]
    base = pv[:, 0] if pv.dim() == 5 else pv
    hs = model.model.vision_tower(base, output_hidden_states=True).hidden_states[-2][:, 1:]
    B, _, D = hs.shape
    grid = hs.reshape(B, rows, cols, D).permute(0, 3, 1, 2)
    pooled = nn.functional.adaptive_avg_pool2d(grid, (h, w)).flatten(2).transpose(1, 2)
    return model.model.multi_modal_projector(pooled)


@torch.no_grad()
def hf_segment(model, hidden: torch.Tensor, pos: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Run plain HF decoder layers ``start..end-1`` (no final norm) on hidden states of one sample."""
    if end == start:
        return hidden
    lm = model.model.language_model
    layers, n = lm.layers, lm.config.num_hidden_layers
    try:  # one extra layer so the wanted output is an un-normed entry of hidden_states
        lm.layers = nn.ModuleList(list(layers)[start : end + 1])
        lm.config.num_hidden_layers = end + 1 - start
        mask = torch.ones(pos.shape, dtype=torch.long, device=pos.device)  # else HF reads gapped ids as packing
        out = lm(inputs_embeds=hidden, position_ids=pos, attention_mask=mask, use_cache=False, output_hidden_states=True)
    finally:
        lm.layers = layers
        lm.config.num_hidden_layers = n
    return out.hidden_states[end - start]


def record_selections(pruner) -> list:
    """Wrap ``select`` on this pruner instance (and on composed ones) to record each Selection."""
    records = []
    targets = getattr(pruner, "pruners", [pruner])
    for p in targets:
        original = p.select

        def select(state, original=original):
            sel = original(state)
            records.append((state.layer, state.site, sel))
            return sel

        p.select = select
    return records


@torch.no_grad()
def reference_logits(model, batch: dict, records: list, repack_vision: bool = True, repack_llm=False) -> torch.Tensor:
    """Logits of one unpadded sample computed by plain HF layers, gathering rows as recorded.

    Visual tokens are the image placeholders; each recorded Selection keeps some of the visual rows
    still present (and may overwrite them with merged values); text rows are always kept.
    """
    ids = batch["input_ids"]
    assert ids.shape[0] == 1
    is_image = (ids[0] == model.config.image_token_id)
    hidden = hf_hidden(model, batch, 0)
    L = ids.shape[1]
    rows = torch.arange(L)
    pos = torch.arange(L)[None]
    cur = 0
    for layer, site, sel in records:
        hidden = hf_segment(model, hidden, pos, cur, layer)
        cur = layer
        vis = is_image[rows].nonzero()[:, 0]
        idx = sel.indices[0]
        ok = idx >= 0
        kept = vis[idx[ok]]
        if sel.values is not None:
            values = sel.values[0][ok]
            if sel.values_space == "vision":
                values = model.model.multi_modal_projector(values)
            hidden = hidden.clone()
            hidden[0, kept] = values.to(hidden.dtype)
        keep = ~is_image[rows]
        keep[kept] = True
        repack = repack_vision if site == "vision" else (repack_llm(site) if callable(repack_llm) else repack_llm)
        if repack:
            pos = pos - (~keep).long().cumsum(0)[None]
        rows, pos, hidden = rows[keep], pos[:, keep], hidden[:, keep]
    return hf_tail_logits(model, hidden, pos, torch.ones_like(pos), cur)


def compose_train(out, overrides: list[str], export_name: str = "export"):
    """The composed train.py config for ``overrides``, writing everything under ``out``."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    root = Path(__file__).resolve().parents[1]
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(root / "configs")):
        cfg = compose("train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.root_dir = str(root)
        cfg.paths.log_dir = str(out)
        cfg.module.export_dir = str(Path(out) / export_name)
    GlobalHydra.instance().clear()
    return cfg


def fit_frozen(out, overrides: list[str], export_name: str) -> dict:
    """Build and fit a learned-head run; assert the frozen backbone is bit-identical and the head trained.

    Returns the built parts (``model``, ``module``, ``trainer``, ``datamodule``, ...).
    """
    from learned_prune.run import build

    parts = build(compose_train(out, overrides, export_name))
    model, module = parts["model"], parts["module"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head_before = {k: v.clone() for k, v in module.head.state_dict().items()}
    parts["trainer"].fit(module, datamodule=parts["datamodule"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the frozen backbone changed"
    assert any(not torch.equal(head_before[k], v) for k, v in module.head.state_dict().items()), "head did not train"
    return parts


def load_exported(path, module, cls):
    """The head exported to ``path``: of type ``cls`` and with the weights ``module`` trained."""
    from learned_prune import load_pruner

    head = load_pruner(str(path))
    assert isinstance(head, cls)
    module.head.eval()
    torch.testing.assert_close(head.state_dict(), module.head.state_dict())
    return head


def fresh_tiny_backbone(batch_size: int = 3) -> tuple:
    """A newly built backbone of the shape the tiny training configs use (not the one trained on), and a batch."""
    from learned_prune.testbed import testbed_llava

    from conftest import make_batch

    model, processor = testbed_llava("llava", vision_hidden=32, text_hidden=32, text_layers=8, vision_layers=2,
                                  intermediate_size=64, seed=0)
    return model, make_batch(processor, batch_size)
