"""`fft`: full fine-tuning — every LLM weight trained on each task; no adapter, no merge.

The paper's FFT baseline (docs/reference.md §5): all weights of the language model (every
layer's projections and norms, the embeddings and the output layer) are trained, the
projector as for LoRA (at `--projector-lr`), the vision tower stays frozen. The model after
a task is the trained model itself.

Learning rate (`--fft-lr`): neither the SEFE paper nor CoIN's scripts state one for FFT;
LLaVA-1.5's own full fine-tuning (its `scripts/v1_5/finetune.sh`) uses 2e-5 against
LoRA's 2e-4 (docs/reference.md §3), so by default fft trains at `--lr` / 10 — 2e-5 for
the paper preset, 3e-4 for the tiny default preset (its LoRA lr is 3e-3), 2e-4 for smoke.
The smol preset sets 2e-5 itself (its `--lr` / 10 = 1e-4 emptied the 135 M model's answers).
`lota` trains its masked weights at the same lr.

Precision: weights not already in fp32 (bf16 on CUDA) are trained in fp32 — AdamW on bf16
weights loses most small updates — and cast back after the task, so a replayed stage
(loaded into the model's dtype) equals the continuous run. Sharded weights (`--fsdp`)
keep the dtype FSDP holds them in.

Sharding (`--fsdp`, `sefe_fast.model.sharding`): the LLM blocks are FSDP2 units, so their
trained weights, gradients and AdamW state are all sharded over the ranks (each holds
about 1/N; FSDP reduce-scatters the gradients); checkpoints and the saved stage gather
whole tensors on rank 0.

Saved per stage: `adapters/stage{NN}_{task}/weights.safetensors`, the trained LLM and
projector weights under the model's own names (`sefe_fast.model.full_weights`). At 7B
that is about 14 GB per stage in bf16; the in-task checkpoint (weights plus AdamW state,
gathered on rank 0) about 84 GB in fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch.distributed.tensor import DTensor

from sefe_fast import paper_defaults as paper
from sefe_fast.methods.base import ContinualMethod, TrainingSettings, projector_group
from sefe_fast.model.full_weights import llm_parameters, load_weights, save_weights
from sefe_fast.model.lora import PROJECTOR_PREFIX
from sefe_fast.model.sharding import reshard_all

WEIGHTS_FILE = "weights.safetensors"


class FullTrainingSettings(TrainingSettings, Protocol):
    """The run settings of a method that trains the LLM's weights directly."""

    fft_lr: float | None


def weight_lr(cfg: FullTrainingSettings) -> float:
    """The learning rate of directly trained LLM weights: `cfg.fft_lr`, else `cfg.lr` scaled
    by the paper recipe's FFT/LoRA ratio (2e-5 / 2e-4 = 0.1)."""
    return cfg.fft_lr if cfg.fft_lr is not None else cfg.lr * paper.FFT_LR / paper.LR


def projector_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Name → parameter of the multimodal projector (its full names in `model`)."""
    return {n: p for n, p in model.named_parameters() if PROJECTOR_PREFIX in n.split(".")}


class FullFineTuning(ContinualMethod):
    """Every LLM weight and the projector trained; the vision tower frozen. Subclasses that
    train fewer weights directly (LoTA) override `weights`."""

    name = "fft"
    summary = "full fine-tuning: every LLM weight and the projector trained, no adapter"

    def __init__(self, config) -> None:
        super().__init__(config)
        self._dtypes: dict[str, torch.dtype] = {}  # weights upcast to fp32 for the task

    def weights(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """Name → parameter of the LLM weights this method trains: all of them."""
        return llm_parameters(model)

    def trained_weights(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """What the method trains and saves: `weights` and the projector."""
        return {**self.weights(model), **projector_weights(model)}

    def attach(self, model: torch.nn.Module, cfg: FullTrainingSettings) -> torch.nn.Module:
        """The model itself, its LLM weights and projector trainable (fp32 while training)."""
        # FSDP keeps the root unit's weights gathered after a forward (the evaluation), and a
        # gathered weight keeps the requires_grad it was gathered with: back to the shards,
        # so the next forward gathers them trainable.
        reshard_all(model)
        self._dtypes = {}
        for name, param in self.trained_weights(model).items():
            param.requires_grad_(True)
            if param.dtype != torch.float32 and not isinstance(param, DTensor):
                self._dtypes[name] = param.dtype
                param.data = param.data.float()
        return model

    def trainable_groups(
        self, model: torch.nn.Module, cfg: FullTrainingSettings
    ) -> list[dict[str, Any]]:
        """The LLM's weights at `weight_lr(cfg)`, the projector at `cfg.projector_lr`."""
        llm = list(self.weights(model).values())
        return [{"params": llm, "lr": weight_lr(cfg), "name": "llm"}, *projector_group(model, cfg)]

    def save_stage(self, model: torch.nn.Module, directory: Path, write: bool) -> None:
        """`directory/weights.safetensors`: the trained LLM and projector weights (gathered
        when sharded: every rank calls this)."""
        if write:
            directory.mkdir(parents=True, exist_ok=True)
        save_weights(
            self.trained_weights(model), directory / WEIGHTS_FILE, write, {"method": self.name}
        )

    def is_stage_saved(self, directory: Path) -> bool:
        """True when the stage's weights file exists (it is written atomically)."""
        return (directory / WEIGHTS_FILE).is_file()

    def load_stage(self, model: torch.nn.Module, directory: Path) -> torch.nn.Module:
        """`model` with the stage's trained weights copied in (each rank its shard)."""
        reshard_all(model)  # no gathered copy of a weight may outlive the load
        load_weights(self.trained_weights(model), directory / WEIGHTS_FILE)
        return model

    def finish_stage(self, model: torch.nn.Module) -> torch.nn.Module:
        """The trained model, frozen, upcast weights back in their dtype."""
        params = dict(model.named_parameters())
        for name, dtype in self._dtypes.items():
            params[name].data = params[name].data.to(dtype)
        self._dtypes = {}
        for param in model.parameters():
            param.requires_grad_(False)
        return model
