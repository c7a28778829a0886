"""CDPruner: conditional-DPP visual-token pruning (Zhang et al., NeurIPS 2025, arXiv 2506.10967).

"Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs";
code Theia-4869/CDPruner (``llava/model/llava_arch.py: encode_images``,
``llava/model/multimodal_encoder/clip_encoder.py``). The kernel over visual tokens is
``L = diag(r) S diag(r)``: ``S`` the cosine similarity of the projected tokens, ``r`` each token's
relevance to the instruction; the greedy MAP inference of Chen et al. (NeurIPS 2018, fast greedy
DPP) picks the tokens to keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..engine.state import PruneState, Selection
from .base import Pruner, resolve_keep
from .indices import pad_rows, sorted_picks

EXHAUSTED = 1e-5  # residual gain, relative to the sample's largest kernel diagonal, at which the rank is spent


def conditional_kernel(feats: torch.Tensor, relevance: torch.Tensor, theta: float | None = None) -> torch.Tensor:
    """``diag(q) S diag(q)`` with S the cosine similarity of ``feats`` (..., N, D); q = r, or exp(alpha r) with theta."""
    x = F.normalize(feats.float(), dim=-1)
    q = relevance.float()
    if theta is not None:
        q = torch.exp(theta / (2 * (1 - theta)) * q)
    return q.unsqueeze(-1) * (x @ x.transpose(-1, -2)) * q.unsqueeze(-2)


def dpp_greedy_map(kernel: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Fast greedy MAP of a DPP (Chen et al. 2018), batched: indices (B, max k), sorted, -1 padded.

    Each step adds the token with the largest residual ``d_i^2`` (the gain in log det L_S), then
    updates every residual by the new Cholesky row. Once the largest residual is <= ``EXHAUSTED``
    times the sample's largest diagonal entry (the kernel's rank is spent: float32 round-off is all
    that is left), the remaining picks follow ``fill`` (highest first).
    """
    kernel = kernel.float()
    B, N, _ = kernel.shape
    kmax = int(k.max())
    ar = torch.arange(B, device=kernel.device)
    cis = kernel.new_zeros(kmax, B, N)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone().masked_fill(~valid, float("-inf"))
    tol = EXHAUSTED * di2s.amax(-1).clamp_min(1e-30)
    taken = ~valid.clone()
    done = torch.zeros(B, dtype=torch.bool, device=kernel.device)
    fill = fill.float()
    chosen = torch.empty(B, kmax, dtype=torch.long, device=kernel.device)
    for i in range(kmax):
        j = di2s.argmax(-1)
        done = done | (di2s[ar, j] <= tol)
        j = torch.where(done, fill.masked_fill(taken, float("-inf")).argmax(-1), j)
        chosen[:, i] = j
        d = torch.maximum(di2s[ar, j], tol).sqrt()
        eis = (kernel[ar, j] - torch.einsum("tb,tbn->bn", cis[:i, ar, j], cis[:i])) / d[:, None]
        cis[i] = torch.where(done[:, None], torch.zeros_like(eis), eis)
        taken[ar, j] = True
        di2s = (di2s - cis[i].square()).masked_fill(taken, float("-inf"))
    return sorted_picks(chosen, k)


@dataclass
class CDPruner(Pruner):
    """Keep the ``keep`` visual tokens of the greedy MAP of a DPP conditioned on the instruction, before the LLM.

    Similarity ``S``: cosine between the projector outputs of the visual tokens. Relevance ``r``:
    the mean cosine between each token's image embedding and the instruction's text embeddings,
    min-max normalised over the sample's tokens (``(r - min + 1e-6) / (max - min)``). Kernel
    ``diag(r) S diag(r)`` (``theta`` set: ``r -> exp(theta / (2(1 - theta)) r)``, the option the
    official code leaves commented out); greedy MAP with ``keep`` steps; kept tokens stay in
    sequence order and positions are re-packed.

    Relevance sources (``relevance``):

    - ``"clip"`` (the official path): image embeddings = CLIP ``visual_projection(post_layernorm(
      patch features))`` of the backbone's feature layer, text embeddings = CLIP's text tower on
      the raw instruction strings ``texts`` (one per sample; the official evaluation passes the
      question without its "Answer the question using a single word or phrase." line), tokenised whole and cut into
      ``max_position_embeddings`` segments; relevance negated (``negate``), as the official code
      does for CLIP. Needs ``clip_model`` (an HF ``CLIPModel`` or its path; the LLaVA tower's
      ``post_layernorm`` is used, as officially) and ``clip_tokenizer`` (default: from the path).
    - ``"llm"``: image embeddings = the projected visual tokens, text embeddings = the LLM input
      embeddings of the instruction tokens (the text after the image in the prompt); not negated.
    - ``"auto"`` (default): ``"clip"`` when ``clip_model`` is given, else ``"llm"``.

    Departures:

    - HF LLaVA checkpoints carry no CLIP text tower nor ``visual_projection``, so without
      ``clip_model`` relevance comes from the LLM's own embeddings (``"llm"``). This follows the
      authors' recipe for backbones without CLIP (their reply on Qwen2.5-VL, Theia-4869/CDPruner
      issue #7: both similarity and relevance from the post-projector features); the text side
      (LLM input embeddings of the instruction, template tokens after the image included) and the
      sign (the authors say the negation is a CLIP phenomenon, issue #14) are our choices;
      ``negate=True`` restores the official sign.
    - LLaVA-NeXT: the official code runs one DPP per tile (base view and every crop) with
      ``keep`` tokens each, before unpadding, and always keeps the row-end newline tokens outside
      the budget. Here ``keep`` counts all visual tokens of a sample (newlines included) like
      every other method, so by default one DPP runs over the packed tokens (newline tokens are
      candidates, with their embedding as features and, under ``"clip"``, the sample's lowest
      relevance). ``per_tile=True`` gives the official rule (``keep`` per tile; kept count =
      tiles' survivors of unpadding + newlines).
    - The official loop has no stop: once the kernel's rank is spent (``keep`` above the rank:
      a hidden size smaller than the token count, or exact duplicates) its residuals are
      round-off and its square roots and divisions give NaN/inf. Here, once the largest residual
      gain is at most ``EXHAUSTED`` times the largest diagonal entry, the remaining picks follow
      relevance; ``max - min`` of the relevance is clamped away from 0. Relevance is normalised
      per sample (the official evaluation runs one sample per call; its min-max spans every
      image of a call).
    - A sample with no instruction tokens gets uniform relevance (a plain DPP on ``S``).
    """

    site: str = "vision"
    needs = ("vision_grid",)  # refused on a family whose tower lacks it (docs/families.md)
    relevance: str = "auto"
    theta: float | None = None
    negate: bool | None = None
    per_tile: bool = False
    clip_model: Any = None
    clip_tokenizer: Any = None
    texts: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.relevance not in ("auto", "clip", "llm"):
            raise ValueError(f"relevance must be 'auto', 'clip' or 'llm', got {self.relevance!r}")
        if self.theta is not None and not 0.0 <= self.theta < 1.0:
            raise ValueError(f"theta must lie in [0, 1) (alpha = theta / (2(1 - theta))), got {self.theta}")

    @property
    def source(self) -> str:
        return ("clip" if self.clip_model is not None else "llm") if self.relevance == "auto" else self.relevance

    def prepare(self, adapter: Any) -> None:
        if self.per_tile and not isinstance(adapter.feature_layer, int):
            raise ValueError("per_tile=True needs a backbone that feeds its projector one vision layer")
        if self.source != "clip":
            return
        if self.clip_model is None:
            raise ValueError("relevance='clip' needs clip_model= (an HF CLIPModel or its path, e.g. the tower's CLIP)")
        if isinstance(self.clip_model, str):
            from transformers import AutoTokenizer, CLIPModel

            path = self.clip_model
            self.clip_model = CLIPModel.from_pretrained(path).eval()
            self.clip_tokenizer = self.clip_tokenizer or AutoTokenizer.from_pretrained(path)
        if isinstance(self.clip_tokenizer, str):
            from transformers import AutoTokenizer

            self.clip_tokenizer = AutoTokenizer.from_pretrained(self.clip_tokenizer)
        if self.clip_tokenizer is None:
            raise ValueError("relevance='clip' needs clip_tokenizer= (the CLIP tokenizer or its path)")

    # ---- relevance ---------------------------------------------------------------------------
    def _text(self, state: PruneState, b: int) -> torch.Tensor | None:
        """Text embeddings (M, C) of sample ``b``'s instruction, or None when it has none."""
        if self.source == "llm":
            txt = state.hidden[b][state.instruction_mask[b]]
            return txt if txt.shape[0] else None
        if self.texts is None or len(self.texts) != state.visual_valid.shape[0]:
            raise ValueError("relevance='clip' needs pruner.texts = [one instruction string per sample] before the call")
        clip = self.clip_model
        length = clip.text_model.config.max_position_embeddings
        tok = self.clip_tokenizer(text=self.texts[b], return_tensors="pt")
        n = tok["input_ids"].shape[1]
        pad = length * ((n - 1) // length + 1) - n
        dev = clip.text_projection.weight.device
        inputs = {key: torch.cat([tok[key], tok[key].new_zeros(1, pad)], 1).reshape(-1, length).to(dev)
                  for key in ("input_ids", "attention_mask")}
        return clip.text_projection(clip.text_model(**inputs).pooler_output)

    def _clip_image(self, state: PruneState, patch_feats: torch.Tensor) -> torch.Tensor:
        proj = self.clip_model.visual_projection
        return proj(state.vision_post_layernorm(patch_feats).to(proj.weight)).to(patch_feats.device)

    def _relevance(self, img: torch.Tensor, txt: torch.Tensor | None, is_patch: torch.Tensor) -> torch.Tensor:
        if txt is None:
            return torch.ones(img.shape[:-1], device=img.device)
        negate = (self.source == "clip") if self.negate is None else self.negate
        sim = F.normalize(img.float(), dim=-1) @ F.normalize(txt.float().to(img.device), dim=-1).T
        raw = (-sim if negate else sim).mean(-1)
        raw = torch.where(is_patch, raw, raw[is_patch].min())  # newlines: no CLIP embedding
        return (raw - raw.min() + 1e-6) / (raw.max() - raw.min()).clamp_min(1e-12)

    # ---- selection ---------------------------------------------------------------------------
    def select(self, state: PruneState) -> Selection:
        if self.per_tile:
            return self._select_per_tile(state)
        k = resolve_keep(self.keep, state.n_visual_original).clamp(max=state.n_visual)
        feats, valid = state.visual_hidden, state.visual_valid
        B, Nv, _ = feats.shape
        clip = self.source == "clip"
        patch = state.patch_index >= 0 if clip else valid
        img = self._clip_image(state, state.vision_features()) if clip else feats
        rel = torch.ones(B, Nv, device=feats.device)
        for b in range(B):
            n = int(state.n_visual[b])
            rel[b, :n] = self._relevance(img[b, :n], self._text(state, b), patch[b, :n])
        kernel = conditional_kernel(feats, rel, self.theta) * (valid[:, :, None] & valid[:, None, :])
        return Selection(indices=dpp_greedy_map(kernel, valid, k, rel), info={"relevance": rel})

    def _select_per_tile(self, state: PruneState) -> Selection:
        """The official LLaVA-NeXT rule: one DPP of ``keep`` tokens per tile, newline tokens kept."""
        hs = state.tile_hidden()[:, 1:]  # (tiles, P, Dv) before unpadding
        P = hs.shape[1]
        patch_idx = state.patch_index
        out = []
        for b, images in enumerate(state.image_tiles()):  # every tile of the sample's images, unpadded away or not
            tiles = torch.cat([torch.arange(im.first_tile, im.first_tile + im.n_tiles) for im in images]).to(hs.device)
            tf = hs[tiles]
            proj = state.project(tf)
            img = self._clip_image(state, tf) if self.source == "clip" else proj
            valid = torch.ones(tf.shape[:2], dtype=torch.bool, device=tf.device)
            rel = self._relevance(img, self._text(state, b), valid)
            kt = resolve_keep(self.keep, torch.full((len(tiles),), P, device=tf.device))
            sel = dpp_greedy_map(conditional_kernel(proj, rel, self.theta), valid, kt, rel)
            flat = (tiles.to(sel.device)[:, None] * P + sel)[sel >= 0]
            n = int(state.n_visual[b])
            idx = patch_idx[b, :n]
            out.append(((idx < 0) | torch.isin(idx, flat)).nonzero()[:, 0])
        return Selection(indices=pad_rows(out))
