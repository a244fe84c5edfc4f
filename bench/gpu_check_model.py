"""The model part of bench/gpu_check.py: are FlashAttention-2 and Liger really active?

On a 2-layer LLaVA model of LLaVA-7B's LLM width (random weights, built from a config, no
download), one forward+backward on one fixed batch under the torch profiler, three ways:
PyTorch SDPA without Liger (the baseline), FlashAttention-2, FlashAttention-2 + Liger, each
switched on through `sefe_fast.model.accel.apply_accel` as the trainer does. "Active" means
the profiler saw the package's kernels launched (not merely that a flag was set); the loss
must match the SDPA path's within LOSS_TOLERANCE. A variant whose package is missing, or any
variant but SDPA on the CPU, is skipped with the reason recorded.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

from sefe_fast.model.accel import AccelConfig, apply_accel, has_package

LOSS_TOLERANCE = 0.05  # absolute, bf16 2-layer model: FA2/Liger loss against SDPA


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _liger_kernel_names() -> set[str]:
    """Names of every Triton kernel liger_kernel defines (what the profiler would show)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    ops = importlib.import_module("liger_kernel.ops")
    names = set()
    for info in pkgutil.walk_packages(ops.__path__, prefix="liger_kernel.ops."):
        try:
            module = importlib.import_module(info.name)
        except Exception:  # an op with a missing optional dependency: not ours to check
            continue
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction | Autotuner):
                names.add(name)
    return names


def _tiny_llava_config(model: dict):
    """A LLaVA config: Llama of the given width with 2 layers, a 1-layer 56-px CLIP tower."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = model["vocab"]
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=model["hidden"],
        intermediate_size=model["intermediate"],
        num_hidden_layers=2,
        num_attention_heads=model["heads"],
        num_key_value_heads=model["heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        projection_dim=64,
    )
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=vocab - 1,
        image_seq_length=16,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def is_flash_attn_event(name: str) -> bool:
    """A profiler event of the flash-attn package: its torch ops ("flash_attn::...") or its
    CUDA kernels ("flash::flash_fwd_kernel<...>"), not PyTorch's own SDPA flash kernels
    ("pytorch_flash::...", "aten::_scaled_dot_product_flash_attention...")."""
    if name.startswith("flash_attn::"):
        return True
    return "flash::flash_" in name and "pytorch_flash::" not in name


def _run_variant(config, state, dtype, accel, batch: dict, device: torch.device) -> dict:
    """Build the model with `accel` applied, run one forward+backward under the profiler."""
    from transformers import LlavaForConditionalGeneration

    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    model.load_state_dict(state)
    model.to(device, dtype)
    applied = apply_accel(model, accel, device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        loss = model(**batch).loss
        loss.backward()
        synchronize(device)
    kernels = {event.key for event in prof.key_averages()}
    fa2 = sorted(k for k in kernels if is_flash_attn_event(k))
    liger_names = _liger_kernel_names() if has_package("liger_kernel") else set()
    liger = sorted(k for k in kernels if any(n in k for n in liger_names))
    return {
        "applied": applied,
        "config_attn_implementation": model.config._attn_implementation,
        "loss": loss.item(),
        "fa2_kernels_launched": len(fa2),
        "fa2_kernel_examples": fa2[:3],
        "liger_kernels_launched": len(liger),
        "liger_kernel_examples": liger[:5],
    }


def model_check(model_size: dict, device: torch.device) -> dict:
    """Loss and launched kernels of SDPA, FlashAttention-2 and FA2 + Liger on one batch."""
    from transformers import LlavaForConditionalGeneration

    config = _tiny_llava_config(model_size)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: ~0.5 G parameters at full width
        state = LlavaForConditionalGeneration(config).state_dict()
    seq, vocab = model_size["seq"], model_size["vocab"]
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab - 1, (2, seq), generator=generator)
    input_ids[:, 1:17] = vocab - 1  # the 16 image tokens
    labels = input_ids.clone()
    labels[:, :17] = -100
    batch = {
        "input_ids": input_ids.to(device),
        "labels": labels.to(device),
        "pixel_values": torch.randn(2, 3, 56, 56, generator=generator).to(device, dtype),
    }
    variants = {
        "sdpa": AccelConfig(flash_attn=False, liger=False, gradient_checkpointing=False),
        "flash_attention_2": AccelConfig(
            flash_attn=True, liger=False, gradient_checkpointing=False
        ),
        "flash_attention_2+liger": AccelConfig(
            flash_attn=True, liger=True, gradient_checkpointing=False
        ),
    }
    result: dict = {"dtype": str(dtype).removeprefix("torch."), "model": model_size}
    for name, accel in variants.items():
        missing = [
            package
            for package, wanted in (("flash_attn", accel.flash_attn), ("liger_kernel", accel.liger))
            if wanted and not has_package(package)
        ]
        if device.type != "cuda" and name != "sdpa":
            result[name] = {"skipped": "needs CUDA"}
            continue
        if missing:
            result[name] = {"skipped": f"package(s) not installed: {', '.join(missing)}"}
            continue
        try:
            result[name] = _run_variant(config, state, dtype, accel, batch, device)
        except Exception as error:  # e.g. flash-attn built for another torch: record it
            result[name] = {"error": f"{type(error).__name__}: {error}"[:1000], "ok": False}
    base = result["sdpa"].get("loss")  # None when the baseline itself failed (recorded)
    for name in ("flash_attention_2", "flash_attention_2+liger"):
        entry = result[name]
        if "loss" in entry and base is not None:
            entry["loss_abs_diff_vs_sdpa"] = abs(entry["loss"] - base)
            entry["active"] = entry["fa2_kernels_launched"] > 0 and (
                "liger" not in name or entry["liger_kernels_launched"] > 0
            )
            entry["ok"] = entry["active"] and entry["loss_abs_diff_vs_sdpa"] <= LOSS_TOLERANCE
    return result
