"""CDPruner selects what the official rule selects (Theia-4869/CDPruner, ``llava_arch.py: encode_images``).

The references below re-state the rule from the paper and the official code, from plain HF outputs:
kernel ``L = diag(r) S diag(r)`` with ``S`` the cosine similarity of the projector outputs and ``r``
the mean cosine relevance to the instruction, min-max normalised ``(r - min + 1e-6) / (max - min)``;
then the greedy MAP by brute force: each step adds the token maximising ``det(L_S)`` (float64
determinants, no incremental Cholesky).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from learned_prune import load_pruner
from learned_prune.pruners.cdpruner import conditional_kernel, dpp_greedy_map

from conftest import PROMPTS, get_tiny, make_batch, make_images
from helpers import record_selections

QUESTIONS = [p.split("\n")[1].rsplit(" ASSISTANT:", 1)[0] for p in PROMPTS]


# ---- independent references ----------------------------------------------------------------------
def greedy_logdet(L: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP of a DPP by brute force: add the item maximising det(L[S+i, S+i]), k times; sorted."""
    L = L.double()
    chosen: list[int] = []
    for _ in range(k):
        rest = torch.tensor([i for i in range(L.shape[0]) if i not in chosen])
        rows = torch.cat([torch.tensor(chosen, dtype=torch.long).expand(len(rest), -1), rest[:, None]], 1)
        subs = L[rows[:, :, None], rows[:, None, :]]  # (candidates, |S|+1, |S|+1)
        chosen.append(int(rest[torch.linalg.det(subs).argmax()]))
    return sorted(chosen)


def relevance(img: torch.Tensor, txt: torch.Tensor, negate: bool, newline=None) -> torch.Tensor:
    cos = F.normalize(img.double(), dim=-1) @ F.normalize(txt.double(), dim=-1).T
    r = (-cos if negate else cos).mean(-1)
    if newline is not None:  # row-end newline tokens have no CLIP embedding: the sample's lowest relevance
        r = torch.where(newline, r[~newline].min(), r)
    return (r - r.min() + 1e-6) / (r.max() - r.min())


def kernel(feats: torch.Tensor, r: torch.Tensor, theta=None) -> torch.Tensor:
    x = F.normalize(feats.double(), dim=-1)
    q = r.double() if theta is None else torch.exp(theta / (2 * (1 - theta)) * r.double())
    return q[:, None] * (x @ x.T) * q[None]


def instruction_embeddings(model, batch: dict, b: int) -> torch.Tensor:
    """LLM input embeddings of the prompt text after sample b's last image token (padding excluded)."""
    ids, mask = batch["input_ids"][b], batch["attention_mask"][b].bool()
    last = int((ids == model.config.image_token_id).nonzero().max())
    after = (torch.arange(ids.shape[0]) > last) & mask
    return model.get_input_embeddings()(ids[after])


def packed_sources(model, batch: dict, b: int, n_tiles: int) -> torch.Tensor:
    """For each image token of sample b, its (tile * P + patch) source; -1 for NeXT newlines (HF's own packing)."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    P = side * side
    flat = torch.arange(n_tiles * P, dtype=torch.float32).view(n_tiles, P, 1)
    if "image_sizes" not in batch:
        return flat.view(-1).long()
    packed, _ = model.model.pack_image_features(
        [flat], batch["image_sizes"][b : b + 1], vision_feature_select_strategy="default",
        image_newline=torch.tensor([-1.0]))
    return packed[0].view(-1).round().long()


def tiles(model, batch: dict, b: int) -> torch.Tensor:
    """Pixel tiles (base view first) of sample b's image."""
    pv = batch["pixel_values"][b]
    if pv.dim() == 3:
        return pv[None]
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    n = image_size_to_num_patches(image_size=batch["image_sizes"][b], grid_pinpoints=model.config.image_grid_pinpoints,
                                  patch_size=model.config.vision_config.image_size)
    return pv[:n]


def patch_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """Pre-projector patch features (tiles, P, Dv) of the layer LLaVA feeds its projector (-2)."""
    return model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]


def image_tokens(model, batch: dict) -> list[torch.Tensor]:
    """What the plain HF model scatters into each sample's image placeholders (projected, NeXT: packed)."""
    kw = {"image_sizes": batch["image_sizes"]} if "image_sizes" in batch else {}
    return model.model.get_image_features(pixel_values=batch["pixel_values"], **kw).pooler_output


def recorded(pruner, model, batch: dict) -> torch.Tensor:
    records = record_selections(pruner)
    with torch.no_grad(), pruner(model):
        model(**batch)
    assert len(records) == 1 and records[0][1] == "vision"
    return records[0][2].indices


def as_list(row: torch.Tensor) -> list[int]:
    return row[row >= 0].tolist()


# ---- index equality with the references ----------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("options", [{}, {"theta": 0.5}, {"negate": True}])
def test_selection_equals_reference_on_a_padded_batch(family, options):
    """Default path (relevance from the LLM's instruction embeddings), both families, batch of 3, left padding."""
    model, processor = get_tiny(family)
    batch = make_batch(processor, 3)
    assert (batch["attention_mask"][:, 0] == 0).any()
    keep = 12
    got = recorded(load_pruner("cdpruner", keep=keep, **options), model, batch)
    for b, feats in enumerate(image_tokens(model, batch)):
        r = relevance(feats, instruction_embeddings(model, batch, b), options.get("negate", False))
        assert as_list(got[b]) == greedy_logdet(kernel(feats, r, options.get("theta")), keep), f"sample {b}"


@torch.no_grad()
def test_official_per_tile_rule_on_llava_next():
    """``per_tile=True``: one DPP of ``keep`` tokens per tile (before unpadding), relevance min-max over all
    tiles of the image, newline tokens always kept, selections in unpadded areas dropped."""
    model, processor = get_tiny("llava_next")
    batch = make_batch(processor, 3)
    keep = 5
    got = recorded(load_pruner("cdpruner", keep=keep, per_tile=True), model, batch)
    for b in range(3):
        pix = tiles(model, batch, b)
        proj = model.model.multi_modal_projector(patch_features(model, pix))  # (tiles, P, D)
        T, P, _ = proj.shape
        r = relevance(proj.reshape(T * P, -1), instruction_embeddings(model, batch, b), False).view(T, P)
        chosen = {t * P + i for t in range(T) for i in greedy_logdet(kernel(proj[t], r[t]), keep)}
        src = packed_sources(model, batch, b, T).tolist()
        want = [j for j, s in enumerate(src) if s < 0 or s in chosen]
        assert as_list(got[b]) == want, f"sample {b}"
        assert sum(s < 0 for s in src) > 0 and len(want) < len(src)


def tiny_clip(model, tokenizer, max_len: int = 5):
    """A random HF CLIPModel whose vision side matches the tiny LLaVA tower (text segments of ``max_len``)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=max_len, eos_token_id=2,
                         bos_token_id=1, pad_token_id=0),
        vision_config=model.config.vision_config.to_dict(), projection_dim=16)
    return CLIPModel(config).eval()


@torch.no_grad()
def test_official_clip_relevance(family):
    """The official relevance: CLIP visual_projection(post_layernorm(patch features)) against the CLIP text
    tower on the raw question (cut into max_position_embeddings segments), negated, min-max normalised."""
    model, processor = get_tiny(family)
    batch = make_batch(processor, 3)
    clip = tiny_clip(model, processor.tokenizer)
    keep = 10
    pruner = load_pruner("cdpruner", keep=keep, clip_model=clip, clip_tokenizer=processor.tokenizer)
    pruner.texts = QUESTIONS
    got = recorded(pruner, model, batch)
    tower = model.model.vision_tower
    post = getattr(tower, "vision_model", tower).post_layernorm  # transformers 5: CLIPVisionModel holds it directly
    segments = []
    for b, feats in enumerate(image_tokens(model, batch)):
        pix = tiles(model, batch, b)
        src = packed_sources(model, batch, b, pix.shape[0])
        emb = clip.visual_projection(post(patch_features(model, pix))).flatten(0, 1)[src.clamp_min(0)]
        tok = processor.tokenizer(QUESTIONS[b], return_tensors="pt")
        n = tok["input_ids"].shape[1]
        n_seg = -(-n // 5)
        ids, mask = (torch.cat([tok[key][0], tok[key].new_zeros(5 * n_seg - n)]).view(n_seg, 5)
                     for key in ("input_ids", "attention_mask"))
        txt = clip.text_projection(clip.text_model(input_ids=ids, attention_mask=mask).pooler_output)
        segments.append(n_seg)
        r = relevance(emb, txt, True, newline=src < 0)
        assert as_list(got[b]) == greedy_logdet(kernel(feats, r), keep), f"sample {b}"
    assert max(segments) >= 2  # the cutting of long instructions into segments is exercised


def test_clip_relevance_needs_texts():
    model, processor = get_tiny("llava")
    pruner = load_pruner("cdpruner", keep=8, clip_model=tiny_clip(model, processor.tokenizer),
                         clip_tokenizer=processor.tokenizer)
    with pytest.raises(ValueError, match="texts"), torch.no_grad(), pruner(model):
        model(**make_batch(processor, 2))


# ---- hand-made cases with a known answer ------------------------------------------------------------
def test_duplicates_are_not_chosen_together_while_distinct_tokens_remain():
    e = torch.eye(4)
    feats = torch.stack([e[0], e[0], e[1], e[2], e[3] + 0.1 * e[0]])[None]  # tokens 0 and 1 identical
    r = torch.tensor([[1.0, 1.0, 0.9, 0.8, 0.7]])
    sel = dpp_greedy_map(conditional_kernel(feats, r), torch.ones(1, 5, dtype=torch.bool), torch.tensor([4]), r)
    assert sel.tolist() == [[0, 2, 3, 4]]  # the highest-relevance copy first, its duplicate never
    assert greedy_logdet(kernel(feats[0], r[0].double()), 4) == [0, 2, 3, 4]


def test_relevance_steers_the_choice_between_equally_diverse_tokens():
    feats = torch.eye(3)[None]
    valid = torch.ones(1, 3, dtype=torch.bool)
    for r, first in ([0.2, 0.9, 0.5], 1), ([0.9, 0.2, 0.5], 0):
        r = torch.tensor([r])
        assert dpp_greedy_map(conditional_kernel(feats, r), valid, torch.tensor([1]), r).tolist() == [[first]]
        two = dpp_greedy_map(conditional_kernel(feats, r), valid, torch.tensor([2]), r)
        assert two.tolist() == [sorted([first, 2])]


def test_spent_kernel_fills_by_relevance_and_padding_is_never_chosen():
    feats = torch.tensor([[[1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0], [5.0, 5.0]]])  # rank 2; token 4 is padding
    r = torch.tensor([[0.3, 0.4, 0.9, 0.1, 9.0]])
    valid = torch.tensor([[True, True, True, True, False]])
    sel = dpp_greedy_map(conditional_kernel(feats, r), valid, torch.tensor([3]), r)
    assert sel.tolist() == [[0, 1, 2]]  # DPP: 2 then 1; rank spent; then the most relevant left: 0
    assert torch.isfinite(conditional_kernel(feats, r)).all()
    sel = dpp_greedy_map(conditional_kernel(feats, r), valid, torch.tensor([4]), r)
    assert sel.tolist() == [[0, 1, 2, 3]]


@torch.no_grad()
def test_the_instruction_changes_the_selection():
    model, processor = get_tiny("llava")
    one = make_batch(processor, 1)
    other = dict(processor(images=make_images(1), text=[PROMPTS[1]], return_tensors="pt"))
    a = recorded(load_pruner("cdpruner", keep=12), model, one)
    b = recorded(load_pruner("cdpruner", keep=12), model, other)
    assert a.tolist() != b.tolist()


@torch.no_grad()
def test_clip_model_and_tokenizer_load_from_a_folder(tmp_path):
    model, processor = get_tiny("llava")
    clip = tiny_clip(model, processor.tokenizer)
    clip.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    batch = make_batch(processor, 2)
    results = []
    for kwargs in ({"clip_model": clip, "clip_tokenizer": processor.tokenizer}, {"clip_model": str(tmp_path)}):
        pruner = load_pruner("cdpruner", keep=8, **kwargs)
        pruner.texts = QUESTIONS[:2]
        results.append(recorded(pruner, model, batch))
    assert torch.equal(results[0], results[1])
