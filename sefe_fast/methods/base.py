"""The seam between the continual trainer and a continual-learning method.

The trainer calls, for each task in order:

    train_file = method.prepare_train_file(task, train_json, work_dir)   # rank 0 first
    method.before_task(model, task, stage)          # model: fresh LoRA attached
    ... every optimizer step: loss += method.extra_loss(model, step) (if not None)
    method.after_task(model, task, stage, run_dir, write=is_main)   # before the merge
    state = method.state_dict()                     # saved with the run, for resume

A method changes nothing else, so O-LoRA, SMoLoRA or MoELoRA can be added as one more
module implementing these hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sefe_fast import paper_defaults as paper
from sefe_fast.memory_budget import DEFAULT_BUDGET_GB


@dataclass(frozen=True)
class MethodConfig:
    """Hyperparameters every method may read (defaults: the paper's).

    reg_lambda: λ of the RegLoRA penalty; mask_ratio: fraction M of ΔW entries kept as key
    elements per matrix (0.02 = 2 %); asd_ratio: fraction X of training samples rewritten
    into the other answer styles (0.2 = 20 %); reg_backend: the penalty implementation;
    reg_gpu_budget_gb: GB the GPU backends' device masks may keep (RegLoRA gpu_budget_gb);
    seed: seeds the ASD conversion.
    """

    reg_lambda: float = paper.REG_LAMBDA
    mask_ratio: float = paper.MASK_RATIO
    asd_ratio: float = paper.ASD_RATIO
    reg_backend: str = "auto"
    reg_gpu_budget_gb: float = DEFAULT_BUDGET_GB
    seed: int = 0
    olora_lambda1: float = paper.OLORA_LAMBDA1
    olora_lambda2: float = paper.OLORA_LAMBDA2


class ContinualMethod:
    """Plain sequential fine-tuning: every hook does nothing. Subclasses override hooks."""

    name = "base"

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    def prepare_train_file(self, task: str, train_json: Path, work_dir: Path) -> Path:
        """The training file to use for `task` (the original one here)."""
        return train_json

    def before_task(self, model: torch.nn.Module, task: str, stage: int) -> None:
        """Called once the task's fresh LoRA is attached, before the first step."""

    def extra_loss(self, model: torch.nn.Module, step: int) -> torch.Tensor | None:
        """A term added to the loss at optimizer step `step` (None: nothing to add)."""
        return None

    def after_task(
        self, model: torch.nn.Module, task: str, stage: int, run_dir: Path, write: bool
    ) -> None:
        """Called after the task's training, before the LoRA is merged. `write`: rank 0."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state needed to resume after a completed stage."""
        return {}

    def load_state_dict(self, state: dict[str, Any], run_dir: Path) -> None:
        """Restore what `state_dict` returned (files it names are relative to `run_dir`)."""

    def describe(self) -> dict[str, Any]:
        """The method's name and the hyperparameters it uses (for results.json)."""
        return {"name": self.name}
