"""The seam between the continual trainer and a continual-learning method.

A method owns two things: what it trains in a task (the adapter lifecycle) and what it
adds around the training (data, loss, state). The trainer calls `method.bind_model(bundle)`
once, then, for each task in order:

    train_file = method.prepare_train_file(task, train_json, work_dir)   # rank 0 first
    model = method.attach(model, cfg)               # e.g. a fresh LoRA on the plain model
    method.before_task(model, task, stage)
    for phase in method.phases(cfg, stage, task, run_dir):    # by default one: TRAIN
        method.begin_phase(model, phase, stage, task, run_dir)
        groups = method.trainable_groups(model, cfg)    # AdamW groups: what trains, at what lr
        ... every optimizer step: loss += method.extra_loss(model, step) (if not None),
            and after it method.after_step(model)
        method.end_phase(model, phase, stage, task, run_dir, write=is_main)
    method.save_stage(model, stage_dir, write=is_main)   # every rank; rank 0 writes
    method.after_task(model, task, stage, run_dir, write=is_main)
    model = method.finish_stage(model)              # back to a plain model (e.g. merged)
    method.before_predictions(model, eval_task)     # before each evaluated task's answers
    state = method.state_dict()                     # saved with the run, for resume

A completed stage is replayed on resume as `finish_stage(load_stage(model, stage_dir))`;
a stage trained but not yet evaluated (`is_stage_saved(stage_dir)`) is loaded instead of
trained again. A phase other than TRAIN (LoTA's calibration fine-tune) runs
`phase.max_steps` optimizer steps with its own in-task checkpoint; a method leaves it out
of `phases` once its result is saved, so a resumed task goes on from there. `cfg` is the
run's settings (`sefe_fast.train.config.RunConfig`, read
only; `TrainingSettings` names what the default hooks read).

The defaults below are plain sequential LoRA (docs/reference.md §3): a fresh LoRA (r,
alpha, dropout from cfg) on the LLM's linear layers, trained at `cfg.lr` with the
projector at `cfg.projector_lr`, saved in PEFT format (adapter_config.json +
adapter_model.safetensors) with `projector.safetensors` beside it, merged after the task.
A method that trains something else (full fine-tuning, a sparse mask, a mixture of
experts that stays unmerged) overrides the adapter hooks; one that only adds a loss or
swaps the data (RegLoRA, ASD, O-LoRA) overrides the others. Adding a method is one module
here plus one line in `registry.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from sefe_fast import paper_defaults as paper
from sefe_fast.memory_budget import DEFAULT_BUDGET_GB
from sefe_fast.model.lora import (
    PROJECTOR_FILE,
    attach_lora,
    load_adapter,
    load_projector,
    lora_parameters,
    merge_lora,
    projector_parameters,
    save_adapter,
)


@dataclass(frozen=True)
class Phase:
    """One training run inside a task: `name` (TRAIN is the task's training itself) and its
    length, `max_steps` optimizer steps or else `epochs` passes (both None: the task's)."""

    name: str
    max_steps: int | None = None
    epochs: float | None = None


TRAIN = Phase("train")


class TrainingSettings(Protocol):
    """The run settings the default adapter hooks read (RunConfig has them all)."""

    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lr: float
    projector_lr: float


def projector_group(model: torch.nn.Module, cfg: TrainingSettings) -> list[dict[str, Any]]:
    """The projector's AdamW group at `cfg.projector_lr` ([] when it has nothing to train)."""
    params = projector_parameters(model)
    return [{"params": params, "lr": cfg.projector_lr, "name": "proj"}] if params else []


@dataclass(frozen=True)
class MethodConfig:
    """Hyperparameters every method may read (defaults: the paper's).

    reg_lambda: λ of the RegLoRA penalty; mask_ratio: fraction M of ΔW entries kept as key
    elements per matrix (0.02 = 2 %); asd_ratio: fraction X of training samples rewritten
    into the other answer styles (0.2 = 20 %); reg_backend: the penalty implementation;
    reg_gpu_budget_gb: GB the GPU backends' device masks may keep (RegLoRA gpu_budget_gb);
    seed: seeds the ASD conversion; mixture_experts: LoRA experts per layer of moelora and
    smolora (None: their published 8).
    """

    reg_lambda: float = paper.REG_LAMBDA
    mask_ratio: float = paper.MASK_RATIO
    asd_ratio: float = paper.ASD_RATIO
    reg_backend: str = "auto"
    reg_gpu_budget_gb: float = DEFAULT_BUDGET_GB
    seed: int = 0
    olora_lambda1: float = paper.OLORA_LAMBDA1
    olora_lambda2: float = paper.OLORA_LAMBDA2
    lota_sparsity: float | None = None  # None: paper.LOTA_SPARSITY
    mixture_experts: int | None = None


class ContinualMethod:
    """Plain sequential LoRA: a fresh LoRA per task, merged after it; the other hooks do
    nothing. Subclasses override hooks."""

    name = "base"
    summary = "no method: the default hooks (a subclass names itself and says what it does)"
    supports_fsdp = True  # False: `--fsdp` is refused before any work (the CLI checks it)
    # False when a token's output depends on later tokens of its sample (SMoLoRA's
    # per-sample routing): the trainer then runs every sequence whole, without computing a
    # prompt prefix shared by the batch once.
    shares_prompt_prefix = True

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    @classmethod
    def settings_problems(cls, values: dict[str, Any]) -> list[str]:
        """What is wrong with the run's settings (RunConfig field → value) for this method,
        one message per problem naming the flags: checked with the flags, before any
        work."""
        return []

    def bind_model(self, bundle: Any) -> None:
        """Called once with the run's `ModelBundle` (model, tokenizer, image processor),
        before the first stage: a method that reads the tokenizer keeps it here."""

    def prepare_train_file(self, task: str, train_json: Path, work_dir: Path) -> Path:
        """The training file to use for `task` (the original one here)."""
        return train_json

    # ------------------------------------------------------------------ adapter lifecycle

    def attach(self, model: torch.nn.Module, cfg: TrainingSettings) -> torch.nn.Module:
        """The model to train for the next task, from the plain (frozen) model: here a fresh
        LoRA (A kaiming-random from the torch RNG, B zero) with the projector trainable."""
        return attach_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)

    def trainable_groups(
        self, model: torch.nn.Module, cfg: TrainingSettings
    ) -> list[dict[str, Any]]:
        """AdamW parameter groups (`params`, `lr`, `name`) of the attached model: here the
        LoRA factors at `cfg.lr` and the projector at `cfg.projector_lr`."""
        lora = [{"params": lora_parameters(model), "lr": cfg.lr, "name": "lora"}]
        return lora + projector_group(model, cfg)

    def save_stage(self, model: torch.nn.Module, directory: Path, write: bool) -> None:
        """Save what the task trained into `directory` (atomically; called on every rank,
        `write` on rank 0): here the PEFT adapter plus `projector.safetensors`."""
        if write:
            save_adapter(model, directory)

    def is_stage_saved(self, directory: Path) -> bool:
        """True when `directory` holds a stage `save_stage` wrote (complete: it is written
        atomically)."""
        return (directory / "adapter_config.json").is_file()

    def load_stage(self, model: torch.nn.Module, directory: Path) -> torch.nn.Module:
        """`model` (plain) with the stage saved in `directory` on it, as `save_stage` left
        it: here wrapped in the saved LoRA (not trainable), the projector's weights loaded."""
        peft_model = load_adapter(model, directory)
        load_projector(peft_model, directory / PROJECTOR_FILE)
        return peft_model

    def finish_stage(self, model: torch.nn.Module) -> torch.nn.Module:
        """The plain, frozen model the next task starts from (evaluated after this task):
        here the LoRA merged into the weights."""
        return merge_lora(model)

    # ------------------------------------------------------------------ training hooks

    def phases(self, cfg: TrainingSettings, stage: int, task: str, run_dir: Path) -> list[Phase]:
        """The training runs of this task, in order: here the task's training alone."""
        return [TRAIN]

    def begin_phase(
        self, model: torch.nn.Module, phase: Phase, stage: int, task: str, run_dir: Path
    ) -> None:
        """Called before `phase`'s first step (and before its groups are asked for)."""

    def end_phase(
        self,
        model: torch.nn.Module,
        phase: Phase,
        stage: int,
        task: str,
        run_dir: Path,
        write: bool,
    ) -> None:
        """Called after `phase`'s last step (every rank; `write`: rank 0)."""

    def after_step(self, model: torch.nn.Module) -> None:
        """Called after every optimizer step (of every phase)."""

    def before_task(self, model: torch.nn.Module, task: str, stage: int) -> None:
        """Called once the task's model is attached (`attach`), before the first step."""

    def extra_loss(self, model: torch.nn.Module, step: int) -> torch.Tensor | None:
        """A term added to the loss at optimizer step `step` (None: nothing to add)."""
        return None

    def after_task(
        self, model: torch.nn.Module, task: str, stage: int, run_dir: Path, write: bool
    ) -> None:
        """Called after the task's training (and `save_stage`), before `finish_stage`.
        `write`: rank 0."""

    def before_predictions(self, model: torch.nn.Module, task: str) -> None:
        """Called before the model answers `task`'s test questions (after each stage)."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state needed to resume after a completed stage."""
        return {}

    def load_state_dict(self, state: dict[str, Any], run_dir: Path) -> None:
        """Restore what `state_dict` returned (files it names are relative to `run_dir`)."""

    def describe(self) -> dict[str, Any]:
        """The method's name and the hyperparameters it uses (for results.json)."""
        return {"name": self.name}
