"""The tiny LLaVA for mini-CoIN: its configs, its construction, and its stage-0 weights' identity.

The model: a CLIP vision tower (2 layers × 64 wide, 8-px patches over mini-CoIN's 32-px
images: 16 image tokens), a two-layer GELU projector, and a Llama LLM (4 layers × 128
wide) over the character tokenizer. Built from config, it knows nothing; stage 0 plays the
role of CLIP + Vicuna + the LLaVA pretraining projector in CoIN (a fixed starting point, with
its own seeds `Stage0Config.data_seed/train_seed`, not the run's), in two parts:

- 0a: the vision tower alone learns to classify every 8×8 patch (= one grid cell) of freshly
  drawn scenes (`tiny_vision`): CLIP's pretraining, in miniature;
- 0b: with the tower frozen, the projector and LLM learn mini-CoIN's `Stage0/train.json`
  scene descriptions (never the continual tasks' data): colours, shapes, positions, glyphs.

Weights are looked up in order: the shipped asset `sefe_fast/assets/tiny-stage0/`, the
cache `$SEFE_FAST_CACHE` (default `~/.cache/sefe_fast`) `/tiny-stage0-<fingerprint>/`, else
stage 0 runs (on every rank of the job, data-parallel) and fills the cache. An entry is
used only if its `stage0.json` fingerprint (model config, stage-0 config, tokenizer
vocabulary) matches. Stage 0 itself trains with the trainer's loop, so it lives after the
trainer in the data flow: `sefe_fast.train.stage0` (which also rebuilds the shipped asset).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)
from transformers.utils import is_torchvision_available

from sefe_fast.data.char_tokenizer import IMAGE_TOKEN, build_char_tokenizer
from sefe_fast.data.minicoin import MINICOIN_IMAGE_SIZE, STAGE0_VERSION
from sefe_fast.model.build import ModelBundle

if is_torchvision_available():
    from transformers import CLIPImageProcessor
else:
    # Without torchvision, transformers >= 5 answers the name CLIPImageProcessor with its PIL
    # class and a warning at every run start; asking for that class by name is the same
    # processor, silently. transformers 4.x has only the one (PIL) class.
    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-stage0"
STAGE0_META = "stage0.json"
# CLIP's normalisation constants (as for the real vision tower).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of the tiny LLaVA (widths in units, image sizes in pixels)."""

    image_size: int = MINICOIN_IMAGE_SIZE
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 256
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 352
    max_positions: int = 1024


@dataclass(frozen=True)
class Stage0Config:
    """Stage-0 training: optimizer steps, batch (global), lr, data size and the fixed seeds."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_ratio: float = 0.03
    max_length: int = 512
    n_train: int = 8000
    data_seed: int = 0
    train_seed: int = 0
    # Stage 0a: the vision tower alone on per-cell classification (`tiny_vision`); then
    # frozen for stage 0b (captions), as LLaVA keeps CLIP frozen.
    vision_steps: int = 1000
    vision_batch_size: int = 128
    vision_lr: float = 3e-3

    def with_steps(self, steps: int) -> Stage0Config:
        """This config with `steps` caption steps; the tower's steps capped at `steps` too, so
        that a few-step stage 0 (tests, `--stage0-steps 2`) is quick end to end."""
        return replace(self, steps=steps, vision_steps=min(self.vision_steps, steps))


def default_cache_root() -> Path:
    """`$SEFE_FAST_CACHE`, else `~/.cache/sefe_fast`."""
    return Path(os.environ.get("SEFE_FAST_CACHE", Path.home() / ".cache" / "sefe_fast"))


def tiny_image_processor(image_size: int) -> CLIPImageProcessor:
    """A CLIP image processor for `image_size`-px square images (CLIP mean/std)."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def tiny_llava_config(cfg: TinyConfig, tokenizer: Any) -> LlavaConfig:
    """The LlavaConfig of the tiny model for the character tokenizer."""
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_intermediate,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(cfg.image_size // cfg.patch_size) ** 2,
        projector_hidden_act="gelu",
        # A 2-layer tower trained from scratch: use its last layer (CoIN's -2 would leave the
        # last layer unused).
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def build_tiny_model(cfg: TinyConfig, seed: int) -> ModelBundle:
    """A randomly initialised tiny LLaVA (seeded), with its tokenizer and image processor."""
    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(cfg, tokenizer))
    return ModelBundle(
        model, tokenizer, tiny_image_processor(cfg.image_size), {"kind": "tiny", "stage0": None}
    )


def stage0_fingerprint(cfg: TinyConfig, s0: Stage0Config) -> str:
    """Hash of everything stage 0's result depends on (configs, vocabulary, generator)."""
    blob = json.dumps(
        {
            "tiny": asdict(cfg),
            "stage0": asdict(s0),
            "vocab": build_char_tokenizer().get_vocab(),
            # Only the stage-0 data matters here; the task splits have their own version.
            "minicoin": STAGE0_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def valid_stage0_entry(path: Path, fingerprint: str) -> bool:
    meta = path / STAGE0_META
    if not (meta.is_file() and (path / "model.safetensors").is_file()):
        return False
    return json.loads(meta.read_text()).get("fingerprint") == fingerprint


def load_tiny_from(path: Path, cfg: TinyConfig) -> ModelBundle:
    """Load stage-0 weights saved by `pretrain_stage0` from `path`."""
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    meta = json.loads((path / STAGE0_META).read_text())
    return ModelBundle(
        model,
        build_char_tokenizer(),
        tiny_image_processor(cfg.image_size),
        {"kind": "tiny", "stage0": str(path), "fingerprint": meta["fingerprint"]},
    )
