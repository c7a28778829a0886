"""Training never overwrites what ships, and a head notices a backbone with other weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from learned_prune import load_backbone, load_pruner

from conftest import make_batch

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_BACKBONE = ROOT / "checkpoints" / "tiny-llava-shapes"


@pytest.mark.parametrize("module", ["atp", "lvpruning", "bavit", "dyvte", "backbone"])
def test_a_training_run_exports_into_its_run_folder(module, tmp_path):
    default = compose_default_export(module, tmp_path / "run")
    assert Path(default).resolve().is_relative_to((tmp_path / "run").resolve()), default
    assert not Path(default).resolve().is_relative_to((ROOT / "checkpoints").resolve())


def compose_default_export(module: str, out: Path) -> str:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("train", overrides=[f"module={module}", f"paths.output_dir={out}", f"paths.root_dir={ROOT}"])
    GlobalHydra.instance().clear()
    return OmegaConf.select(cfg, "module.export_dir")


@pytest.fixture(scope="module")
def shipped():
    model, processor = load_backbone(SHIPPED_BACKBONE)
    return model.eval(), make_batch(processor, 2)


def _retrained(model):
    other, _ = load_backbone(SHIPPED_BACKBONE)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in other.parameters():  # same sizes, other weights: a retrained backbone
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return other.eval()


@pytest.mark.parametrize("head", ["atp-tiny", "lvpruning-tiny", "bavit-tiny", "dyvte-tiny"])
def test_a_head_refuses_a_backbone_with_other_weights(head, shipped):
    model, batch = shipped
    folder = str(ROOT / "checkpoints" / head)
    with torch.no_grad(), load_pruner(folder)(model):  # its own backbone: fine
        model(**batch)
    other = _retrained(model)
    with pytest.raises(ValueError, match="weights differ.*check_backbone=False"):
        with load_pruner(folder)(other):
            pass
    with torch.no_grad(), load_pruner(folder, check_backbone=False)(other):  # the explicit override
        other(**batch)


def test_an_exported_head_records_the_fingerprint_of_its_backbone(shipped, tmp_path):
    from learned_prune.pruners.learned import backbone_fingerprint, fingerprints_match

    model, batch = shipped
    head = load_pruner(str(ROOT / "checkpoints" / "atp-tiny"))
    head.backbone = {}  # as a freshly built head in training: it takes the backbone it is installed on
    with torch.no_grad(), head(model):
        model(**batch)
    head.save_pretrained(tmp_path / "h")
    again = load_pruner(str(tmp_path / "h"))
    assert fingerprints_match(again.backbone["fingerprint"], backbone_fingerprint(model))
    assert not fingerprints_match(again.backbone["fingerprint"], backbone_fingerprint(_retrained(model)))
    # bf16 weights of the same backbone still match (a head trained in bf16 loads in fp32)
    bf16, _ = load_backbone(SHIPPED_BACKBONE, dtype=torch.bfloat16)
    assert fingerprints_match(again.backbone["fingerprint"], backbone_fingerprint(bf16))
