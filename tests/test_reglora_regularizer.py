"""The model-level regularizer, and the peft helpers that feed it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sefe_fast.reglora import (
    KeyElements,
    RegLoRA,
    collect_key_elements,
    lora_factors,
    merge_key_elements,
    reglora_penalty,
    select_key_elements,
)
from sefe_fast.reglora.penalty import reference_penalty_from_indices

pytestmark = pytest.mark.usefixtures("one_thread")


SHAPES = {"l0.q": (12, 10), "l0.down": (7, 12), "l1.q": (12, 10)}


def _masks(seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (k, d) in SHAPES.items():
        tasks = [
            KeyElements.from_linear(torch.randperm(k * d, generator=gen)[: k * d // 5], (k, d))
            for _ in range(2)
        ]
        out[name] = merge_key_elements(tasks)
    return out


def _factors(r=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (
            torch.randn(k, r, generator=gen).requires_grad_(),
            torch.randn(r, d, generator=gen).requires_grad_(),
        )
        for name, (k, d) in SHAPES.items()
    }


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
def test_value_is_lambda_over_n_times_sum_of_penalties(backend):
    masks = _masks()
    masks["l1.q"] = KeyElements.empty((12, 10))  # empty masks still count in N
    factors = _factors()
    reg = RegLoRA(masks, lam=2.5e3, backend=backend)
    value = reg(factors)
    expected = sum(
        reference_penalty_from_indices(B.detach(), A.detach(), masks[n].indices())
        for n, (B, A) in factors.items()
        if len(masks[n])
    ) * (2.5e3 / 3)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    value.backward()
    for name, (B, A) in factors.items():
        nonzero = torch.count_nonzero(B.grad) > 0 and torch.count_nonzero(A.grad) > 0
        assert nonzero == (name != "l1.q")


def test_gradients_match_reference_backend():
    masks = _masks(2)
    grads = {}
    for backend in ("reference", "torch"):
        factors = _factors(seed=3)
        RegLoRA(masks, lam=10.0, backend=backend)(factors).backward()
        grads[backend] = [t.grad for pair in factors.values() for t in pair]
    for got, ref in zip(grads["torch"], grads["reference"]):
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_groups_by_shape_and_plans_are_built_once():
    masks = _masks()
    reg = RegLoRA(masks)
    assert reg.groups() == [((12, 10), ["l0.q", "l1.q"]), ((7, 12), ["l0.down"])]
    plans = reg.plans()
    reg(_factors())
    reg(_factors(seed=4))
    assert all(reg.plans()[name] is plans[name] for name in masks)


def test_factor_names_and_shapes_must_match():
    reg = RegLoRA(_masks())
    factors = _factors()
    missing = dict(factors)
    missing.pop("l0.down")
    with pytest.raises(ValueError, match=r"missing \['l0.down'\]"):
        reg(missing)
    with pytest.raises(ValueError, match=r"unexpected \['l9.v'\]"):
        reg({**factors, "l9.v": factors["l0.q"]})
    wrong = {**factors, "l0.down": (torch.randn(12, 3), torch.randn(3, 7))}
    with pytest.raises(ValueError, match=r"l0\.down: key elements are for a \(7, 12\) matrix"):
        reg(wrong)
    with pytest.raises(ValueError, match=r"l0\.q: rank mismatch"):
        reg({**factors, "l0.q": (torch.randn(12, 3), torch.randn(2, 10))})
    with pytest.raises(ValueError, match="unknown RegLoRA backend"):
        RegLoRA(_masks(), backend="fast")
    with pytest.raises(TypeError, match=r"l0\.q: expected KeyElements"):
        RegLoRA({"l0.q": torch.zeros(2, 2)})


def test_empty_regularizer_is_zero():
    assert RegLoRA({})(_factors()).item() == 0.0


@pytest.mark.parametrize("backend", ["triton", "triton_tile", "triton_gather"])
def test_gpu_path_one_launch_per_group_and_one_copy_of_the_masks(backend, monkeypatch):
    """Under the interpreter: value and gradients against the reference, one tile and one
    gather launch per (shape, bits) group, masks built once, and nothing cached twice."""
    import sefe_fast_kernels.reglora_penalty as gather_kernels
    import sefe_fast_kernels.reglora_tile as tile_kernels

    calls = []
    for module, name in (
        (tile_kernels, "penalty_tile_grouped"),
        (gather_kernels, "penalty_triton_grouped"),
    ):
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append((_name, len(args[0])))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    masks = _masks()
    masks["l1.q"] = merge_key_elements([masks["l1.q"]] * 2)  # positions chosen 4 times
    masks["l9.e"] = KeyElements.empty((7, 12))
    shapes = {**SHAPES, "l9.e": (7, 12)}
    gen = torch.Generator().manual_seed(5)
    factors = {
        name: (
            torch.randn(k, 3, generator=gen).requires_grad_(),
            torch.randn(3, d, generator=gen).requires_grad_(),
        )
        for name, (k, d) in shapes.items()
    }
    reference = {
        n: (B.detach().clone().requires_grad_(), A.detach().clone().requires_grad_())
        for n, (B, A) in factors.items()
    }
    expected = RegLoRA(masks, lam=3.0, backend="reference")(reference)
    expected.backward()
    reg = RegLoRA(masks, lam=3.0, backend="triton")
    value = reg._grouped_triton(factors, backend) * (3.0 / len(masks))
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    value.backward()
    for name in shapes:
        for got, want in zip(factors[name], reference[name]):
            assert torch.allclose(got.grad, want.grad, rtol=1e-4, atol=1e-6), name
    groups = reg.device_groups("cpu", 3, torch.float32, backend)
    launches = sum(bool(g.bits) + (g.extra is not None) for _, g in groups)
    assert len(calls) == launches and len(groups) <= 3 * len(reg.groups())
    if backend == "triton_gather":
        assert all(g.bits == 0 and g.planes == () for _, g in groups)
    if backend == "triton_tile":
        assert all(g.bits in (1, 2, 4) for _, g in groups)
    # built once: a second call reuses the same groups; the empty mask is in none of them
    reg._grouped_triton(factors, backend)
    assert reg.device_groups("cpu", 3, torch.float32, backend) is groups
    assert all("l9.e" not in names for names, _ in groups)
    # one copy: no plan cached on any KeyElements, and every held byte belongs to exactly
    # one tensor of the groups (no tensor, hence no storage, counted twice)
    assert all(not ke._plans for ke in masks.values())
    held = [t for _, g in groups for t in g.tensors()]
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held if t.numel()
    }
    assert reg.device_nbytes() == sum(t.numel() * t.element_size() for t in held)
    assert sum(storages.values()) == reg.device_nbytes()


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(10, 12), "down_proj": nn.Linear(12, 7)})
            for _ in range(2)
        )

    def forward(self, x):
        return x


def _peft_model(seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_Tiny(), LoraConfig(r=3, target_modules=["q_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft initialises B to 0; make ΔW non-trivial
            nn.init.normal_(param)
    return model


def test_lora_factors_finds_peft_layers_with_stable_names():
    model = _peft_model()
    factors = lora_factors(model)
    assert sorted(factors) == sorted(
        f"layers.{i}.{m}" for i in range(2) for m in ("q_proj", "down_proj")
    )
    B, A = factors["layers.0.down_proj"]
    assert B.shape == (7, 3) and A.shape == (3, 12)
    module = model.base_model.model.layers[0]["down_proj"]
    assert B is module.lora_B["default"].weight and A is module.lora_A["default"].weight
    # after merging and attaching a fresh LoRA for the next task, the names are the same
    from peft import LoraConfig, get_peft_model

    fresh = get_peft_model(
        model.merge_and_unload(), LoraConfig(r=3, target_modules=["q_proj", "down_proj"])
    )
    assert sorted(lora_factors(fresh)) == sorted(factors)
    assert sorted(lora_factors(fresh.base_model)) == sorted(factors)  # LoraModel too
    with pytest.raises(ValueError, match="no adapter 'other'"):
        lora_factors(model, adapter_name="other")


def test_collect_key_elements_selects_every_matrix_and_feeds_the_regularizer():
    model = _peft_model(1)
    selected = collect_key_elements(model, ratio=0.1)
    factors = lora_factors(model)
    assert sorted(selected) == sorted(factors)
    for name, (B, A) in factors.items():
        expected = select_key_elements(B.detach(), A.detach(), 0.1)
        assert torch.equal(selected[name].linear(), expected.linear())
    reg = RegLoRA(selected, lam=1.0)
    value = reg(lora_factors(model))
    direct = sum(reglora_penalty(B, A, selected[n]) for n, (B, A) in factors.items()) / 4
    assert value.item() == pytest.approx(direct.item(), rel=1e-6)
    value.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
