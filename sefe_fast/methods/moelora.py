"""`moelora`: CoIN's MoELoRA — LoRA experts with a learned per-token softmax router, kept
and trained further from task to task (never merged).

The published rule (zackschen/CoIN, read at its newest snapshot):

- layer: `CoIN/peft/tuners/coinmoelora.py` — `CoINMOELoraLinear` (L296-402): E experts of
  rank r/E (`CoINMOELinearA/B`, L406-454, asserting E divides r), scaling alpha/r (L284),
  A ~ N(0, 0.01²), B = 0 (L289-294); the router is a bias-free Linear(in_features → E) on
  the layer's input token (L321, L387), softmax over all experts, dense (L388-396); no
  top-k, no capacity, no load-balancing loss (the Switch-style `CoINMOERouter`, L494-548,
  is defined but never used).
- targets: every Linear of the LLM but lm_head (`ETrain/Models/LLaVA/utils.py`
  `find_all_linear_names`, L45-58): q, k, v, o, gate, up, down, as sefe_fast's LoRA.
- settings: `scripts/LLaVA/Train_MOE/*.sh` — 8 experts, r = 128, alpha = 256, lr 2e-4,
  projector lr 2e-5 (the projector trains, as for LoRA).
- across tasks: `merge` is a no-op (its body is commented out, coinmoelora.py L335-352;
  `_unload_and_optionally_merge` keeps the layers, L225-261); each task starts from the
  previous task's experts and router (`--previous_task_model_path`,
  `ETrain/Train/LLaVA/train.py` L134-136 → `llava_trainer.py` L255-279), trains all of them
  with a fresh optimizer, and the model is evaluated with the experts in place.

Here: `sefe_fast.model.mixture_lora` (routing `dense`) on LoRA's targets; the run's
--lora-r/--lora-alpha/--lora-dropout/--lr/--projector-lr; --mixture-experts (8). Each stage
folder holds `mixture.safetensors` (every expert and router, cumulative), its
`mixture_config.json` and `projector.safetensors`; a completed stage replays by loading
them. Not with --fsdp (the mixture layers are not sharded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from sefe_fast.io_utils import atomic_directory
from sefe_fast.methods.base import ContinualMethod, TrainingSettings
from sefe_fast.model.lora import (
    LORA_TARGETS,
    PROJECTOR_FILE,
    PROJECTOR_PREFIX,
    load_projector,
    projector_module,
    save_projector,
)
from sefe_fast.model.mixture_attach import (
    MIXTURE_CONFIG_FILE,
    MIXTURE_FILE,
    MixtureSpec,
    attach_mixture,
    load_mixture,
    mixture_layers,
    mixture_spec,
    read_mixture_spec,
    write_mixture,
)
from sefe_fast.model.sharding import is_sharded

PUBLISHED_EXPERTS = 8  # CoIN's Train_MOE scripts and SMoLoRA's Train_Eval scripts


class MoELoRAMethod(ContinualMethod):
    """Mixture of LoRA experts, dense softmax router per token, kept across tasks."""

    name = "moelora"
    summary = "CoIN's MoELoRA: 8 LoRA experts, per-token softmax router, kept across tasks"
    routing = "dense"
    supports_fsdp = False  # the mixture layers are not sharded
    targets: tuple[str, ...] = LORA_TARGETS
    on_projector = False  # True: experts on the projector's Linears, its weights frozen
    # the routers' parameter names that never train (SMoLoRA's top-1 gates)
    frozen_router_parts: tuple[str, ...] = ()
    # the official scripts' settings (LLaVA-1.5-7B), for results.json beside the run's own
    published: ClassVar[dict[str, Any]] = {
        "experts": 8,
        "lora_r": 128,
        "lora_alpha": 256,
        "lr": 2e-4,
        "projector_lr": 2e-5,
        "source": "zackschen/CoIN scripts/LLaVA/Train_MOE/*.sh",
    }

    @property
    def experts(self) -> int:
        return self.config.mixture_experts or PUBLISHED_EXPERTS

    @classmethod
    def _rank_problem(cls, lora_r: int, experts: int) -> str | None:
        if lora_r % experts == 0 and (cls.routing == "dense" or experts % 2 == 0):
            return None
        even = " (an even number: half the experts per router)" if cls.routing != "dense" else ""
        return (
            f"--method {cls.name}: --lora-r {lora_r} must be a multiple of "
            f"--mixture-experts {experts}{even}"
        )

    @classmethod
    def settings_problems(cls, values: dict[str, Any]) -> list[str]:
        """The experts must split the LoRA rank evenly (and, separable, be even)."""
        experts = values.get("mixture_experts") or PUBLISHED_EXPERTS
        problem = cls._rank_problem(values["lora_r"], experts)
        return [problem] if problem else []

    def spec(self, model: torch.nn.Module, cfg: TrainingSettings) -> MixtureSpec:
        """The mixture this method attaches to `model` under the run's settings."""
        problem = self._rank_problem(cfg.lora_r, self.experts)
        if problem:
            raise ValueError(problem)
        return MixtureSpec(
            experts=self.experts,
            rank=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            routing=self.routing,
            targets=self.targets,
            projector=self.on_projector,
        )

    # ------------------------------------------------------------------ adapter lifecycle

    def attach(self, model: torch.nn.Module, cfg: TrainingSettings) -> torch.nn.Module:
        """The first task: fresh experts (torch RNG); later tasks: the experts as the last
        task left them. The experts, routers and (unless `on_projector`) projector train."""
        if is_sharded(model):
            raise ValueError(f"--method {self.name} does not run with --fsdp")
        if not mixture_layers(model):
            attach_mixture(model, self.spec(model, cfg))
        self._set_trainable(model)
        return model

    def _set_trainable(self, model: torch.nn.Module) -> None:
        for param in model.parameters():
            param.requires_grad_(False)
        if not self.on_projector:
            for param in projector_module(model).parameters():
                param.requires_grad_(True)
        for _, layer in mixture_layers(model):
            for name, param in layer.named_parameters():
                frozen = name.startswith(self.frozen_router_parts)
                param.requires_grad_(name.startswith("lora_") and not frozen)

    def trainable_groups(
        self, model: torch.nn.Module, cfg: TrainingSettings
    ) -> list[dict[str, Any]]:
        """The LLM's experts and routers at `cfg.lr`; everything trainable in the projector
        (its weights, or its experts) at `cfg.projector_lr`, as LLaVA's trainer does."""
        llm, projector = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (projector if f"{PROJECTOR_PREFIX}." in name else llm).append(param)
        groups = [{"params": llm, "lr": cfg.lr, "name": "lora"}]
        if projector:
            groups.append({"params": projector, "lr": cfg.projector_lr, "name": "proj"})
        return groups

    def save_stage(self, model: torch.nn.Module, directory: Path, write: bool) -> None:
        """`mixture.safetensors` + `mixture_config.json` (+ `projector.safetensors` when
        the projector's own weights train)."""
        if write:
            with atomic_directory(directory) as tmp:
                write_mixture(model, tmp)
                if not self.on_projector:  # else its weights stay as loaded
                    save_projector(model, tmp / PROJECTOR_FILE)

    def is_stage_saved(self, directory: Path) -> bool:
        return (directory / MIXTURE_FILE).is_file() and (directory / MIXTURE_CONFIG_FILE).is_file()

    def load_stage(self, model: torch.nn.Module, directory: Path) -> torch.nn.Module:
        """The stage's experts, routers and projector on `model` (attached if it has none)."""
        saved = read_mixture_spec(directory)
        if not mixture_layers(model):
            attach_mixture(model, saved)
        elif mixture_spec(model) != saved:
            raise ValueError(
                f"{directory}: saved mixture {saved} differs from the model's {mixture_spec(model)}"
            )
        load_mixture(model, directory)
        if not self.on_projector:
            load_projector(model, directory / PROJECTOR_FILE)
        return model

    def finish_stage(self, model: torch.nn.Module) -> torch.nn.Module:
        """The experts stay (CoIN's merge is a no-op); everything is frozen for evaluation."""
        for param in model.parameters():
            param.requires_grad_(False)
        return model

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "experts": self.experts,
            "routing": self.routing,
            "targets": list(self.targets),
            "experts_on_projector": self.on_projector,
            "published_settings": self.published,
        }
