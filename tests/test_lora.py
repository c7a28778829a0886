"""LoRA (peft) beside a learned head: trains with the base frozen, exports peft-style adapter files,
is applied when the loaded head is installed and removed, bit for bit, when it is uninstalled."""

from __future__ import annotations

import json

import pytest
import torch

from learned_prune import load_pruner
from learned_prune.testbed import testbed_llava
from learned_prune.pruners.lora import LoraSettings, add_lora, lora_layers, remove_lora
from learned_prune.run import build

from conftest import make_batch
from test_atp import _cfg


def _backbone():
    return testbed_llava("llava", vision_hidden=32, text_hidden=32, text_layers=8, vision_layers=2,
                      intermediate_size=64, seed=0)


def test_lora_trains_exports_and_applies_on_load(tmp_path):
    cfg = _cfg(tmp_path, "trainer.max_steps=3", "test=false", "module.lora.enabled=true", "module.lora.r=4")
    parts = build(cfg)
    model, module, trainer = parts["model"], parts["module"], parts["trainer"]
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_before, "no LoRA adapters were injected"
    trainer.fit(module, datamodule=parts["datamodule"])
    after = dict(model.named_parameters())
    assert all(torch.equal(base[n], after[n]) for n in base), "a frozen base weight changed"
    assert any(not torch.equal(lora_before[n], after[n]) for n in lora_before), "LoRA adapters did not train"
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert any("lora_" in k for k in ckpt["state_dict"]), "Lightning checkpoint lacks the adapters"

    export = tmp_path / "atp-head"
    assert (export / "adapter_model.safetensors").is_file()
    assert json.loads((export / "adapter_config.json").read_text())["r"] == 4

    # the exported head + adapter reproduce the trained model's pruned outputs on a fresh backbone
    fresh, processor = _backbone()
    weights = {k: v.clone() for k, v in fresh.state_dict().items()}
    batch = make_batch(processor, 2)
    head = load_pruner(str(export))
    module.head.eval()
    with torch.no_grad():
        with module.head(model):
            want = model(**batch).logits
        with head(fresh):
            assert lora_layers(fresh), "the adapter was not applied on install"
            got = fresh(**batch).logits
        plain = load_pruner(str(export))
        plain.lora = None
        with plain(fresh):
            without = fresh(**batch).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, without), "the adapter had no effect"
    assert not lora_layers(fresh), "the adapter stayed on the model after the with block"
    assert all(torch.equal(weights[k], v) for k, v in fresh.state_dict().items())

    # peft itself loads the exported adapter (peft's adapter_config.json keys and weight names) and gives
    # the outputs of our own application of it, adapters on the language model only
    from peft import PeftModel

    from learned_prune.pruners.lora import load_adapter

    add_lora(fresh, *load_adapter(export))
    peft_model = PeftModel.from_pretrained(_backbone()[0], str(export)).eval()
    assert {n.split("base_model.model.")[1].rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters()
            if "lora_A" in n} == {"model.language_model." + n for n, _ in lora_layers(fresh.model.language_model)}
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, fresh(**batch).logits)
        assert not torch.allclose(peft_model(**batch).logits, _backbone()[0](**batch).logits)


def test_lora_rejects_unknown_target_modules():
    model, _ = _backbone()
    with pytest.raises(ValueError, match="not linear layers of the LLM"):
        add_lora(model, LoraSettings(enabled=True, target_modules=["qkv"]))
    add_lora(model, LoraSettings(enabled=True))
    with pytest.raises(RuntimeError, match="already carries"):
        add_lora(model, LoraSettings(enabled=True))
    remove_lora(model)
    assert not lora_layers(model)
