"""`lota`: Lottery Ticket Adaptation — each task trains only a sparse mask of the weights.

LoTA (Panda et al., 2024, "Lottery Ticket Adaptation: Mitigating Destructive Interference
in LLMs", arXiv 2406.16797; docs/reference.md §6), per task, on the weights LoRA targets
(q, k, v, o, gate, up, down of every LLM layer; `lora.LORA_TARGETS`):

1. calibration: a short fine-tune of those weights (and the projector) from the current
   weights W, `--lota-calibration-steps` optimizer steps (default: a tenth of the task's
   steps, or of its epochs), gives the task vector τ = W_cal − W;
2. mask extraction: per matrix, the k = int((1 − s)·rows·cols) positions of largest |τ|
   (s = `--lota-sparsity`, the paper's default 0.9: 10 % kept), chosen among the positions
   no earlier task's mask holds;
3. sparse adaptation: the weights (and the projector) are reset to W and the task is
   trained with the gradient of every position outside the mask zeroed (a hook on each
   weight, before clipping, so the gradient norm is the masked one); after every optimizer
   step the positions outside the mask are written back from W, so AdamW's decoupled weight
   decay cannot move them either — they stay exactly W.

Earlier masks (the continual rule): the official code's sequential ("constrained mask")
step zeroes the earlier mask's entries of the new task vector before its top-k and then
marks them pruned, i.e. the new mask is the top-k of |τ| over the positions earlier tasks
left free — what step 2 does. Departures: the official code takes one global threshold
over all matrices; here k is per matrix (as RegLoRA's key elements), so every matrix keeps
the same share. When fewer than k positions are still free, all free positions are kept.
The projector is trained densely in both phases (as for LoRA) and not masked.

Masks are stored in sefe_fast's compact key-element format (`reglora/storage.py`, gap-coded,
about 1 byte per position) in `run_dir/lota/stage{NN}_{task}.safetensors`, written right
after calibration so a resumed task skips it; the union of the earlier masks is kept in
memory as `KeyElements` (one segment per task). The trained weights of each stage are saved
as for fft (`weights.safetensors`: the masked matrices and the projector, whole).

Memory beyond fft's: a copy of W for the task (to compute τ and to hold the unmasked
positions), and one bool per position of the trained matrices for the mask. `--fsdp` is
not supported (the masks index whole matrices).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sefe_fast import paper_defaults as paper
from sefe_fast.methods.base import TRAIN, Phase
from sefe_fast.methods.fft import FullFineTuning, FullTrainingSettings
from sefe_fast.model.lora import LANGUAGE_MODEL_TARGET_REGEX
from sefe_fast.model.sharding import is_sharded
from sefe_fast.reglora import KeyElements, load_key_elements, merge_key_elements, save_key_elements
from sefe_fast.reglora.selection import num_selected
from sefe_fast.run_layout import lota_mask_path, relative_to_run, resolve_in_run

CALIBRATE = "calibrate"
CALIBRATION_SHARE = 0.1  # of the task's steps (or epochs), when no count is given


def target_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name → weight of every linear layer LoRA targets (the LLM's q..down projections)."""
    found = {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and re.fullmatch(LANGUAGE_MODEL_TARGET_REGEX, name)
    }
    if not found:
        raise ValueError("lota: the model has no LLM projections LoRA would target")
    return found


def select_sparse_mask(
    task_vector: torch.Tensor, keep: float, used: torch.Tensor | None = None
) -> torch.Tensor:
    """Row-major linear indices (int64, CPU, unordered) of the k = int(keep·numel) largest
    |task_vector| entries among the positions `used` (a bool matrix, or None) leaves free;
    all free positions when fewer than k are free."""
    if task_vector.ndim != 2:
        raise ValueError(f"task vector must be a matrix, got shape {tuple(task_vector.shape)}")
    score = task_vector.detach().abs().float().flatten()
    k = num_selected(tuple(task_vector.shape), keep)
    if used is not None:
        used = used.flatten().to(score.device)
        score = score.masked_fill(used, -1.0)  # below every |τ|: never chosen while free remain
        k = min(k, score.numel() - int(used.sum()))
    if k <= 0:
        return torch.empty(0, dtype=torch.int64)
    return torch.topk(score, k, sorted=False).indices.cpu()


def dense_mask(elements: KeyElements, device: torch.device | str = "cpu") -> torch.Tensor:
    """The positions of `elements` as a bool matrix of its shape."""
    mask = torch.zeros(elements.shape[0] * elements.shape[1], dtype=torch.bool, device=device)
    mask[elements.linear().to(device)] = True
    return mask.view(elements.shape)


class LotteryTicketAdaptation(FullFineTuning):
    """Calibrate, pick a sparse mask of the LoRA-target weights avoiding earlier masks, reset,
    train the masked positions only."""

    name = "lota"
    summary = "LoTA: a sparse mask from a calibration fine-tune, only its positions trained"
    supports_fsdp = False

    def __init__(self, config) -> None:
        super().__init__(config)
        sparsity = config.lota_sparsity
        self.sparsity = paper.LOTA_SPARSITY if sparsity is None else float(sparsity)
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"lota sparsity must be in [0, 1), got {self.sparsity}")
        self.files: list[str] = []  # per-task mask files, in task order
        self.used: dict[str, KeyElements] = {}  # matrix → positions of all earlier masks
        self.mask: dict[str, KeyElements] | None = None  # this task's, once extracted
        self._start: dict[str, torch.Tensor] = {}  # W (and the projector) at the task start
        self._dense: dict[str, torch.Tensor] = {}  # this task's mask as bool matrices
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------ what trains

    def weights(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The LoRA-target projections of the LLM (masked in the task's training)."""
        return target_weights(model)

    def attach(self, model: nn.Module, cfg: FullTrainingSettings) -> nn.Module:
        """The model with the target weights and projector trainable; W kept for the task."""
        if is_sharded(model):
            raise ValueError("lota does not run with --fsdp (its masks index whole matrices)")
        model = super().attach(model, cfg)
        self.mask, self._dense = None, {}
        self._start = {n: p.detach().clone() for n, p in self.trained_weights(model).items()}
        return model

    # ------------------------------------------------------------------ phases

    def phases(self, cfg: Any, stage: int, task: str, run_dir: Path) -> list[Phase]:
        """Calibration then the masked training; the training alone once this task's mask
        is saved (a resumed task)."""
        if lota_mask_path(run_dir, stage, task).is_file():
            return [TRAIN]
        steps = cfg.lota_calibration_steps
        if steps is None and cfg.max_steps_for(task) is not None:
            steps = max(1, math.ceil(CALIBRATION_SHARE * cfg.max_steps_for(task)))
        if steps is None:  # the task runs for epochs: calibrate for a tenth of them
            return [Phase(CALIBRATE, epochs=CALIBRATION_SHARE * cfg.epochs), TRAIN]
        return [Phase(CALIBRATE, max_steps=steps), TRAIN]

    def begin_phase(
        self, model: nn.Module, phase: Phase, stage: int, task: str, run_dir: Path
    ) -> None:
        """Before the masked training: the mask (read back on resume) hooked onto the
        gradients of the target weights."""
        if phase != TRAIN:
            return
        weights = self.weights(model)
        if self.mask is None:
            shapes = {n: tuple(p.shape) for n, p in weights.items()}
            self.mask = load_key_elements(lota_mask_path(run_dir, stage, task), shapes)
        self._dense = {n: dense_mask(self.mask[n], p.device) for n, p in weights.items()}
        for name, param in weights.items():
            mask = self._dense[name]
            self._hooks.append(param.register_hook(lambda grad, mask=mask: grad * mask))

    def end_phase(
        self,
        model: nn.Module,
        phase: Phase,
        stage: int,
        task: str,
        run_dir: Path,
        write: bool,
    ) -> None:
        """After calibration: τ = W_cal − W, the mask from it (saved by rank 0), the weights
        and the projector reset to W."""
        if phase.name != CALIBRATE:
            return
        keep = 1.0 - self.sparsity
        mask = {}
        for name, param in self.weights(model).items():
            used = dense_mask(self.used[name]) if name in self.used else None
            top = select_sparse_mask(param.detach() - self._start[name], keep, used)
            mask[name] = KeyElements.from_linear(top, tuple(param.shape))
        if write:
            save_key_elements(mask, lota_mask_path(run_dir, stage, task))
        self.mask = mask
        with torch.no_grad():
            for name, param in self.trained_weights(model).items():
                param.copy_(self._start[name])

    def after_step(self, model: nn.Module) -> None:
        """In the masked training: positions outside the mask back to W (weight decay)."""
        if not self._dense:
            return
        with torch.no_grad():
            for name, param in self.weights(model).items():
                param.copy_(torch.where(self._dense[name], param, self._start[name]))

    # ------------------------------------------------------------------ after the task

    def after_task(
        self, model: nn.Module, task: str, stage: int, run_dir: Path, write: bool
    ) -> None:
        """This task's mask joins the positions later tasks must leave alone."""
        super().after_task(model, task, stage, run_dir, write)
        path = lota_mask_path(run_dir, stage, task)
        mask = self.mask
        if mask is None:  # trained before, loaded (not trained) in this process
            mask = load_key_elements(
                path, {n: tuple(p.shape) for n, p in self.weights(model).items()}
            )
        self._merge_in(mask)
        self.files.append(relative_to_run(run_dir, path))

    def finish_stage(self, model: nn.Module) -> nn.Module:
        """The trained model, frozen; the task's hooks, copy of W and mask dropped."""
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._start, self._dense, self.mask = [], {}, {}, None
        return super().finish_stage(model)

    def _merge_in(self, mask: dict[str, KeyElements]) -> None:
        if self.used and set(mask) != set(self.used):
            raise ValueError(
                "lota: the mask covers other matrices than earlier tasks': "
                f"{sorted(set(mask) ^ set(self.used))[:4]}"
            )
        self.used = {
            name: merge_key_elements([self.used[name], ke]) if name in self.used else ke
            for name, ke in mask.items()
        }

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The mask files of the completed tasks (the positions live in those files)."""
        return {**super().state_dict(), "lota_mask_files": list(self.files)}

    def load_state_dict(self, state: dict[str, Any], run_dir: Path) -> None:
        """Reload the completed tasks' masks (files in `run_dir`) into the used positions."""
        super().load_state_dict(state, run_dir)
        self.files, self.used = [], {}
        for stored in state.get("lota_mask_files", []):
            path = resolve_in_run(run_dir, stored)
            self._merge_in(load_key_elements(path))
            self.files.append(relative_to_run(run_dir, path))

    def describe(self) -> dict[str, Any]:
        """Name, sparsity, and the share of each matrix's positions earlier masks hold."""
        held = sorted(
            {round(len(ke) / (ke.shape[0] * ke.shape[1]), 3) for ke in self.used.values()}
        )
        return {**super().describe(), "lota_sparsity": self.sparsity, "lota_used_share": held}
