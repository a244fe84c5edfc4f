"""The method seam: registry, ASD data swap, RegLoRA key elements and penalty, state round trip."""

import json
from types import SimpleNamespace

import pytest
import torch

from sefe_fast.methods import METHODS, MethodConfig, build_method
from sefe_fast.methods.asd_method import asd_file_name
from sefe_fast.model.lora import attach_lora, lora_parameters, merge_lora
from sefe_fast.model.tiny import TinyConfig, build_tiny_model
from sefe_fast.reglora import load_key_elements, lora_factors
from sefe_fast.run_layout import key_elements_path

SMALL = TinyConfig(text_layers=2, text_hidden=64, text_heads=2, text_intermediate=128)


def test_registry_names_the_methods():
    assert set(METHODS) == {
        "lora", "asd", "reglora", "sefe", "olora", "fft", "lota", "moelora", "smolora",
    }  # fmt: skip
    for name in METHODS:
        assert build_method(name, MethodConfig()).name == name
    with pytest.raises(ValueError, match="unknown method 'nonesuch'"):
        build_method("nonesuch", MethodConfig())


@pytest.fixture(scope="module")
def minicoin(tmp_path_factory):
    from sefe_fast.data.minicoin import generate_minicoin

    return generate_minicoin(
        tmp_path_factory.mktemp("mc"), seed=0, n_train=40, n_test=2, n_stage0=1, progress=False
    )


def test_asd_converts_into_the_run_dir_and_prefers_a_shipped_file(minicoin, tmp_path):
    train = minicoin / "GQA" / "train.json"
    for name in ("lora", "reglora"):
        assert (
            build_method(name, MethodConfig()).prepare_train_file("GQA", train, tmp_path) == train
        )
    method = build_method("asd", MethodConfig(asd_ratio=0.2, seed=3))
    out = method.prepare_train_file("GQA", train, tmp_path)
    assert out == tmp_path / "asd" / "GQA" / "train_x20.json"
    records = json.loads(out.read_text())
    original = json.loads(train.read_text())
    assert len(records) == len(original)
    changed = sum(a["conversations"] != b["conversations"] for a, b in zip(records, original))
    assert changed == pytest.approx(0.2 * len(original), abs=2)
    assert build_method("sefe", MethodConfig()).prepare_train_file("GQA", train, tmp_path) == out
    shipped_dir = tmp_path / "coin" / "GQA"
    shipped_dir.mkdir(parents=True)
    (shipped_dir / "train.json").write_text(train.read_text())
    (shipped_dir / asd_file_name(0.2)).write_text("[]")
    assert method.prepare_train_file("GQA", shipped_dir / "train.json", tmp_path) == (
        shipped_dir / "train_x20.json"
    )


def _model():
    model = build_tiny_model(SMALL, seed=0).model
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _randomise(peft_model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(peft_model):
            p.normal_(0, 0.1)


def _manual_penalty(factors, files, lam):
    """λ/N Σ_m mean over all earlier tasks' positions (duplicates kept) of |(B·A)[pos]|."""
    per_task = [load_key_elements(f) for f in files]
    total = 0.0
    for name, (b, a) in factors.items():
        delta = (b @ a).abs()
        idx = torch.cat([ke[name].indices() for ke in per_task])
        total += float(delta[idx[:, 0], idx[:, 1]].mean())
    return lam * total / len(factors)


def test_reglora_keeps_key_elements_and_penalises_their_positions(tmp_path):
    method = build_method("reglora", MethodConfig(reg_lambda=100.0, mask_ratio=0.05))
    model = _model()
    for stage in (1, 2):
        peft_model = attach_lora(model, r=4, alpha=8, dropout=0.0)
        method.before_task(peft_model, f"T{stage}", stage)
        if stage == 1:
            assert method.extra_loss(peft_model, 0) is None
        else:  # fresh LoRA: B = 0, so ΔW = 0 and the penalty is 0 but defined
            assert float(method.extra_loss(peft_model, 0)) == 0.0
        _randomise(peft_model, seed=stage)
        if stage == 2:
            factors = {
                n: (b.detach(), a.detach()) for n, (b, a) in lora_factors(peft_model).items()
            }
            value = method.extra_loss(peft_model, 0)
            assert value.requires_grad
            expected = _manual_penalty(factors, [tmp_path / f for f in method.files], 100.0)
            assert float(value) == pytest.approx(expected, rel=1e-5)
            value.backward()
            assert all(p.grad is not None for p in lora_parameters(peft_model))
        method.after_task(peft_model, f"T{stage}", stage, tmp_path, write=True)
        model = merge_lora(peft_model)
    files = [key_elements_path(tmp_path, s, f"T{s}") for s in (1, 2)]
    # Stored relative to the run directory (a moved run finds them).
    assert method.state_dict() == {
        "key_element_files": [f.relative_to(tmp_path).as_posix() for f in files]
    }
    saved = load_key_elements(files[0])
    assert len(saved) == SMALL.text_layers * 7
    q = next(n for n in saved if n.endswith("layers.0.self_attn.q_proj"))
    assert len(saved[q]) == int(0.05 * 64 * 64)
    # Key elements accumulate: two tasks' positions per matrix, duplicates kept.
    assert len(method.merged[q]) == 2 * int(0.05 * 64 * 64)

    # A method restored from state_dict gives the same penalty on the same factors.
    restored = build_method("reglora", MethodConfig(reg_lambda=100.0, mask_ratio=0.05))
    restored.load_state_dict(json.loads(json.dumps(method.state_dict())), tmp_path)
    peft_model = attach_lora(model, r=4, alpha=8, dropout=0.0)
    _randomise(peft_model, seed=9)
    method.before_task(peft_model, "T3", 3)
    restored.before_task(peft_model, "T3", 3)
    a, b = method.extra_loss(peft_model, 0), restored.extra_loss(peft_model, 0)
    assert float(a) > 0
    assert float(a) == float(b)


def test_sefe_combines_asd_data_and_reglora_penalty(minicoin, tmp_path):
    method = build_method("sefe", MethodConfig(mask_ratio=0.02))
    assert method.describe() == {
        "name": "sefe",
        "asd_ratio": 0.2,
        "reg_lambda": 2.5e3,
        "mask_ratio": 0.02,
        "reg_backend": "auto",
    }
    out = method.prepare_train_file("VQAv2", minicoin / "VQAv2" / "train.json", tmp_path)
    assert out.name == "train_x20.json"
    peft_model = attach_lora(_model(), r=4, alpha=8, dropout=0.0)
    _randomise(peft_model, seed=1)
    method.after_task(peft_model, "VQAv2", 1, tmp_path, write=False)
    assert not key_elements_path(tmp_path, 1, "VQAv2").exists()  # write=False: not rank 0
    assert method.merged
    lora_only = build_method("lora", MethodConfig())
    lora_only.after_task(peft_model, "VQAv2", 1, tmp_path, write=True)
    assert lora_only.state_dict() == {} and lora_only.extra_loss(peft_model, 0) is None


def test_default_adapter_hooks_are_the_lora_lifecycle(tmp_path):
    """attach → groups → save → load → finish: a fresh LoRA at lr, the projector at its lr,
    saved in PEFT format, reloaded exactly, merged into W + (alpha/r)·B·A."""
    settings = SimpleNamespace(
        lora_r=4, lora_alpha=8.0, lora_dropout=0.0, lr=1e-3, projector_lr=2e-4
    )
    method = build_method("lora", MethodConfig())
    model = _model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    trained = method.attach(model, settings)
    groups = method.trainable_groups(trained, settings)
    assert [(g["name"], g["lr"]) for g in groups] == [("lora", 1e-3), ("proj", 2e-4)]
    assert {id(p) for g in groups for p in g["params"]} == {
        id(p) for p in trained.parameters() if p.requires_grad
    }
    assert len(groups[0]["params"]) == 2 * 7 * SMALL.text_layers
    _randomise(trained, seed=3)
    directory = tmp_path / "stage01_T"
    assert not method.is_stage_saved(directory)
    method.save_stage(trained, directory, write=False)  # not rank 0: nothing written
    assert not directory.exists()
    method.save_stage(trained, directory, write=True)
    assert method.is_stage_saved(directory)
    assert (directory / "adapter_model.safetensors").is_file()
    factors = {
        n: (b.detach().clone(), a.detach().clone()) for n, (b, a) in lora_factors(trained).items()
    }
    merged = dict(method.finish_stage(trained).named_parameters())
    assert not any(p.requires_grad for p in merged.values())
    q = next(n for n in factors if n.endswith("layers.0.self_attn.q_proj"))
    key = q + ".weight"  # the LLM's q_proj (the vision tower has one too, without LoRA)
    b, a = factors[q]
    torch.testing.assert_close(merged[key], base[key] + 2.0 * b @ a)
    # Replayed from disk onto a fresh copy of the base model: the same merged weights.
    reloaded = method.finish_stage(method.load_stage(_model(), directory))
    for name, param in reloaded.named_parameters():
        torch.testing.assert_close(param, merged[name], rtol=0, atol=0, msg=name)
