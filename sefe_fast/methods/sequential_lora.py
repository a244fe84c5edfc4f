"""`lora`: plain sequential LoRA (a fresh LoRA per task, merged after it; no protection)."""

from __future__ import annotations

from sefe_fast.methods.base import ContinualMethod


class SequentialLoRA(ContinualMethod):
    """The baseline: the default hooks alone (a fresh LoRA per task, merged after it)."""

    name = "lora"
    summary = "plain sequential LoRA: a fresh LoRA per task, merged after it"
