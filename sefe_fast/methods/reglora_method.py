"""`reglora`: RegLoRA — penalise the new LoRA's ΔW at earlier tasks' key positions.

After each task the top M % |B·A| positions of every LoRA matrix are kept
(`collect_key_elements`), saved in the run directory (`run_layout.key_elements_path`), and concatenated with the
earlier tasks' positions (`merge_key_elements`, duplicates kept). While training later
tasks, L_reg = λ · mean over matrices of the mean |ΔW| at those positions
(`sefe_fast.reglora.RegLoRA`). Task 1 has no penalty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sefe_fast.methods.base import ContinualMethod
from sefe_fast.reglora import (
    RegLoRA,
    collect_key_elements,
    load_key_elements,
    lora_factors,
    merge_key_elements,
    save_key_elements,
)
from sefe_fast.run_layout import key_elements_path, relative_to_run, resolve_in_run


class RegLoRAMixin(ContinualMethod):
    """Keeps the merged key elements of the tasks so far and adds the penalty."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.files: list[str] = []  # per-task key-element files, in task order
        self.merged: dict[str, Any] = {}  # module name -> KeyElements of all earlier tasks
        self.penalty = None  # RegLoRA callable for the current task (None on task 1)

    def before_task(self, model: torch.nn.Module, task: str, stage: int) -> None:
        """Build the penalty from the key elements of every earlier task."""
        super().before_task(model, task, stage)
        self.penalty = None
        if self.merged:
            self.penalty = RegLoRA(
                self.merged,
                lam=self.config.reg_lambda,
                backend=self.config.reg_backend,
                gpu_budget_gb=self.config.reg_gpu_budget_gb,
            )

    def extra_loss(self, model: torch.nn.Module, step: int) -> torch.Tensor | None:
        """λ-weighted penalty on the current LoRA factors (None before any key elements)."""
        base = super().extra_loss(model, step)
        if self.penalty is None:
            return base
        term = self.penalty(lora_factors(model))
        return term if base is None else base + term

    def after_task(
        self, model: torch.nn.Module, task: str, stage: int, run_dir: Path, write: bool
    ) -> None:
        """Select this task's key elements, save them (rank 0) and merge them into the set."""
        super().after_task(model, task, stage, run_dir, write)
        selected = collect_key_elements(model, self.config.mask_ratio)
        if not selected:
            raise ValueError(f"{task}: the model has no LoRA matrices to select key elements from")
        path = key_elements_path(run_dir, stage, task)
        if write:
            save_key_elements(selected, path)
        self.files.append(relative_to_run(run_dir, path))
        self._merge_in(selected)

    def _merge_in(self, selected: dict[str, Any]) -> None:
        if self.merged and set(selected) != set(self.merged):
            raise ValueError(
                "key elements cover other LoRA matrices than earlier tasks': "
                f"{sorted(set(selected) ^ set(self.merged))[:4]}"
            )
        self.merged = {
            name: merge_key_elements([self.merged[name], ke]) if name in self.merged else ke
            for name, ke in selected.items()
        }

    def state_dict(self) -> dict[str, Any]:
        """The key-element files of the tasks so far (the positions live in those files)."""
        return {**super().state_dict(), "key_element_files": list(self.files)}

    def load_state_dict(self, state: dict[str, Any], run_dir: Path) -> None:
        """Reload and re-merge the key elements of the completed tasks (files in `run_dir`)."""
        super().load_state_dict(state, run_dir)
        self.files, self.merged = [], {}
        for stored in state.get("key_element_files", []):
            path = resolve_in_run(run_dir, stored)
            self._merge_in(load_key_elements(path))
            self.files.append(relative_to_run(run_dir, path))

    def describe(self) -> dict[str, Any]:
        """Name, λ, mask ratio and penalty backend."""
        return {
            **super().describe(),
            "reg_lambda": self.config.reg_lambda,
            "mask_ratio": self.config.mask_ratio,
            "reg_backend": self.config.reg_backend,
        }


class RegLoRAMethod(RegLoRAMixin):
    """Original data, RegLoRA penalty."""

    name = "reglora"
    summary = "LoRA penalised at the top-M% |B·A| positions of earlier tasks (RegLoRA)"
