"""QueCC, the query-based convolutional compressor, as a learned compressor (pruners/quecc.py)."""

from __future__ import annotations

import pytest
import torch

from learned_prune.pruners.quecc import QueCCHead, default_levels

from compressor_checks import (check_grid_loads_the_folder, check_round_trip, check_train_py_exports,
                               check_training_lowers_the_loss, compose, sizes)


def _head(model, **kw):
    return QueCCHead(**sizes(model), **{"stride": 4, "heads": 2,
                                        "vision_layers": model.config.vision_config.num_hidden_layers, **kw})


def test_default_levels_are_the_official_layers_scaled():
    assert default_levels(24) == [12, 16, 22, 23]  # CLIP-L/14: the official code's layers
    assert default_levels(4) == [2, 3, 4]


def test_each_token_reads_only_its_own_cell():
    torch.manual_seed(0)
    head = QueCCHead(vision_hidden=8, hidden_size=6, grid=4, stride=[2, 1], heads=2, levels=[1, 2]).eval()
    assert head.n_tokens == 2 * 4  # 2x1 cells of a 4x4 grid: 2 rows x 4 columns of tokens
    single, multi, text = torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 16), torch.randn(1, 6)
    with torch.no_grad():
        a = head.compress_features(single, multi, text)
        multi_b, single_b = multi.clone(), single.clone()
        multi_b[0, 2:, 3] += 5.0  # the patches of cell (row 1, column 3) only
        single_b[0, 2:, 3] -= 5.0
        b = head.compress_features(single_b, multi_b, text)
        changed = (a - b).abs().amax(-1)[0] > 1e-6
        assert changed.tolist() == [False] * 7 + [True]
        assert not torch.allclose(head.compress_features(single, multi, text + 1.0), a)  # the text query matters


def test_bad_hyperparameters_name_the_argument():
    with pytest.raises(ValueError, match="stride=5"):
        QueCCHead(vision_hidden=8, hidden_size=6, grid=12, stride=5, levels=[1])
    with pytest.raises(ValueError, match="heads=3"):
        QueCCHead(vision_hidden=8, hidden_size=6, grid=12, heads=3, levels=[1])
    with pytest.raises(ValueError, match="vision_layers"):
        QueCCHead(vision_hidden=8, hidden_size=6, grid=12)


def test_config_gives_16_tokens_and_8_with_a_rectangular_stride(tmp_path):
    cfg = compose(tmp_path, "quecc")
    assert cfg.module.head.stride == 3 and (12 // 3) ** 2 == 16
    assert QueCCHead(vision_hidden=8, hidden_size=6, grid=12, stride=[6, 3], levels=[1]).n_tokens == 8


def test_save_load_round_trip(tmp_path):
    check_round_trip(tmp_path, _head)


def test_save_load_round_trip_with_a_rectangular_stride(tmp_path):
    check_round_trip(tmp_path, lambda m: _head(m, stride=[6, 3]))


def test_a_few_training_steps_lower_the_loss():
    check_training_lowers_the_loss(_head)


def test_train_py_trains_and_exports(tmp_path):
    check_train_py_exports(tmp_path, "quecc", QueCCHead, "module.head.heads=2")


def test_eval_grid_loads_the_head_folder(tmp_path):
    check_grid_loads_the_folder(tmp_path, _head)
