"""Put `MixtureLoRALinear` layers on a LLaVA model, take them off, save and load them.

The targets are LoRA's (`sefe_fast.model.lora`): q, k, v, o, gate, up, down of every LLM
layer, or any subset of those names (SMoLoRA: gate, up, down), and optionally the two
Linear layers of the projector (SMoLoRA). Saved as safetensors (`mixture.safetensors`:
every `lora_` tensor, keyed by its module path in the bare model) plus the JSON of the
`MixtureSpec` (`mixture_config.json`), written atomically as one directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sefe_fast.io_utils import atomic_directory
from sefe_fast.model.lora import LORA_TARGETS, PROJECTOR_PREFIX
from sefe_fast.model.mixture_lora import MixtureLoRALinear, RoutingContext

IGNORE_INDEX = -100  # the label of a prompt token (transformers' loss ignores it)
MIXTURE_FILE = "mixture.safetensors"
MIXTURE_CONFIG_FILE = "mixture_config.json"


@dataclass(frozen=True)
class MixtureSpec:
    """Where the mixtures go and what they are (see `MixtureLoRALinear`).

    targets: LLM Linear names (a subset of LORA_TARGETS); projector: also wrap the
    projector's Linear layers; instruction_dim: d_ins of `separable` routing.
    """

    experts: int
    rank: int
    alpha: float
    dropout: float
    routing: str = "dense"
    targets: tuple[str, ...] = LORA_TARGETS
    projector: bool = False
    top_k: int | None = None
    instruction_dim: int | None = None

    def to_json(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_json(cls, data: dict) -> MixtureSpec:
        return cls(**{**data, "targets": tuple(data["targets"])})


def _is_target(name: str, module: nn.Module, spec: MixtureSpec) -> bool:
    if not isinstance(module, nn.Linear) or isinstance(module, MixtureLoRALinear):
        return False
    llm = r".*\.language_model\..*\.(" + "|".join(map(re.escape, spec.targets)) + r")"
    if re.fullmatch(llm, name):
        return True
    return spec.projector and f"{PROJECTOR_PREFIX}." in name


def attach_mixture(model: nn.Module, spec: MixtureSpec) -> RoutingContext:
    """Replace every target Linear of `model` by a `MixtureLoRALinear` (fresh experts from
    the torch RNG, in module order); install the forward pre-hook that hands the call's
    attention mask to the layers. Returns the context the layers share. Only the `lora_`
    parameters require grad afterwards (the caller decides about the projector)."""
    unknown = set(spec.targets) - set(LORA_TARGETS)
    if unknown:
        raise ValueError(f"mixture targets {sorted(unknown)} are not LoRA targets {LORA_TARGETS}")
    if list(mixture_layers(model)):
        raise ValueError("the model already carries mixture layers")
    context = RoutingContext()
    names = [name for name, module in model.named_modules() if _is_target(name, module, spec)]
    if not names:
        raise ValueError(f"no Linear layer of the model matches the mixture targets {spec.targets}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        layer = MixtureLoRALinear(
            base,
            experts=spec.experts,
            rank=spec.rank,
            alpha=spec.alpha,
            dropout=spec.dropout,
            routing=spec.routing,
            top_k=spec.top_k,
            instruction_dim=spec.instruction_dim,
            context=context,
        )
        setattr(parent, child, layer)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in mixture_parameters(model, trainable_only=False):
        param.requires_grad_(True)
    model._mixture_hook = model.register_forward_pre_hook(  # type: ignore[attr-defined]
        _remember_mask(context), with_kwargs=True
    )
    model._mixture_spec = spec  # type: ignore[attr-defined]
    return context


def mixture_spec(model: nn.Module) -> MixtureSpec:
    """The `MixtureSpec` the model's mixtures were attached with (ValueError if none)."""
    spec = getattr(model, "_mixture_spec", None)
    if spec is None:
        raise ValueError("the model carries no mixture layers")
    return spec


def _remember_mask(context: RoutingContext):
    """A forward pre-hook: the call's prompt tokens go to `context.token_mask` (the
    attention mask, less the answer tokens when the call has labels: a training forward);
    `context.continuing` says whether the call's tokens continue a KV cache (fewer input
    tokens than mask positions: a decoding step)."""

    def hook(module, args, kwargs):
        mask, labels = kwargs.get("attention_mask"), kwargs.get("labels")
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        context.continuing = bool(
            mask is not None and inputs is not None and inputs.shape[1] < mask.shape[1]
        )
        if mask is not None and labels is not None and labels.shape == mask.shape:
            mask = mask * (labels == IGNORE_INDEX).to(mask.dtype)
        context.token_mask = mask
        return None

    return hook


def detach_mixture(model: nn.Module) -> nn.Module:
    """Put every wrapped Linear back (the experts are dropped, the base weights unchanged)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MixtureLoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base_layer)
    hook = getattr(model, "_mixture_hook", None)
    if hook is not None:
        hook.remove()
        del model._mixture_hook, model._mixture_spec
    return model


def mixture_layers(model: nn.Module) -> list[tuple[str, MixtureLoRALinear]]:
    """(module path, layer) of every mixture layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MixtureLoRALinear)]


def routing_context(model: nn.Module) -> RoutingContext:
    """The context the model's mixture layers share (ValueError if it has none)."""
    layers = mixture_layers(model)
    if not layers:
        raise ValueError("the model carries no mixture layers")
    return layers[0][1].context


def mixture_parameters(model: nn.Module, trainable_only: bool = True) -> list[nn.Parameter]:
    """The experts' and routers' parameters (those that require grad, by default)."""
    return [
        p
        for _, layer in mixture_layers(model)
        for n, p in layer.named_parameters()
        if n.startswith("lora_") and (p.requires_grad or not trainable_only)
    ]


def mixture_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every `lora_` tensor of the mixture layers, as contiguous CPU copies, keyed
    '<module path>.<parameter>'."""
    return {
        f"{name}.{pname}": p.detach().contiguous().cpu()
        for name, layer in mixture_layers(model)
        for pname, p in layer.named_parameters()
        if pname.startswith("lora_")
    }


def load_mixture_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` (as `mixture_state_dict` names it) into the model's mixture layers;
    ValueError naming `source` and the first differing tensors if the sets or shapes differ."""
    current = {
        f"{name}.{pname}": p
        for name, layer in mixture_layers(model)
        for pname, p in layer.named_parameters()
        if pname.startswith("lora_")
    }
    if set(current) != set(state):
        diff = sorted(set(current) ^ set(state))[:4]
        raise ValueError(f"{source}: mixture tensors do not match the model's: {diff}")
    with torch.no_grad():
        for key, param in current.items():
            if param.shape != state[key].shape:
                raise ValueError(
                    f"{source}: {key} has shape {tuple(state[key].shape)}, "
                    f"the model's is {tuple(param.shape)}"
                )
            param.copy_(state[key])


def write_mixture(model: nn.Module, directory: Path) -> None:
    """Write `mixture.safetensors` + `mixture_config.json` into the existing `directory`
    (not atomic: give it the temporary directory of `atomic_directory`)."""
    save_file(mixture_state_dict(model), str(directory / MIXTURE_FILE))
    spec_json = json.dumps(mixture_spec(model).to_json(), indent=1) + "\n"
    (directory / MIXTURE_CONFIG_FILE).write_text(spec_json)


def save_mixture(model: nn.Module, out_dir: str | Path) -> Path:
    """Write `out_dir/mixture.safetensors` + `mixture_config.json` (one atomic directory)."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        write_mixture(model, tmp)
    return out_dir


def read_mixture_spec(directory: str | Path) -> MixtureSpec:
    """The `MixtureSpec` saved in `directory` (ValueError naming the file if unreadable)."""
    path = Path(directory) / MIXTURE_CONFIG_FILE
    try:
        return MixtureSpec.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{path}: not a mixture config ({error})") from error


def load_mixture(model: nn.Module, directory: str | Path) -> None:
    """Load `directory/mixture.safetensors` into the model's (already attached) mixtures."""
    path = Path(directory) / MIXTURE_FILE
    load_mixture_state(model, load_file(str(path)), str(path))
