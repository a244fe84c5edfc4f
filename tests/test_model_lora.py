"""Fresh LoRA on the language model only, merging, and PEFT-format adapters."""

import torch
from peft import PeftModel

from sefe_fast.model.lora import (
    LORA_TARGETS,
    attach_lora,
    load_adapter,
    load_projector,
    lora_parameters,
    merge_lora,
    projector_parameters,
    save_adapter,
)
from sefe_fast.model.tiny import TinyConfig, build_tiny_model

SMALL = TinyConfig(text_layers=2, text_hidden=64, text_heads=2, text_intermediate=128)


def _model():
    model = build_tiny_model(SMALL, seed=0).model
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _inputs():
    torch.manual_seed(3)
    ids = torch.randint(5, 100, (2, 24))
    ids[:, 1:17] = 4
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32)}


def _randomise_lora(peft_model):
    torch.manual_seed(7)
    with torch.no_grad():
        for p in lora_parameters(peft_model):
            p.normal_(0, 0.2)
        for p in projector_parameters(peft_model):
            p.add_(0.1)


def test_lora_targets_only_the_language_model():
    peft_model = attach_lora(_model(), r=4, alpha=8, dropout=0.0)
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == SMALL.text_layers * len(LORA_TARGETS)
    assert all(".language_model." in n for n in wrapped)
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == set(LORA_TARGETS)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)


def test_merge_equals_base_plus_scaled_ba():
    model = _model()
    base_q = model.model.language_model.layers[0].self_attn.q_proj.weight.clone()
    peft_model = attach_lora(model, r=4, alpha=8, dropout=0.0)
    _randomise_lora(peft_model)
    q = peft_model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    delta = q.lora_B["default"].weight @ q.lora_A["default"].weight * (8 / 4)
    with torch.no_grad():
        before = peft_model.eval()(**_inputs()).logits
    merged = merge_lora(peft_model)
    torch.testing.assert_close(
        merged.model.language_model.layers[0].self_attn.q_proj.weight, base_q + delta
    )
    with torch.no_grad():
        after = merged.eval()(**_inputs()).logits
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in merged.parameters())
    # A fresh LoRA on the merged model starts from B = 0: no change to the outputs.
    fresh = attach_lora(merged, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(**_inputs()).logits, after)


def test_saved_adapter_loads_with_peft_and_gives_the_same_model(tmp_path):
    peft_model = attach_lora(_model(), r=4, alpha=8, dropout=0.05)
    _randomise_lora(peft_model)
    out = save_adapter(peft_model, tmp_path / "adapters" / "stage01_X")
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "projector.safetensors").is_file()
    with torch.no_grad():
        expected = peft_model.eval()(**_inputs()).logits
    # Plain peft, as a user would load it.
    loaded = PeftModel.from_pretrained(_model(), out)
    load_projector(loaded, out / "projector.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**_inputs()).logits, expected)
    again = load_adapter(_model(), out)
    load_projector(again, out / "projector.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**_inputs()).logits, expected)
    # Saving again replaces the directory, leaving no temporary folders behind.
    save_adapter(peft_model, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["stage01_X"]
