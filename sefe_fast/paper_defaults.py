"""The paper's hyperparameters: the one place they are written.

SEFE (ICML 2025) on CoIN with LLaVA-1.5-7B (docs/reference.md §2, §3); O-LoRA's λ1 and λ2
from its own paper and scripts (docs/reference.md §6). The run settings
(`sefe_fast.train.config.RunConfig`) take their defaults from here; the presets change
what the tiny model needs changed, and say why.
"""

from __future__ import annotations

# RegLoRA: λ of the penalty, and the share M of each ΔW's entries kept as key elements.
REG_LAMBDA = 2.5e3
MASK_RATIO = 0.02
# ASD: the share X of each task's training samples rewritten into the other answer styles.
ASD_RATIO = 0.2
# O-LoRA: λ1 (orthogonality of the new A to the old ones) and λ2 (L2 on the new factors).
OLORA_LAMBDA1 = 0.5
OLORA_LAMBDA2 = 0.0
# The training recipe (LoRA on every linear of the LLM; the projector trained fully).
LORA_R = 128
LORA_ALPHA = 256
LORA_DROPOUT = 0.05
LR = 2e-4
PROJECTOR_LR = 2e-5
WEIGHT_DECAY = 0.0
WARMUP_RATIO = 0.03
MAX_GRAD_NORM = 1.0
EPOCHS = 1.0
GLOBAL_BATCH_SIZE = 128
# Full fine-tuning (the FFT row of the paper's table): the paper and CoIN's scripts give no
# lr; LLaVA-1.5's own full fine-tuning (scripts/v1_5/finetune.sh) uses 2e-5, 1/10 of LoRA's.
FFT_LR = 2e-5
# LoTA (Panda et al. 2024): the share of each matrix's entries left out of a task's mask
# (0.9: 10 % of the positions trained), the paper's default.
LOTA_SPARSITY = 0.9
MAX_LENGTH = 2048
