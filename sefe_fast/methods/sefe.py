"""`sefe`: SEFE = ASD (superficial forgetting) + RegLoRA (essential forgetting)."""

from __future__ import annotations

from sefe_fast.methods.asd_method import AsdMixin
from sefe_fast.methods.reglora_method import RegLoRAMixin


class SefeMethod(AsdMixin, RegLoRAMixin):
    """ASD training data and the RegLoRA penalty (the paper's method, the default)."""

    name = "sefe"
    summary = "SEFE = ASD data + RegLoRA penalty (the paper's method, the default)"
