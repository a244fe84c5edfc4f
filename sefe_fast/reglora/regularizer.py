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
from sefe_fast.memory_budget import (
    DEFAULT_BUDGET_GB,
    Option,
    budget_bytes,
    choose_under_budget,
    guarded_options,
)
from sefe_fast.position_plan import MaskStats, PositionPlan
from sefe_fast.reglora.device_mask import (
    PLANE_BITS,
    PLANE_CAPS,
    DeviceMaskGroup,
    build_device_mask_group,
    mask_statistics,
    representation_nbytes,
)
from sefe_fast.reglora.key_elements import KeyElements
from sefe_fast.reglora.penalty import (
    MASK_KERNELS,
    _zero_penalty,
    check_key_elements,
    penalty_mask_group,
    penalty_unchecked,
    resolve_backend,
)
from sefe_fast.reglora.selection import select_key_elements
from sefe_fast.reglora.validation import check_factors
from sefe_fast.roofline import gpu_named, matrix_step_time, preferred_kernel

# GPU backends -> the DeviceMask kernel they ask for ("auto": the roofline model decides)
GPU_KERNELS = MASK_KERNELS
DEFAULT_GPU_BUDGET_GB = DEFAULT_BUDGET_GB  # RunConfig.reg_gpu_budget_gb's default
Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


class RegLoRA:
    """λ/N · Σ penalty over the LoRA matrices, given the merged masks of earlier tasks.

    `key_elements`: matrix name -> KeyElements (merged over all earlier tasks). Called with
    the current factors (name -> (lora_B k×r, lora_A r×d)) it returns a 0-dim fp32 tensor,
    differentiable in every factor. The factors must cover exactly the regularized names
    (an empty regularizer — the first task — returns 0 for any factors).

    CPU ("torch"/"reference"): matrix by matrix, on the CPU PositionPlan each KeyElements
    caches. GPU ("triton", "triton_tile", "triton_gather"): on the first call the masks
    are built once, by streaming, into `DeviceMaskGroup`s on the factors' device — one per
    (shape, bits), the tile-or-gather choice made per shape group by the roofline model
    ("triton") or forced — and each group is one launch of the tile kernels on its planes
    plus one of the gather kernels on its extra lists. Those groups are the only copy of
    the masks kept besides the gap-coded KeyElements (`device_nbytes()` counts them).

    `gpu_budget_gb`: the resident bytes (GB, 10⁹) all device masks together may take. Each
    tile-kernel matrix gets the plane (1-bit + list, 2-bit + list, 4-bit + list) that
    `sefe_fast.memory_budget.choose_under_budget` picks: the smallest first, then upgrades
    in order of modelled ms saved per byte added while the total fits. A matrix whose
    smallest form alone exceeds the budget still gets that form. Whatever the budget, no
    matrix gets a form larger than its 4-bit form or than its official int64 pairs
    (unless that is its smallest), so the totals stay ≤ the 4-bit plane's and ≤ vanilla's.
    """

    def __init__(
        self,
        key_elements: Mapping[str, KeyElements],
        lam: float = paper_defaults.REG_LAMBDA,
        backend: str = "auto",
        gpu_budget_gb: float = DEFAULT_GPU_BUDGET_GB,
    ) -> None:
        for name, ke in key_elements.items():
            if not isinstance(ke, KeyElements):
                raise TypeError(f"{name}: expected KeyElements, got {type(ke).__name__}")
        resolve_backend(backend, torch.device("cpu"))  # validates the name
        self.key_elements: dict[str, KeyElements] = dict(key_elements)
        self.lam = float(lam)
        self.backend = backend
        self.gpu_budget_bytes = budget_bytes(gpu_budget_gb)
        self._device_key: tuple | None = None
        self._device_groups: list[tuple[list[str], DeviceMaskGroup]] = []
        self._empty_names: list[str] = []  # matrices whose merged mask holds no position

    def __len__(self) -> int:
        return len(self.key_elements)

    def groups(self) -> list[tuple[tuple[int, int], list[str]]]:
        """(shape, names) for each distinct (k, d), in first-seen order of the names."""
        grouped: OrderedDict[tuple[int, int], list[str]] = OrderedDict()
        for name, ke in self.key_elements.items():
            grouped.setdefault(ke.shape, []).append(name)
        return list(grouped.items())

    def plans(self) -> dict[str, PositionPlan]:
        """The (cached) CPU PositionPlan of every matrix, as the torch backend uses them."""
        return {name: ke.plan() for name, ke in self.key_elements.items()}

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
        lora_B = next(iter(factors.values()))[0]
        backend = resolve_backend(self.backend, lora_B.device)
        if backend in GPU_KERNELS:
            total = self._grouped_triton(factors, backend)
        else:
            total = torch.stack(
                [self._penalty(name, *factors[name]) for name in self.key_elements]
            ).sum()
        return total * (self.lam / len(self.key_elements))

    def device_groups(
        self,
        device: torch.device | str,
        rank: int,
        factor_dtype: torch.dtype,
        backend: str = "triton",
        gpu: str | None = None,
        gpu_budget_gb: float | None = None,
    ) -> list[tuple[list[str], DeviceMaskGroup]]:
        """(names, DeviceMaskGroup) per (shape, bits) on `device`: built on first use, then
        reused; a request for another device/rank/dtype/backend/budget replaces them (one
        copy). `gpu_budget_gb`: None for the regularizer's own budget."""
        if backend not in GPU_KERNELS:
            raise ValueError(f"device groups need one of {tuple(GPU_KERNELS)}, got {backend!r}")
        budget = self.gpu_budget_bytes if gpu_budget_gb is None else budget_bytes(gpu_budget_gb)
        key = (str(torch.device(device)), int(rank), factor_dtype, backend, gpu, budget)
        if self._device_key == key:
            return self._device_groups
        self._device_groups = []  # drop the old copy before building the new one
        self._device_key = None
        self._empty_names = []
        stats: dict[str, MaskStats] = {}
        kernels: dict[tuple[int, int], str] = {}
        for shape, names in self.groups():
            group_stats = {name: mask_statistics(self.key_elements[name]) for name in names}
            self._empty_names += [n for n, s in group_stats.items() if not s.n_total]
            group_stats = {n: s for n, s in group_stats.items() if s.n_total}  # empty: 0
            if group_stats:
                kernels[shape] = self._group_kernel(
                    shape, list(group_stats.values()), backend, rank, factor_dtype, gpu
                )
                stats.update(group_stats)
        bits_of = self.choose_planes(stats, kernels, rank, factor_dtype, gpu, budget)
        built: list[tuple[list[str], DeviceMaskGroup]] = []
        for _shape, names in self.groups():
            by_bits: OrderedDict[int, list[str]] = OrderedDict()
            for name in names:
                if name in bits_of:
                    by_bits.setdefault(bits_of[name], []).append(name)
            for bits, members in by_bits.items():
                group = build_device_mask_group(
                    [self.key_elements[n] for n in members],
                    bits,
                    device,
                    [stats[n] for n in members],
                )
                built.append((members, group))
        self._device_groups, self._device_key = built, key
        return built

    @staticmethod
    def choose_planes(
        stats: Mapping[str, MaskStats],
        kernels: Mapping[tuple[int, int], str],
        rank: int,
        factor_dtype: torch.dtype,
        gpu: str | None,
        budget: int,
    ) -> dict[str, int]:
        """name -> plane bits (0: gather kernels only) for every non-empty mask: gather-kernel
        shapes get 0; tile-kernel matrices the budget policy's choice among the planes, each
        form modelled (`sefe_fast.roofline.matrix_step_time`) at the mask's own densities
        and sized exactly as it will be built (`representation_nbytes`)."""
        model_gpu = gpu_named(gpu)
        names = list(stats)
        items = []
        for name in names:
            s = stats[name]
            k, d = s.shape
            if kernels[s.shape] == "gather":
                items.append([Option(0, representation_nbytes(s, 0), 0.0)])
                continue
            options = []
            for bits in PLANE_BITS:
                listed = s.above[PLANE_CAPS[bits]] / (k * d)
                seconds = matrix_step_time(
                    "tile", k, d, rank, 0.0, listed, factor_dtype, model_gpu, bits
                )
                options.append(Option(bits, representation_nbytes(s, bits), seconds))
            # the guarantees: never above the 4-bit form nor the official int64 pairs
            # (16 B per position), unless nothing else is left
            items.append(guarded_options(options, min(options[-1].nbytes, 16 * s.n_total)))
        choice = choose_under_budget(items, budget)
        return {n: items[i][c].label for i, (n, c) in enumerate(zip(names, choice.chosen))}

    @staticmethod
    def _group_kernel(shape, stats, backend, rank, factor_dtype, gpu) -> str:
        """'tile' or 'gather' for a shape group: forced by the backend, or the roofline
        model's choice at the group's mean densities."""
        if backend != "triton":
            return GPU_KERNELS[backend]
        k, d = shape
        entries = k * d * len(stats)
        unique = sum(s.num_unique for s in stats) / entries
        listed = sum(s.above[1] for s in stats) / entries  # the 1-bit plane's list
        return preferred_kernel(k, d, rank, unique, factor_dtype, gpu, listed)

    def device_nbytes(self) -> int:
        """Bytes of every tensor the GPU path keeps between steps (0 before its first call)."""
        return sum(group.nbytes for _, group in self._device_groups)

    def _grouped_triton(self, factors: Factors, backend: str) -> torch.Tensor:
        """Σ penalties: per (shape, bits) group one tile launch on the planes and one gather
        launch on the extra lists (`penalty_mask_group`), each with the masks' 1/n_total."""
        lora_B = next(iter(factors.values()))[0]
        groups = self.device_groups(lora_B.device, lora_B.shape[1], lora_B.dtype, backend)
        parts = [
            penalty_mask_group(
                [factors[n][0] for n in names], [factors[n][1] for n in names], group
            ).sum()
            for names, group in groups
        ]
        # empty masks: exactly 0 with zero gradients, as on the other backends
        parts += [_zero_penalty(*factors[name]) for name in self._empty_names]
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
