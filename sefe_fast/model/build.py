"""Build the LLaVA model the trainer tunes: from a HF-format LLaVA directory, or assembled
the CoIN way from an LLM directory, a CLIP vision directory and a pretrained projector.

CoIN starts from Vicuna-7B-v1.5 + CLIP ViT-L/14-336 + the LLaVA-1.5 *pretraining*
projector (docs/reference.md §3): features from the second-to-last vision layer, CLS dropped
("default" strategy), a two-layer MLP projector with GELU ("mlp2x_gelu").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

IMAGE_TOKEN = "<image>"


@dataclass
class ModelBundle:
    """A LLaVA model with the tokenizer and image processor that go with it.

    `source` says how the base weights were obtained, so a resumed run can check that it
    rebuilds the same model (it is recorded in results.json's config).
    """

    model: LlavaForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    image_processor: Any
    source: dict = field(default_factory=dict)

    @property
    def image_token_id(self) -> int:
        """Token id of the `<image>` placeholder the model replaces with image features."""
        return int(self.model.config.image_token_id)

    @property
    def num_image_tokens(self) -> int:
        """Number of image-feature tokens per image (patches, plus CLS for "full")."""
        return num_image_tokens(self.model.config)


def num_image_tokens(config: LlavaConfig) -> int:
    """Image tokens per image: (image_size / patch_size)² patches, +1 for the "full" strategy."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if config.vision_feature_select_strategy == "full" else 0)


def load_llava(path: str | Path, *, dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Load a HF-format LLaVA (config + weights + tokenizer + image processor) from `path`."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: no config.json (not a HF-format model directory)")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # A LLaVA checkpoint was tuned on vicuna_v1 whatever template its tokenizer carries
    # (docs/reference.md §3); sefe_fast.data.conversation uses a template only if present.
    tokenizer.chat_template = None
    image_processor = AutoImageProcessor.from_pretrained(path)
    return ModelBundle(model, tokenizer, image_processor, {"kind": "hf", "path": str(path)})


def load_projector_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a LLaVA `mm_projector` file (.bin or .safetensors) as linear_1/linear_2 weights.

    LLaVA names the mlp2x_gelu layers `...mm_projector.0.*` and `...mm_projector.2.*`
    (index 1 is the GELU); HF's LlavaMultiModalProjector calls them linear_1 and linear_2.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--projector {path}: file not found")
    if path.suffix == ".safetensors":
        raw = load_file(str(path))
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    renamed: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        tail = key.split("mm_projector.")[-1]  # "0.weight", "2.bias", or already linear_*
        layer, _, param = tail.partition(".")
        name = {"0": "linear_1", "2": "linear_2"}.get(layer, layer)
        if name not in ("linear_1", "linear_2") or param not in ("weight", "bias"):
            raise ValueError(f"{path}: unexpected projector key {key!r} (expected mlp2x_gelu)")
        renamed[f"{name}.{param}"] = value
    return renamed


def assemble_llava(
    llm_path: str | Path,
    vision_path: str | Path,
    projector_path: str | Path | None,
    *,
    dtype: torch.dtype = torch.float32,
    vision_feature_layer: int = -2,
) -> ModelBundle:
    """Assemble a LLaVA-1.5 from its parts (the CoIN starting point).

    The LLM's tokenizer gets an `<image>` special token if it lacks one (the embeddings grow
    by one row) and uses `<unk>` as padding when it has no pad token, as LLaVA does (eos
    when it has no `<unk>` either). A chat template the LLM's tokenizer carries is kept and
    used for training and generation (`sefe_fast.data.conversation`).
    Without `projector_path` the projector keeps its random initialisation.
    """
    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype)
    vision = CLIPVisionModel.from_pretrained(vision_path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tokenizer))
    vision_cfg = vision.config
    config = LlavaConfig(
        vision_config=vision_cfg.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=(vision_cfg.image_size // vision_cfg.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
    )
    # Build the shell on the meta device and move the loaded parts in: no second copy.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.vision_tower = vision
    projector = type(model.model.multi_modal_projector)(config).to(dtype)
    if projector_path is not None:
        projector.load_state_dict(load_projector_state(projector_path))
    model.model.multi_modal_projector = projector
    model.to(dtype)
    image_processor = AutoImageProcessor.from_pretrained(vision_path)
    source = {
        "kind": "assembled",
        "llm": str(llm_path),
        "vision_tower": str(vision_path),
        "projector": None if projector_path is None else str(projector_path),
    }
    return ModelBundle(model, tokenizer, image_processor, source)
