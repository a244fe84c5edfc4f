"""Named settings for `--preset`: plain dicts of overrides of `RunConfig`'s defaults.

`RunConfig`'s defaults are the paper's recipe (`sefe_fast.paper_defaults`); a preset names
only what it changes, and flags given on the command line win over it. Every key must be a
setting (`config.check_overrides`; `tests/test_train_cli.py` checks all presets).

- `default`: the tiny LLaVA on mini-CoIN, all 8 tasks, SEFE, 70 optimizer steps per task
  (140 for ImageNet, 200 for GQA and OCRVQA), λ rescaled to the tiny model's learning rate;
  finishes on 2 CPU cores in 6–11 minutes (measured on two machines; RESULTS.md has the
  accuracies and times).
- `smoke`: 3 tasks, a few steps, small test sets: a CI check of the whole pipeline.
- `smol`: SmolLM2-135M-Instruct + the tiny vision tower + a two-layer projector
  (`sefe_fast.model.smol`) on a small mini-CoIN: a pretrained instruction LLM on CPU, so that
  forgetting can look like the paper's (issue 20). Sized for an 8-task run of about 30
  minutes on an idle 2-core machine from step times measured under load (README, "The smol
  preset"); needs `pip install -e '.[smol]'`.
- `paper`: the paper's recipe for LLaVA-1.5-7B on CoIN (docs/reference.md §3); needs
  `--model` (or `--llm/--vision-tower/--projector`) and `--data`.
"""

from __future__ import annotations

from typing import Any

from sefe_fast.tasks import COIN_TASKS

PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "model": "tiny",
        "lora_r": 16,
        "lora_alpha": 32,
        "lr": 3e-3,
        "projector_lr": 2e-3,
        "global_batch_size": 32,
        "per_device_batch_size": 16,
        "max_steps": 70,
        # Tasks need different amounts of training (in CoIN, one epoch over datasets of
        # different sizes). At 70 steps these three stayed far below what they reach with
        # more (seed 0, lora: ImageNet 50 → 92, GQA 35 → 68, OCRVQA 2 → 45; RESULTS.md).
        "task_steps": {"ImageNet": 140, "GQA": 200, "OCRVQA": 200},
        # The paper's λ = 2.5e3 was set for LLaVA-7B at lr 2e-4. The penalty is a mean of
        # |B·A| entries, which grow with the learning rate: at the tiny model's lr 3e-3 (15×)
        # λ × 2e-4/3e-3 ≈ 1.7e2, rounded to 2.5e2. Measured (seed 0, RESULTS.md): sefe MFT
        # 57 → 72, MFN 4.6 → 11.0 against 2.5e3. `--reg-lambda 2.5e3` gives the paper's.
        "reg_lambda": 2.5e2,
        "warmup_ratio": 0.05,
        "max_length": 768,
        "minicoin_n_train": 2000,
        "save_every": 20,
    },
    "smoke": {
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
    "smol": {
        "model": "smol",
        # 134.5 M frozen parameters: LoRA on all seven projections of every layer (the
        # measured setting of docs/reference.md §7), rank 8: 2.4 M trainable parameters.
        "lora_r": 8,
        "lora_alpha": 16,
        # between the paper's 2e-4 for 7B and the tiny model's 3e-3 from scratch: a
        # pretrained 135 M model moves with a few hundred small steps
        "lr": 1e-3,
        "projector_lr": 1e-3,
        # λ rescaled like the default preset's: 2.5e3 × 2e-4 / 1e-3 = 5e2 (the penalty grows
        # with |B·A|, i.e. with the lr). `--reg-lambda 2.5e3` gives the paper's.
        "reg_lambda": 5e2,
        # fft: LLaVA-1.5's own full fine-tuning lr (2e-5), not --lr/10 = 1e-4: at 1e-4 the
        # 135 M model answered every question with an empty string after its second task
        # (a 2-task smoke, 2026-12-02); at 2e-5 it learns (RESULTS.md, issue 21). lota trains
        # its masked weights at this lr too; its measured smol run used 1e-4 (RESULTS.md).
        "fft_lr": 2e-5,
        "global_batch_size": 8,
        "per_device_batch_size": 4,  # 2 ranks × 4, or 1 process × 4 × 2 accumulated
        "max_steps": 25,
        "warmup_ratio": 0.1,
        # chat template (~30 tokens) + 16 image tokens + question + answer
        "max_length": 160,
        "minicoin_n_train": 200,
        "minicoin_n_test": 32,
        "eval_batch_size": 32,
        "save_every": 25,
        "log_every": 5,
    },
    "paper": {
        # the recipe is RunConfig's defaults; what a run of that size needs besides
        "save_every": 500,
        "eval_batch_size": 32,
        "num_proc": 8,
        # The official evaluation decodes greedily up to 1024 new tokens and stops at end
        # of sequence; a shorter cap would hide the long, wrong-style replies superficial
        # forgetting produces and cut what ImageNet's substring rule and ScienceQA's
        # "The answer is X." rule read. The tiny presets keep each task's own cap (8-32
        # tokens): the shipped results were measured with them, and on the CPU a tiny model
        # that never emits end-of-sequence would decode 1024 tokens per record.
        "max_new_tokens": 1024,
    },
}

# Presets that need a real model and data given on the command line.
REQUIRES_MODEL_AND_DATA = frozenset({"paper"})
