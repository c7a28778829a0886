"""FlashSloth's embedded visual compression as a learned compressor (pruners/flashsloth.py)."""

from __future__ import annotations

import pytest
import torch

from learned_prune.pruners.flashsloth import AttentionPool, FlashSlothHead

from compressor_checks import (check_grid_loads_the_folder, check_round_trip, check_train_py_exports,
                               check_training_lowers_the_loss, compose, sizes)


def _head(model, **kw):
    return FlashSlothHead(**sizes(model), **{"pool": 4, "queries": 3, "heads": 2, **kw})


def test_attention_pooling_by_hand():
    torch.manual_seed(0)
    pool = AttentionPool(dim=3, pool=2, dropout=0.0)
    grid = torch.randn(1, 4, 4, 3)
    torch.nn.init.zeros_(pool.score[-1].weight)
    torch.nn.init.zeros_(pool.score[-1].bias)
    out = pool(grid)  # equal scores: each 2x2 region's mean, regions in raster order
    expected = torch.nn.functional.avg_pool2d(grid.permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    pool.score = torch.nn.Linear(3, 1)  # score = the first channel
    with torch.no_grad():
        pool.score.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
        pool.score.bias.zero_()
    grid[0, 2, 1, 0] = 50.0  # dominates region (row 1, col 0) of the 2x2 regions
    assert torch.allclose(pool(grid)[0, 2], grid[0, 2, 1])


def test_query_tokens_follow_the_instruction_and_pooled_tokens_do_not():
    torch.manual_seed(0)
    head = FlashSlothHead(vision_hidden=8, hidden_size=6, grid=4, pool=2, queries=3, heads=2, dropout=0.0).eval()
    patches = torch.randn(1, 16, 8)
    text = torch.randn(1, 5, 6)
    valid = torch.tensor([[True, True, True, False, False]])
    a = head.query_tokens(patches, text, valid)
    text_b = text.clone()
    text_b[0, 3:] = 100.0  # invalid (padding) rows: ignored
    torch.testing.assert_close(head.query_tokens(patches, text_b, valid), a)
    text_b[0, 1] = -text_b[0, 1]  # a real instruction token changes: the queries change
    assert not torch.allclose(head.query_tokens(patches, text_b, valid), a)
    assert a.shape == (1, 3, 6) and head.n_tokens == 4 + 3


def test_bad_hyperparameters_name_the_argument():
    with pytest.raises(ValueError, match="pool=5"):
        FlashSlothHead(vision_hidden=8, hidden_size=6, grid=12, pool=5)
    with pytest.raises(ValueError, match="heads=3"):
        FlashSlothHead(vision_hidden=8, hidden_size=6, grid=12, heads=3)
    with pytest.raises(ValueError, match="queries=-1"):
        FlashSlothHead(vision_hidden=8, hidden_size=6, grid=12, queries=-1)


def test_config_gives_16_tokens_and_8_with_the_smaller_setting(tmp_path):
    cfg = compose(tmp_path, "flashsloth")
    head = cfg.module.head
    assert (12 // head.pool) ** 2 + head.queries == 16
    assert (12 // 6) ** 2 + 4 == 8  # the config comment's 5.6% setting: pool=6 queries=4


def test_save_load_round_trip(tmp_path):
    check_round_trip(tmp_path, _head)


def test_pooling_only_head_round_trip(tmp_path):
    check_round_trip(tmp_path, lambda m: _head(m, pool=3, queries=0))


def test_a_few_training_steps_lower_the_loss():
    check_training_lowers_the_loss(_head)


def test_train_py_trains_and_exports(tmp_path):
    check_train_py_exports(tmp_path, "flashsloth", FlashSlothHead, "module.head.heads=2")


def test_eval_grid_loads_the_head_folder(tmp_path):
    check_grid_loads_the_folder(tmp_path, _head)
