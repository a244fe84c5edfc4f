"""A fresh LoRA per task on the language model (peft), merged into the weights after the task.

LoRA sits on q, k, v, o, gate, up, down of every LLM layer only (the vision tower's
q/k/v projections are excluded by name); the vision tower stays frozen; the projector is
trained fully, outside LoRA, and saved separately.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from sefe_fast.io_utils import atomic_directory, atomic_path
from sefe_fast.model.sharding import add_to_weight, is_sharded, reshard_all

LORA_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
# peft matches a string target_modules as a full regex over module names.
LANGUAGE_MODEL_TARGET_REGEX = r".*\.language_model\..*\.(" + "|".join(LORA_TARGETS) + r")"
PROJECTOR_PREFIX = "multi_modal_projector"
PROJECTOR_FILE = "projector.safetensors"  # saved beside the adapter files


def projector_module(model: torch.nn.Module) -> torch.nn.Module:
    """The multimodal projector of a LLaVA model, wrapped in peft or not."""
    for name, module in model.named_modules():
        if name.endswith(PROJECTOR_PREFIX):
            return module
    raise ValueError("model has no multi_modal_projector (is it a LLaVA model?)")


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a
    FutureWarning on every call: once per attach and per load, i.e. per stage of a run.
    Nothing in sefe_fast can act on it, so that one warning is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        yield


def attach_lora(
    model: torch.nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float,
    train_projector: bool = True,
) -> PeftModel:
    """Wrap `model` in a fresh LoRA (A kaiming-random from the torch RNG, B zero).

    Only LoRA factors (and, with `train_projector`, the projector) require grad afterwards.
    """
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=LANGUAGE_MODEL_TARGET_REGEX,
        bias="none",
    )
    with _quiet_peft():
        peft_model = get_peft_model(model, config)
    for param in projector_module(peft_model).parameters():
        param.requires_grad_(train_projector)
    return peft_model


def merge_lora(peft_model: PeftModel) -> torch.nn.Module:
    """Merge the LoRA update (scaled B·A) into the base weights; return the plain model.

    A sharded model (`--fsdp`) gets each rank's rows of the update added to its shard;
    otherwise peft merges.
    """
    if is_sharded(peft_model):
        reshard_all(peft_model)
        with torch.no_grad():
            for module in peft_model.modules():
                if not isinstance(module, LoraLayer):
                    continue
                for name in module.active_adapters:
                    if name in module.lora_A:
                        delta = module.get_delta_weight(name)
                        add_to_weight(module.get_base_layer().weight, delta)
        model = peft_model.unload()
    else:
        model = peft_model.merge_and_unload()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA factors of a peft model."""
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def projector_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The projector's parameters that require grad."""
    return [p for p in projector_module(model).parameters() if p.requires_grad]


def save_adapter(peft_model: PeftModel, out_dir: str | Path, with_projector: bool = True) -> Path:
    """Save the adapter in PEFT format (adapter_config.json + adapter_model.safetensors),
    plus the projector's weights in `projector.safetensors` (`with_projector`).

    Written to a temporary directory beside `out_dir` and renamed into place, so a reader
    sees either the complete adapter or none.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        if with_projector:
            save_projector(peft_model, tmp / PROJECTOR_FILE)
    return out_dir


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> PeftModel:
    """Wrap `model` with the saved adapter (weights exactly as saved; not trainable)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter)")
    with _quiet_peft():
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)


def save_projector(model: torch.nn.Module, path: str | Path) -> None:
    """Save the projector's weights (safetensors, atomic)."""
    state = {
        k: v.detach().contiguous().cpu() for k, v in projector_module(model).state_dict().items()
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_projector(model: torch.nn.Module, path: str | Path) -> None:
    """Load projector weights saved by `save_projector` into `model` (in place)."""
    projector = projector_module(model)
    state = load_file(str(path))
    with torch.no_grad():
        for name, param in projector.state_dict().items():
            if name not in state:
                raise ValueError(f"{path}: projector weight {name!r} missing")
            param.copy_(state[name].to(param.dtype))
