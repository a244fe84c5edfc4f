"""Input checks shared by selection and penalty: clear errors naming what is wrong."""

from __future__ import annotations

import torch


def _check_factor(tensor: object, what: str, layout: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim != 2:
        raise ValueError(f"{what} must be a 2-D tensor ({layout}), got shape {tuple(tensor.shape)}")
    if not tensor.dtype.is_floating_point:
        raise ValueError(f"{what} has dtype {tensor.dtype}; LoRA factors must be floating point")
    if tensor.layout != torch.strided:
        raise ValueError(f"{what} must be a dense (strided) tensor, got layout {tensor.layout}")
    return tensor


def check_factors(
    lora_B: torch.Tensor, lora_A: torch.Tensor, name: str | None = None
) -> tuple[int, int, int]:
    """Check a LoRA pair (B: k×r, A: r×d) and return (k, r, d). `name` prefixes errors."""
    prefix = f"{name}: " if name else ""
    _check_factor(lora_B, f"{prefix}lora_B", "k×r")
    _check_factor(lora_A, f"{prefix}lora_A", "r×d")
    if lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(
            f"{prefix}rank mismatch: lora_B is {tuple(lora_B.shape)} (k×r) but lora_A is "
            f"{tuple(lora_A.shape)} (r×d)"
        )
    if lora_B.device != lora_A.device:
        raise ValueError(f"{prefix}lora_B is on {lora_B.device} but lora_A is on {lora_A.device}")
    return int(lora_B.shape[0]), int(lora_B.shape[1]), int(lora_A.shape[1])
