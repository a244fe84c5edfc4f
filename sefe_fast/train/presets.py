"""Named settings for `--preset` (plain data). Flags given on the command line win.

- `default`: the tiny LLaVA on mini-CoIN, all 8 tasks, SEFE, 70 steps per task; finishes on
  2 CPU cores in 5–7 minutes (measured; RESULTS.md has the accuracies: MFT 37–49, below the
  60 the trainer issue asks for).
- `smoke`: 3 tasks, a few steps, small test sets: a CI check of the whole pipeline.
- `paper`: the paper's recipe for LLaVA-1.5-7B on CoIN (REFERENCE.md §3); needs `--model`
  (or `--llm/--vision-tower/--projector`) and `--data`.
"""

from __future__ import annotations

from typing import Any

from sefe_fast.tasks import COIN_TASKS

# Values every preset starts from (the paper's method hyperparameters).
BASE: dict[str, Any] = {
    "tasks": list(COIN_TASKS),
    "method": "sefe",
    "seed": 0,
    "reg_lambda": 2.5e3,
    "mask_ratio": 0.02,
    "asd_ratio": 0.2,
    "reg_backend": "auto",
    "olora_lambda1": 0.5,
    "olora_lambda2": 0.0,
    "lora_dropout": 0.05,
    "weight_decay": 0.0,
    "warmup_ratio": 0.03,
    "max_grad_norm": 1.0,
    "epochs": 1.0,
    "max_steps": None,
    "max_test_per_task": None,
    "minicoin_n_train": None,
    "minicoin_n_test": None,
    "eval_batch_size": 64,
    "save_every": 0,
    "log_every": 10,
    "group_by_length": True,
    "flash_attn": True,
    "liger": True,
    "bf16": True,
    "gradient_checkpointing": True,
    "skip_bad": False,
    "num_proc": 1,
    "stage0_steps": None,  # tiny model only: None = Stage0Config's (the shipped weights')
}

PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        **BASE,
        "model": "tiny",
        "lora_r": 16,
        "lora_alpha": 32,
        "lr": 3e-3,
        "projector_lr": 2e-3,
        "global_batch_size": 32,
        "per_device_batch_size": 16,
        "max_steps": 70,
        "warmup_ratio": 0.05,
        "max_length": 768,
        "minicoin_n_train": 2000,
        "minicoin_n_test": None,  # mini-CoIN's default (60)
        "save_every": 20,
    },
    "smoke": {
        **BASE,
        "model": "tiny",
        "tasks": list(COIN_TASKS[:3]),
        "lora_r": 8,
        "lora_alpha": 16,
        "lr": 2e-3,
        "projector_lr": 2e-4,
        "global_batch_size": 8,
        "per_device_batch_size": 4,
        "max_steps": 4,
        "max_length": 768,
        "minicoin_n_train": 64,
        "minicoin_n_test": 16,
        "eval_batch_size": 16,
        "save_every": 2,
        "log_every": 1,
    },
    "paper": {
        **BASE,
        "model": None,
        "lora_r": 128,
        "lora_alpha": 256,
        "lr": 2e-4,
        "projector_lr": 2e-5,
        "global_batch_size": 128,
        "per_device_batch_size": 16,
        "epochs": 1.0,
        "max_length": 2048,
        "save_every": 500,
        "eval_batch_size": 32,
        "num_proc": 8,
    },
}

# Presets that need a real model and data given on the command line.
REQUIRES_MODEL_AND_DATA = frozenset({"paper"})
