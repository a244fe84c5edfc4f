"""O-LoRA: penalty value and gradient against a loop reference, rank concatenation, resume."""

import json
from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from sefe_fast.methods.base import MethodConfig
from sefe_fast.methods.olora import OLoRAFileError, OLoRAMethod, load_subspace
from sefe_fast.reglora import lora_factors
from sefe_fast.run_layout import olora_path

R = 4  # LoRA rank
Q, DOWN = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"  # d = 32, 64


@dataclass(frozen=True)
class OLoRAConfig(MethodConfig):
    """MethodConfig with the O-LoRA fields the lead is asked to add."""

    olora_lambda1: float = 0.5
    olora_lambda2: float = 0.0


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def _peft(base: torch.nn.Module) -> torch.nn.Module:
    """A fresh LoRA on two modules of layer 0: q_proj (d = 32) and down_proj (d = 64)."""
    config = LoraConfig(
        r=R, lora_alpha=2 * R, target_modules=["q_proj", "down_proj"], layers_to_transform=[0]
    )
    return get_peft_model(base, config)


def _set_A(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, (_, lora_A) in lora_factors(model).items():
            lora_A.copy_(values[name])


def _random_A(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {Q: torch.randn(R, 32, generator=gen), DOWN: torch.randn(R, 64, generator=gen)}


def _reference_orthogonality(a_old: dict, a_new: dict) -> torch.Tensor:
    """Σ_modules Σ_{i,j} |Σ_k A_old[i, k] · A_new[j, k]|, with explicit loops over i and j."""
    total = torch.zeros((), dtype=torch.float64)
    for name, old in a_old.items():
        new = a_new[name]
        for i in range(old.shape[0]):
            for j in range(new.shape[0]):
                total = total + (old[i].double() * new[j].double()).sum().abs()
    return total


def test_lora_factors_of_the_test_model_are_the_two_modules():
    assert {n: tuple(a.shape) for n, (_, a) in lora_factors(_peft(_llama())).items()} == {
        Q: (R, 32),
        DOWN: (R, 64),
    }


def test_first_task_adds_nothing_and_l2_follows_olora(tmp_path):
    model = _peft(_llama())
    method = OLoRAMethod(MethodConfig())
    assert (method.lambda1, method.lambda2) == (0.5, 0.0)  # getattr defaults: the paper's
    method.before_task(model, "A", 1)
    assert method.extra_loss(model, 0) is None

    with_l2 = OLoRAMethod(OLoRAConfig(olora_lambda2=0.1))
    with_l2.before_task(model, "A", 1)
    got = with_l2.extra_loss(model, 0)
    expected = sum(
        torch.sqrt((w.double() ** 2).sum()) for b, a in lora_factors(model).values() for w in (a, b)
    )
    assert float(got.detach()) == pytest.approx(0.1 * float(expected), rel=1e-6)


def test_penalty_value_and_gradient_match_the_loop_reference(tmp_path):
    base = _llama()
    model = _peft(base)
    method = OLoRAMethod(OLoRAConfig(olora_lambda1=0.25))
    a1 = _random_A(1)
    _set_A(model, a1)
    method.after_task(model, "A", 1, tmp_path, write=True)

    model = _peft(model.merge_and_unload())  # task 2: a fresh LoRA on the merged weights
    a2 = _random_A(2)
    _set_A(model, a2)
    method.before_task(model, "B", 2)
    got = method.extra_loss(model, 0)
    factors = lora_factors(model)
    new = {name: a for name, (_, a) in factors.items()}
    expected = 0.25 * _reference_orthogonality(a1, new)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    assert float(expected) > 1.0  # random subspaces overlap: the test is not trivially 0

    got.backward()
    grads = {name: a.grad.clone() for name, a in new.items()}
    ref_new = {name: a.detach().clone().requires_grad_(True) for name, a in new.items()}
    (0.25 * _reference_orthogonality(a1, ref_new)).backward()
    for name in new:
        torch.testing.assert_close(grads[name], ref_new[name].grad.float(), rtol=1e-5, atol=1e-6)
        assert factors[name][0].grad is None or not factors[name][0].grad.any()  # B: no term


def test_penalty_is_computed_in_fp32_under_bf16_autocast(tmp_path):
    model = _peft(_llama())
    method = OLoRAMethod(MethodConfig())
    _set_A(model, _random_A(1))
    method.after_task(model, "A", 1, tmp_path, write=False)
    _set_A(model, _random_A(2))
    method.before_task(model, "B", 2)
    plain = method.extra_loss(model, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = method.extra_loss(model, 0)
    assert autocast.dtype == torch.float32
    assert float(autocast) == float(plain)


def test_orthogonal_subspace_gives_exactly_zero_and_overlap_grows_the_penalty(tmp_path):
    model = _peft(_llama())
    method = OLoRAMethod(MethodConfig())
    eye = {name: torch.eye(d) for name, d in ((Q, 32), (DOWN, 64))}
    _set_A(model, {name: e[:R] for name, e in eye.items()})  # old: the first R coordinates
    method.after_task(model, "A", 1, tmp_path, write=False)
    method.before_task(model, "B", 2)

    penalties = []
    for mix in (0.0, 0.2, 0.5, 1.0):  # new rows: orthogonal directions tilted towards old ones
        _set_A(model, {n: e[R : 2 * R] + mix * e[:R] for n, e in eye.items()})
        penalties.append(float(method.extra_loss(model, 0)))
    assert penalties[0] == 0.0
    assert penalties == sorted(penalties) and penalties[1] > 0
    # 2 modules × R diagonal entries of size `mix`, times λ1 = 0.5
    assert penalties[-1] == pytest.approx(0.5 * 2 * R * 1.0)


def test_after_task_concatenates_along_the_rank_and_saves_each_task(tmp_path):
    model = _peft(_llama())
    method = OLoRAMethod(MethodConfig())
    a1, a2 = _random_A(1), _random_A(2)
    _set_A(model, a1)
    method.after_task(model, "A", 1, tmp_path, write=True)
    model = _peft(model.merge_and_unload())
    _set_A(model, a2)
    method.after_task(model, "B", 2, tmp_path, write=True)

    for name in (Q, DOWN):
        assert torch.equal(method.a_old[name], torch.cat([a1[name], a2[name]], dim=0))
    assert method.a_old[DOWN].shape == (2 * R, 64)
    saved = load_subspace(olora_path(tmp_path, 2, "B"))
    assert set(saved) == {Q, DOWN} and torch.equal(saved[Q], a2[Q])
    assert method.describe() == {
        "name": "olora",
        "olora_lambda1": 0.5,
        "olora_lambda2": 0.0,
        "olora_stored_ranks": [2 * R],
    }


def test_state_round_trip_restores_identical_stacks_and_penalty(tmp_path):
    model = _peft(_llama())
    method = OLoRAMethod(MethodConfig())
    for stage, task in ((1, "A"), (2, "B")):
        _set_A(model, _random_A(stage))
        method.after_task(model, task, stage, tmp_path, write=True)
    state = json.loads(json.dumps(method.state_dict()))  # it must be JSON-ready
    assert state == {"olora_files": ["olora/stage01_A.safetensors", "olora/stage02_B.safetensors"]}

    # Paths are relative to the run directory: the state resumes in a moved copy.
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "olora").rename(moved / "olora")
    restored = OLoRAMethod(MethodConfig())
    restored.load_state_dict(state, moved)
    assert restored.files == method.files
    assert set(restored.a_old) == set(method.a_old)
    for name in method.a_old:
        assert torch.equal(restored.a_old[name], method.a_old[name])
    _set_A(model, _random_A(3))
    method.before_task(model, "C", 3)
    restored.before_task(model, "C", 3)
    assert float(restored.extra_loss(model, 0)) == float(method.extra_loss(model, 0))


def test_write_false_keeps_the_path_but_writes_nothing(tmp_path):
    model = _peft(_llama())
    method = OLoRAMethod(MethodConfig())
    method.after_task(model, "A", 1, tmp_path, write=False)
    assert method.files == [olora_path(tmp_path, 1, "A").relative_to(tmp_path).as_posix()]
    assert not (tmp_path / "olora").exists()


def test_bad_files_and_mismatched_models_are_named(tmp_path):
    model = _peft(_llama())
    method = OLoRAMethod(MethodConfig())
    method.after_task(model, "A", 1, tmp_path, write=True)
    path = olora_path(tmp_path, 1, "A")

    with pytest.raises(OLoRAFileError, match="not found"):
        OLoRAMethod(MethodConfig()).load_state_dict({"olora_files": ["olora/x"]}, tmp_path)
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(OLoRAFileError, match=str(path.name)):
        load_subspace(path)

    other = get_peft_model(_llama(), LoraConfig(r=R, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match=r"missing .*q_proj"):
        method.before_task(other, "B", 2)
    wider = get_peft_model(
        _llama(), LoraConfig(r=R, target_modules=["q_proj", "down_proj"], layers_to_transform=[0])
    )
    method.a_old[Q] = torch.zeros(R, 16)  # an A_old with another input size than the model's
    with pytest.raises(ValueError, match="input size d must match"):
        method.before_task(wider, "B", 2)

    with pytest.raises(ValueError, match="olora_lambda1 must be finite and >= 0"):
        OLoRAMethod(OLoRAConfig(olora_lambda1=-1.0))
