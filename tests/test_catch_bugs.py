"""Tests aimed at one-line bugs that once passed the whole suite: the direction of every training objective,
the warm-up's first step, exporting the best checkpoint, decoding without position ids after a prune, and
LLaVA-NeXT's visual-token sources (newline tokens, crop tiles, unpadding) computed by hand."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from learned_prune import load_backbone, load_pruner
from learned_prune.engine.state import PruneState, Selection
from learned_prune.modules.lr_schedule import warmup_cosine
from learned_prune.pruners.atp import ATPHead
from learned_prune.pruners.base import Pruner
from learned_prune.pruners.indices import mask_indices
from learned_prune.testbed import testbed_llava as tiny_testbed  # not named test*: pytest would collect it

from conftest import PROMPTS, make_images
from helpers import fit_frozen
from test_atp import TINY

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-llava-shapes"


def _teacher_forced(processor, n: int = 2) -> dict:
    """A batch of ``n`` same-length prompts followed by a 2-token answer, labelled on the answer only."""
    batch = dict(processor(images=make_images(n), text=[PROMPTS[0]] * n, return_tensors="pt", padding=True))
    L = batch["input_ids"].shape[1]
    ids = torch.cat([batch["input_ids"], torch.tensor([[5, 6]] * n)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, L:] = ids[:, L:]
    return dict(batch, input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


# ---- training objectives ----------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_distillation_is_kl_of_the_unpruned_teacher_to_the_pruned_student():
    """The training loss = task + budget_weight x budget + distill_weight x KL(teacher || student) on the
    answer rows, the teacher the unpruned backbone (the KL's arguments swapped give another number). On the
    shipped backbone, whose answers depend on the image, so that the two directions differ clearly."""
    from learned_prune.modules.learned import LearnedPrunerModule

    model, processor = load_backbone(str(SHIPPED))
    torch.manual_seed(0)
    head = ATPHead(model.config.text_config.hidden_size, model.config.text_config.num_hidden_layers)
    for stage in head.modules_by_site.values():
        torch.nn.init.normal_(stage.mlp[-1].weight, std=0.05)
    module = LearnedPrunerModule(model, head, processor, budget_weight=2.0, distill_weight=0.5)
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    batch = _teacher_forced(processor)
    loss = module.training_step(batch, 0)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        teacher = model(**inputs, use_cache=False).logits
        with head(model, mode="soft"):
            student = model(**inputs, labels=batch["labels"], use_cache=False)
        budget, _ = head.budget_loss()
    rows = batch["labels"][:, 1:] != -100
    log_t, log_s = (F.log_softmax(x[:, :-1][rows].float(), -1) for x in (teacher, student.logits))
    kl_ts = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    kl_st = (log_s.exp() * (log_s - log_t)).sum(-1).mean()
    assert abs(float(kl_ts - kl_st)) > 0.1 * float(kl_ts)  # the two directions differ on this batch
    torch.testing.assert_close(logged["train/distill_loss"], kl_ts, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss, student.loss + 2.0 * budget + 0.5 * kl_ts, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("target, sign", [(0.05, 1.0), (1.0, -1.0)])
def test_atp_budget_objective_moves_the_thresholds_the_right_way(target, sign):
    """Above the target kept fraction the budget loss asks for higher thresholds (fewer tokens); below it, lower."""
    model, processor = tiny_testbed("llava", text_layers=8, seed=0)
    head = ATPHead(model.config.text_config.hidden_size, 8, target=target, layer_cost=0.0)
    with head(model, mode="soft"):
        model(**_teacher_forced(processor))
    loss, logs = head.budget_loss()
    final = float(logs[f"kept_frac/llm:{head.layers[-1]}"])
    assert (final - target) * sign > 0
    loss.backward()
    for stage in head.modules_by_site.values():  # output 0 shifts t_red, output 1 t_sp; both raise with their bias
        assert (stage.mlp[-1].bias.grad * sign < 0).all(), stage.mlp[-1].bias.grad


def test_warm_up_starts_above_zero_and_rises_linearly():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=100, warmup_steps=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # the first step already trains
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5) and lrs[-1] < 1e-3
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


# ---- export ---------------------------------------------------------------------------------
def test_export_writes_the_best_checkpoints_weights_not_the_last(tmp_path):
    """Validation at steps 2 and 4, the first one best (monitor ``step``, mode ``min``): the exported head
    holds the step-2 weights, not the final ones."""
    overrides = [*TINY, "trainer.max_steps=4", "test=false", "callbacks.model_checkpoint.monitor=step",
                 "callbacks.model_checkpoint.mode=min"]
    parts = fit_frozen(tmp_path, overrides, "atp-head")
    best = parts["trainer"].checkpoint_callback.best_model_path
    assert best.endswith("step_000002.ckpt"), best
    want = {k[len("head."):]: v for k, v in torch.load(best, weights_only=False)["state_dict"].items()}
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    exported = load_file(tmp_path / "atp-head" / "model.safetensors")
    assert set(exported) == set(want)
    assert all(torch.equal(exported[k], want[k]) for k in want)
    assert any(not torch.equal(exported[k], last["head." + k]) for k in want), "best and last should differ"


# ---- decoding by hand -------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_decoding_without_position_ids_after_a_prune_equals_explicit_positions(family):
    """generate() always passes positions; a hand-written decoding loop does not: the engine must then
    advance each layout's next position itself, exactly as explicit positions would."""
    model, processor = tiny_testbed(family, text_layers=4, seed=0)
    batch = dict(processor(images=make_images(2)[:1] * 2, text=[PROMPTS[0]] * 2, return_tensors="pt"))
    L = batch["input_ids"].shape[1]
    pruner = load_pruner([load_pruner("divprune", keep=40), load_pruner("fastv", keep=16)])  # repacked, then kept
    runs = []
    for explicit in (False, True):
        tokens, logits = [], []
        with pruner(model):
            extra = {"position_ids": torch.arange(L)[None].expand(2, L)} if explicit else {}
            out = model(**batch, use_cache=True, **extra)
            mask = batch["attention_mask"]
            for t in range(4):
                logits.append(out.logits[:, -1])
                tok = out.logits[:, -1:].argmax(-1) if not explicit else runs[0][0][t]
                tokens.append(tok)
                mask = torch.cat([mask, torch.ones_like(tok)], 1)
                extra = {"position_ids": torch.full_like(tok, L + t)} if explicit else {}
                out = model(input_ids=tok, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True,
                            **extra)
        runs.append((tokens, logits))
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)
    with pruner(model):
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert torch.equal(gen[:, L:], torch.cat(runs[0][0], 1))


# ---- LLaVA-NeXT signals by hand -------------------------------------------------------------------
@dataclass
class _Spy(Pruner):
    """Keeps everything at the vision site and records what the state says of each visual token."""

    site: str = "vision"

    def select(self, state: PruneState) -> Selection:
        self.seen = {"patch_index": state.patch_index.clone(), "valid": state.visual_valid.clone(),
                     "tiles": state.image_tiles(), "cls": state.cls_attention()}
        return Selection(indices=mask_indices(state.visual_valid))


def _next_sources(first_tile: int, rows: int, cols: int, crop: tuple[int, int], keep_r, keep_c) -> list[int]:
    """LLaVA-NeXT's visual tokens of one image by hand: the base view's 144 patches, then the crop grid
    (``crop`` tiles of 12 x 12, joined into ``rows`` x ``cols`` patches) unpadded to rows ``keep_r`` and
    columns ``keep_c``, a newline (-1) closing each row. Flat index = tile * 144 + patch within the tile."""
    out = [first_tile * 144 + p for p in range(144)]
    for r in keep_r:
        for c in keep_c:
            tile = first_tile + 1 + (r // 12) * crop[1] + c // 12
            out.append(tile * 144 + (r % 12) * 12 + c % 12)
        out.append(-1)
    assert rows == 12 * crop[0] and cols == 12 * crop[1]
    return out


@torch.no_grad()
def test_llava_next_patch_index_and_newlines_by_hand():
    """A wide image (96 x 160: crops 1 x 2, two padding columns each side) and a tall one (160 x 96: crops
    2 x 1, two padding rows each side) in one padded batch; tiles are numbered over the batch."""
    from PIL import Image

    model, processor = tiny_testbed("llava_next", text_layers=4, seed=0)
    images = [Image.new("RGB", (160, 96), (200, 30, 30)), Image.new("RGB", (96, 160), (30, 200, 30))]  # (w, h)
    batch = dict(processor(images=images, text=[PROMPTS[0], PROMPTS[1]], return_tensors="pt", padding=True))
    wide = _next_sources(0, 12, 24, (1, 2), range(12), range(2, 22))
    tall = _next_sources(3, 24, 12, (2, 1), range(2, 22), range(12))
    assert (len(wide), len(tall)) == (144 + 12 * 21, 144 + 20 * 13)
    spy = _Spy()
    with spy(model) as engine:
        model(**batch)
    seen = spy.seen
    for b, want in enumerate((wide, tall)):
        got = seen["patch_index"][b][seen["valid"][b]].tolist()
        assert got == want, b
        newline = seen["patch_index"][b] == -1
        assert (seen["cls"][b][newline & seen["valid"][b]] == 0).all()  # newlines have no [CLS] attention
        assert (seen["cls"][b][~newline & seen["valid"][b]] > 0).all()
    tiles = [[(t.first_tile, t.n_tiles, t.grid, t.start, t.count) for t in sample] for sample in seen["tiles"]]
    assert tiles == [[(0, 3, (1, 2), 0, len(wide))], [(3, 3, (2, 1), 0, len(tall))]]
    assert engine.kept_tokens["vision"].tolist() == [len(wide), len(tall)]
