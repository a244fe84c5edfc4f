"""`olora`: O-LoRA — keep each new LoRA's input subspace orthogonal to earlier tasks'.

O-LoRA (Wang et al., 2023) freezes the LoRA of every earlier task and trains a new one with

    L = L_CE + λ1 · Σ_modules Σ_{i,j} |(A_old · A_newᵀ)[i, j]|
             + λ2 · Σ_modules (‖A_new‖_F + ‖B_new‖_F)

where A_old (R×d) is the concatenation along the rank of the earlier tasks' lora_A (r×d
each; R = r · #earlier tasks). After the task the new factors are concatenated to the old
ones along the rank (A: dim 0, B: dim 1). λ1 = 0.5 and λ2 = 0 in O-LoRA's paper and public
scripts; its L2 term is the plain (not squared) Frobenius norm of every new factor, applied
on every task including the first (it only involves the new LoRA).

Here the trainer merges each task's scaled B·A into the weights, so the model computes
W0 + Σ_i s·B_i·A_i — exactly what O-LoRA's concatenated adapter [B_1 … B_t]·[A_1; …; A_t]
computes. The penalty needs only the A's, so only they are kept: after each task its
lora_A of every LoRA module is appended to that module's A_old (fp32, on the CPU, and once
per task on the training device). Each task's A's are saved to
`run_dir/olora/stage{NN}_{task}.safetensors`; the resume state lists those files and
`load_state_dict` concatenates them again, in task order.

Memory: A_old holds R·d fp32 values per module (LLaVA-7B, r = 128, after 7 tasks: about
4.1 GB on the CPU and again on the device). Cost per step: one R×r matrix product per module.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from sefe_fast.io_utils import atomic_path
from sefe_fast.methods.base import ContinualMethod, MethodConfig
from sefe_fast.reglora import lora_factors
from sefe_fast.run_layout import olora_path, relative_to_run, resolve_in_run

FORMAT_NAME = "sefe_fast.olora_subspace"
FORMAT_VERSION = "1"
Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


class OLoRAFileError(ValueError):
    """An O-LoRA subspace file is unreadable, corrupt, or does not fit the earlier tasks'."""


def _check_lambda(value: Any, field: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"MethodConfig.{field} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"MethodConfig.{field} must be finite and >= 0, got {value}")
    return value


def orthogonality_penalty(a_old: Mapping[str, torch.Tensor], factors: Factors) -> torch.Tensor:
    """Σ_modules Σ_{i,j} |(A_old · A_newᵀ)[i, j]| as a 0-dim fp32 tensor (no λ1).

    `a_old`: module name -> R×d earlier-task rows (on the factors' device); `factors`: module
    name -> (lora_B k×r, lora_A r×d) of the current LoRA, covering exactly the names of
    `a_old`. One R×r product per module, computed in fp32 outside autocast.
    """
    _check_names(a_old, factors)
    first = next(iter(factors.values()))[1]
    with torch.autocast(device_type=first.device.type, enabled=False):
        sums = []
        for name, old in a_old.items():
            new = factors[name][1]
            if new.ndim != 2 or new.shape[1] != old.shape[1]:
                raise ValueError(
                    f"{name}: lora_A has shape {tuple(new.shape)}, earlier tasks' A has "
                    f"{tuple(old.shape)} (the input size d must match)"
                )
            sums.append(torch.mm(old, new.float().t()).abs().sum())
        return torch.stack(sums).sum()


def l2_penalty(factors: Factors) -> torch.Tensor:
    """Σ_modules (‖A_new‖_F + ‖B_new‖_F) as a 0-dim fp32 tensor (O-LoRA's `torch.norm(p=2)`)."""
    if not factors:
        raise ValueError("the model has no LoRA factors to take the L2 norm of")
    first = next(iter(factors.values()))[1]
    with torch.autocast(device_type=first.device.type, enabled=False):
        norms = [
            torch.linalg.vector_norm(w.float())
            for lora_B, lora_A in factors.values()
            for w in (lora_A, lora_B)
        ]
        return torch.stack(norms).sum()


def _check_names(expected: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise ValueError(
            "O-LoRA: the current LoRA modules do not match the earlier tasks': "
            f"missing {missing[:4]}, unexpected {extra[:4]}"
        )


def save_subspace(a_new: Mapping[str, torch.Tensor], path: Path, stage: int, task: str) -> None:
    """Write one task's lora_A (module name -> r×d fp32) to the safetensors file `path`."""
    tensors = {name: a.detach().float().cpu().contiguous() for name, a in a_new.items()}
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "stage": str(stage),
        "task": task,
        "shapes": json.dumps({name: list(t.shape) for name, t in tensors.items()}),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_subspace(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a file written by `save_subspace`; OLoRAFileError naming the file and matrix."""
    path = Path(path)
    if not path.is_file():
        raise OLoRAFileError(f"{path}: O-LoRA subspace file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT_NAME or metadata.get("version") != FORMAT_VERSION:
                raise OLoRAFileError(
                    f"{path}: not an O-LoRA subspace file (format {metadata.get('format')!r}, "
                    f"version {metadata.get('version')!r})"
                )
            shapes = json.loads(metadata["shapes"])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not iterable)
    except OLoRAFileError:
        raise
    except Exception as exc:  # safetensors/json raise their own types for corrupt files
        raise OLoRAFileError(f"{path}: cannot read O-LoRA subspace ({exc})") from exc
    if set(shapes) != set(tensors):
        raise OLoRAFileError(f"{path}: index and tensors name different matrices")
    for name, a in tensors.items():
        if a.dtype != torch.float32 or a.ndim != 2 or list(a.shape) != shapes[name]:
            raise OLoRAFileError(
                f"{path}: matrix {name!r} is {a.dtype} {tuple(a.shape)}, expected float32 "
                f"{tuple(shapes[name])}"
            )
        if not torch.isfinite(a).all():
            raise OLoRAFileError(f"{path}: matrix {name!r} has non-finite values")
    return tensors


class OLoRAMethod(ContinualMethod):
    """Original data; O-LoRA orthogonality penalty against the earlier tasks' lora_A."""

    name = "olora"
    summary = "O-LoRA: each new LoRA's lora_A kept orthogonal to earlier tasks' (λ1)"

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        # MethodConfig may not have these fields yet: the paper's values are the defaults.
        self.lambda1 = _check_lambda(config.olora_lambda1, "olora_lambda1")
        self.lambda2 = _check_lambda(config.olora_lambda2, "olora_lambda2")
        self.files: list[str] = []  # per-task subspace files, in task order
        self.a_old: dict[str, torch.Tensor] = {}  # module -> R×d fp32 CPU, all earlier tasks
        self._device_a_old: dict[str, torch.Tensor] = {}  # a_old on the training device
        self._model: nn.Module | None = None  # the model whose factors are cached
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ hooks

    def before_task(self, model: nn.Module, task: str, stage: int) -> None:
        """Check the fresh LoRA against A_old and put A_old on its device (once per task)."""
        super().before_task(model, task, stage)
        self._bind(model)

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        """λ1·orthogonality (from task 2 on) + λ2·L2 (if λ2 > 0); None when both are off."""
        base = super().extra_loss(model, step)
        if model is not self._model:
            self._bind(model)
        terms = []
        if self._device_a_old and self.lambda1 > 0:
            terms.append(self.lambda1 * orthogonality_penalty(self._device_a_old, self._factors))
        if self.lambda2 > 0:
            terms.append(self.lambda2 * l2_penalty(self._factors))
        if base is not None:
            terms.append(base)
        return torch.stack(terms).sum() if terms else None

    def after_task(
        self, model: nn.Module, task: str, stage: int, run_dir: Path, write: bool
    ) -> None:
        """Append this task's lora_A to A_old and save it (rank 0), before the merge."""
        super().after_task(model, task, stage, run_dir, write)
        factors = lora_factors(model)
        if not factors:
            raise ValueError(f"{task}: the model has no LoRA matrices to keep for O-LoRA")
        a_new = {}
        for name, (_, lora_A) in factors.items():
            a = lora_A.detach().float().cpu().clone()
            if not torch.isfinite(a).all():
                raise ValueError(f"{task}: lora_A of {name} has non-finite values")
            a_new[name] = a
        path = olora_path(run_dir, stage, task)
        if write:
            save_subspace(a_new, path, stage, task)
        self._append(a_new, str(path))
        self.files.append(relative_to_run(run_dir, path))
        self._unbind()

    def state_dict(self) -> dict[str, Any]:
        """The subspace files of the tasks so far (the matrices live in those files)."""
        return {**super().state_dict(), "olora_files": list(self.files)}

    def load_state_dict(self, state: dict[str, Any], run_dir: Path) -> None:
        """Reload and re-concatenate the lora_A of the completed tasks, in task order (files
        in `run_dir`)."""
        super().load_state_dict(state, run_dir)
        self.files, self.a_old = [], {}
        self._unbind()
        stored = state.get("olora_files", [])
        for name in tqdm(stored, desc="O-LoRA subspaces", unit="task", disable=len(stored) < 2):
            path = resolve_in_run(run_dir, name)
            self._append(load_subspace(path), str(path))
            self.files.append(relative_to_run(run_dir, path))

    def describe(self) -> dict[str, Any]:
        """Name, λ1, λ2 and the stored rank R per module (R = r · #tasks kept)."""
        ranks = sorted({a.shape[0] for a in self.a_old.values()})
        return {
            **super().describe(),
            "olora_lambda1": self.lambda1,
            "olora_lambda2": self.lambda2,
            "olora_stored_ranks": ranks,
        }

    # ------------------------------------------------------------------ helpers

    def _append(self, a_new: dict[str, torch.Tensor], source: str) -> None:
        """Concatenate one task's r×d rows under every module's A_old (O-LoRA's rank concat)."""
        if self.a_old:
            try:
                _check_names(self.a_old, a_new)
            except ValueError as exc:
                raise ValueError(f"{source}: {exc}") from None
        for name, a in a_new.items():
            old = self.a_old.get(name)
            if old is not None and old.shape[1] != a.shape[1]:
                raise ValueError(
                    f"{source}: {name} has input size {a.shape[1]}, earlier tasks' {old.shape[1]}"
                )
        self.a_old = {
            name: a if name not in self.a_old else torch.cat([self.a_old[name], a], dim=0)
            for name, a in a_new.items()
        }

    def _bind(self, model: nn.Module) -> None:
        """Cache the model's LoRA factors and A_old on their device (fp32), checking shapes."""
        factors = lora_factors(model)
        if self.a_old:
            _check_names(self.a_old, factors)
        device_a_old = {}
        for name, old in self.a_old.items():
            lora_A = factors[name][1]
            if lora_A.ndim != 2 or lora_A.shape[1] != old.shape[1]:
                raise ValueError(
                    f"{name}: lora_A has shape {tuple(lora_A.shape)}, earlier tasks' A has "
                    f"{tuple(old.shape)} (the input size d must match)"
                )
            device_a_old[name] = old.to(lora_A.device, torch.float32)
        self._model, self._factors, self._device_a_old = model, factors, device_a_old

    def _unbind(self) -> None:
        self._model, self._factors, self._device_a_old = None, {}, {}
