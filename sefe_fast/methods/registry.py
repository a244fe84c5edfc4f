"""Method names for `--method` → their classes."""

from __future__ import annotations

from sefe_fast.methods.asd_method import AsdMethod
from sefe_fast.methods.base import ContinualMethod, MethodConfig
from sefe_fast.methods.fft import FullFineTuning
from sefe_fast.methods.lota import LotteryTicketAdaptation
from sefe_fast.methods.moelora import MoELoRAMethod
from sefe_fast.methods.olora import OLoRAMethod
from sefe_fast.methods.reglora_method import RegLoRAMethod
from sefe_fast.methods.sefe import SefeMethod
from sefe_fast.methods.sequential_lora import SequentialLoRA
from sefe_fast.methods.smolora import SMoLoRAMethod

METHODS: dict[str, type[ContinualMethod]] = {
    cls.name: cls
    for cls in (
        SequentialLoRA,
        AsdMethod,
        RegLoRAMethod,
        SefeMethod,
        OLoRAMethod,
        FullFineTuning,
        LotteryTicketAdaptation,
        MoELoRAMethod,
        SMoLoRAMethod,
    )
}


def build_method(name: str, config: MethodConfig) -> ContinualMethod:
    """Instantiate the method called `name`; ValueError listing the known names otherwise."""
    try:
        return METHODS[name](config)
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}") from None
