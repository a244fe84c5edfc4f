"""The model-level RegLoRA regularizer and the helpers that connect it to a peft model.

    L_reg = λ · (1/N) · Σ_matrices penalty(B_m, A_m, key elements of m)     (docs/reference.md §2)

with N the number of regularized matrices (224 for LLaVA-7B) and λ = 2.5e3. Matrices whose
key elements are empty still count in N (they contribute 0), as in the official code.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from sefe_fast import paper_defaults
from sefe_fast.position_plan import PositionPlan
from sefe_fast.reglora.key_elements import KeyElements
from sefe_fast.reglora.penalty import (
    check_key_elements,
    load_triton_module,
    penalty_unchecked,
    resolve_backend,
)
from sefe_fast.reglora.selection import select_key_elements
from sefe_fast.reglora.validation import check_factors

Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


class RegLoRA:
    """λ/N · Σ penalty over the LoRA matrices, given the merged masks of earlier tasks.

    `key_elements`: matrix name -> KeyElements (merged over all earlier tasks). Called with
    the current factors (name -> (lora_B k×r, lora_A r×d)) it returns a 0-dim fp32 tensor,
    differentiable in every factor. The factors must cover exactly the regularized names
    (an empty regularizer — the first task — returns 0 for any factors).
    Position plans are built once per matrix and moved to the factors' device once (cached
    in the KeyElements). `groups()` lists the matrices of equal shape: with the triton
    backend and a grouped kernel available, each group is one launch.
    """

    def __init__(
        self,
        key_elements: Mapping[str, KeyElements],
        lam: float = paper_defaults.REG_LAMBDA,
        backend: str = "auto",
    ) -> None:
        for name, ke in key_elements.items():
            if not isinstance(ke, KeyElements):
                raise TypeError(f"{name}: expected KeyElements, got {type(ke).__name__}")
        resolve_backend(backend, torch.device("cpu"))  # validates the name
        self.key_elements: dict[str, KeyElements] = dict(key_elements)
        self.lam = float(lam)
        self.backend = backend
        self._grouped_plans: dict[tuple[str, tuple[int, int]], object] = {}

    def __len__(self) -> int:
        return len(self.key_elements)

    def groups(self) -> list[tuple[tuple[int, int], list[str]]]:
        """(shape, names) for each distinct (k, d), in first-seen order of the names."""
        grouped: OrderedDict[tuple[int, int], list[str]] = OrderedDict()
        for name, ke in self.key_elements.items():
            grouped.setdefault(ke.shape, []).append(name)
        return list(grouped.items())

    def plans(self, device: torch.device | str = "cpu") -> dict[str, PositionPlan]:
        """Build (or fetch the cached) PositionPlan of every matrix on `device`."""
        return {name: ke.plan(device) for name, ke in self.key_elements.items()}

    def _check(self, factors: Factors) -> None:
        missing = sorted(set(self.key_elements) - set(factors))
        extra = sorted(set(factors) - set(self.key_elements))
        if missing or extra:
            raise ValueError(
                f"RegLoRA factors do not match the regularized matrices: missing {missing}, "
                f"unexpected {extra}"
            )
        for name, pair in factors.items():
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise ValueError(f"{name}: factors must be a (lora_B, lora_A) pair")
            k, _, d = check_factors(pair[0], pair[1], name)
            check_key_elements(self.key_elements[name], (k, d), name)

    def penalties(self, factors: Factors) -> dict[str, torch.Tensor]:
        """Per-matrix penalties (0-dim fp32), without λ/N, looping matrix by matrix."""
        self._check(factors)
        return {name: self._penalty(name, *factors[name]) for name in self.key_elements}

    def _penalty(self, name: str, lora_B: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
        return penalty_unchecked(lora_B, lora_A, self.key_elements[name], self.backend)

    def __call__(self, factors: Factors) -> torch.Tensor:
        """λ/N · Σ_m penalty_m for the current factors; 0 if nothing is regularized."""
        if not self.key_elements:  # the first task: nothing to protect yet
            device = next(iter(factors.values()))[0].device if factors else "cpu"
            return torch.zeros((), dtype=torch.float32, device=device)
        self._check(factors)
        device = next(iter(factors.values()))[0].device
        backend = resolve_backend(self.backend, device)
        if backend == "triton":
            total = self._grouped_triton(factors, device)
        else:
            total = torch.stack(
                [self._penalty(name, *factors[name]) for name in self.key_elements]
            ).sum()
        return total * (self.lam / len(self.key_elements))

    def _grouped_triton(self, factors: Factors, device: torch.device) -> torch.Tensor:
        """Σ penalties with one grouped kernel launch per shape group."""
        kernels = load_triton_module()
        parts = []
        for shape, names in self.groups():
            key = (str(device), shape)
            grouped_plan = self._grouped_plans.get(key)
            if grouped_plan is None:
                grouped_plan = kernels.GroupedPositionPlan.from_plans(
                    [self.key_elements[n].plan(device) for n in names]
                )
                self._grouped_plans[key] = grouped_plan
            out = kernels.penalty_triton_grouped(
                [factors[n][0] for n in names], [factors[n][1] for n in names], grouped_plan
            )
            parts.append(out.sum() if out.ndim else out)  # per-matrix penalties or their sum
        return torch.stack(parts).sum()


def _lora_root(model: nn.Module) -> nn.Module:
    """The module whose names are stable across tasks: peft wrappers are peeled off."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraModel
    except ImportError:  # peft is a dependency, but keep plain modules usable without it
        return model
    if isinstance(model, PeftModel):
        return model.get_base_model()
    if isinstance(model, LoraModel):
        return model.model
    return model


def lora_factors(model: nn.Module, adapter_name: str = "default") -> dict[str, tuple]:
    """name -> (lora_B weight k×r, lora_A weight r×d) for every peft LoRA linear in `model`.

    Names are module paths relative to the base model (no "base_model.model." prefix), so
    they stay the same when a LoRA is merged and a fresh one is attached for the next task.
    Raises ValueError for a LoRA layer without `adapter_name` or of an unsupported kind
    (embedding/conv LoRA), instead of skipping it.
    """
    from peft.tuners.lora import LoraLayer

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in _lora_root(model).named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name not in module.lora_A:
            if adapter_name in getattr(module, "lora_embedding_A", {}):
                raise ValueError(f"{name}: embedding LoRA layers are not supported by RegLoRA")
            raise ValueError(
                f"{name}: LoRA layer has no adapter {adapter_name!r} "
                f"(adapters: {sorted(module.lora_A.keys())})"
            )
        lora_A, lora_B = module.lora_A[adapter_name], module.lora_B[adapter_name]
        if not isinstance(lora_A, nn.Linear) or not isinstance(lora_B, nn.Linear):
            raise ValueError(
                f"{name}: only linear LoRA layers are supported, got "
                f"{type(lora_A).__name__}/{type(lora_B).__name__}"
            )
        factors[name] = (lora_B.weight, lora_A.weight)
    return factors


@torch.no_grad()
def collect_key_elements(
    model: nn.Module, ratio: float = paper_defaults.MASK_RATIO, adapter_name: str = "default"
) -> dict[str, KeyElements]:
    """Select the key elements (top `ratio` of |B·A|) of every LoRA linear of a peft model."""
    factors = lora_factors(model, adapter_name)
    return {
        name: select_key_elements(lora_B.detach(), lora_A.detach(), ratio)
        for name, (lora_B, lora_A) in tqdm(factors.items(), desc="key elements", unit="matrix")
    }
