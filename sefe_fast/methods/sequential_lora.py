"""`lora`: plain sequential LoRA (a fresh LoRA per task, merged after it; no protection)."""

from __future__ import annotations

from sefe_fast.methods.base import ContinualMethod


class SequentialLoRA(ContinualMethod):
    """The baseline: nothing beyond the trainer's fresh-LoRA-then-merge cycle."""

    name = "lora"
