"""Speed switches: attention kernel, Liger kernels, autocast dtype, gradient checkpointing.

Each switch turns itself on only where it helps and works (CUDA, package installed) and
has a flag to turn it off. On the CPU everything runs in fp32 with PyTorch SDPA.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccelConfig:
    """What the user allows: each field off means "never", on means "where available"."""

    flash_attn: bool = True
    liger: bool = True
    bf16: bool = True
    gradient_checkpointing: bool = True


def has_package(name: str) -> bool:
    """True when `name` can be imported (without importing it)."""
    return importlib.util.find_spec(name) is not None


def attention_implementation(cfg: AccelConfig, device: torch.device) -> str:
    """ "flash_attention_2" with flash-attn on CUDA, else "sdpa"."""
    if cfg.flash_attn and device.type == "cuda" and has_package("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def compute_dtype(cfg: AccelConfig, device: torch.device) -> torch.dtype:
    """bf16 on CUDA (when allowed and supported), fp32 elsewhere."""
    if cfg.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(cfg: AccelConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing on the CPU (fp32)."""
    if compute_dtype(cfg, device) == torch.bfloat16:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def apply_accel(model: torch.nn.Module, cfg: AccelConfig, device: torch.device) -> dict:
    """Apply the switches to a built LLaVA model; return what was applied (for the log/config).

    Liger patches RMSNorm, RoPE, SwiGLU and the fused linear cross-entropy of the language
    model; it is only applied on CUDA (its RMSNorm/SwiGLU do not run on the CPU).
    """
    applied = {"attn_implementation": attention_implementation(cfg, device), "liger": False}
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(applied["attn_implementation"])
    if cfg.liger and device.type == "cuda" and has_package("liger_kernel"):
        from liger_kernel.transformers import apply_liger_kernel_to_llava

        apply_liger_kernel_to_llava(model=model)
        applied["liger"] = True
    applied["gradient_checkpointing"] = bool(cfg.gradient_checkpointing and device.type == "cuda")
    if applied["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # With a frozen embedding, checkpointed blocks need inputs that require grad.
        model.enable_input_require_grads()
    applied["dtype"] = str(compute_dtype(cfg, device)).removeprefix("torch.")
    return applied
