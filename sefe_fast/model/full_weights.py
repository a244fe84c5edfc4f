"""Training the model's own weights (no adapter): which they are, and their safetensors files.

The LLM's weights are every parameter of the language model (`model.language_model.*`) and
the output layer (`lm_head.*`); the vision tower is never among them. A stage that trained
weights directly (full fine-tuning, LoTA) is saved as one safetensors file of the trained
tensors under the model's own parameter names (`model.language_model.layers.0.mlp.up_proj.weight`,
...), so `safetensors.torch.load_file` plus `model.load_state_dict(..., strict=False)`
reads it into a LLaVA model anywhere. A sharded weight (FSDP) is gathered before it is
written (every rank calls `save_weights`; rank 0 writes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sefe_fast.io_utils import atomic_path
from sefe_fast.model.sharding import copy_full_into, full_tensor

FORMAT_NAME = "sefe_fast.trained_weights"
FORMAT_VERSION = "1"
LLM_ROOTS = ("language_model", "lm_head")


class WeightsFileError(ValueError):
    """A trained-weights file is unreadable, corrupt, or does not fit the model."""


def is_llm_weight(name: str) -> bool:
    """True for a parameter name of the LLM (`...language_model...` or `lm_head...`)."""
    parts = name.split(".")
    return "language_model" in parts or parts[0] == "lm_head"


def llm_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Name → parameter for every LLM weight of a LLaVA model (ValueError when none)."""
    params = {n: p for n, p in model.named_parameters() if is_llm_weight(n)}
    if not params:
        raise ValueError("model has no language_model / lm_head parameters (a LLaVA model?)")
    return params


def save_weights(
    params: Mapping[str, torch.Tensor], path: Path, write: bool, metadata: Mapping[str, str]
) -> None:
    """Write `params` (name → tensor, whole or sharded) to the safetensors file `path`
    atomically, with `metadata`; sharded tensors are gathered (collective: every rank calls
    this), only `write` (rank 0) writes."""
    tensors = {n: full_tensor(p.detach()).cpu().contiguous() for n, p in params.items()}
    if not write:
        return
    info = {**metadata, "format": FORMAT_NAME, "version": FORMAT_VERSION}
    info["shapes"] = json.dumps({n: list(t.shape) for n, t in tensors.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=info)


def load_weights(params: Mapping[str, torch.Tensor], path: Path) -> None:
    """Copy the tensors of a `save_weights` file into `params` (name → parameter, whole or
    sharded), in place; WeightsFileError naming the file and the matrix on a missing,
    extra, misshapen or non-finite tensor."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path}: trained-weights file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            info = handle.metadata() or {}
            names = set(handle.keys())
            if info.get("format") != FORMAT_NAME or info.get("version") != FORMAT_VERSION:
                raise WeightsFileError(
                    f"{path}: not a trained-weights file (format {info.get('format')!r}, "
                    f"version {info.get('version')!r})"
                )
            missing, extra = sorted(set(params) - names), sorted(names - set(params))
            if missing or extra:
                raise WeightsFileError(
                    f"{path}: holds other matrices than the model trains: missing "
                    f"{missing[:4]}, unexpected {extra[:4]}"
                )
            for name, param in params.items():
                tensor = handle.get_tensor(name)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise WeightsFileError(
                        f"{path}: matrix {name!r} has shape {tuple(tensor.shape)}, the model's "
                        f"{tuple(param.shape)}"
                    )
                if not torch.isfinite(tensor).all():
                    raise WeightsFileError(f"{path}: matrix {name!r} has non-finite values")
                copy_full_into(param, tensor)
    except WeightsFileError:
        raise
    except Exception as exc:  # safetensors raises its own types for a corrupt file
        raise WeightsFileError(f"{path}: cannot read trained weights ({exc})") from exc
