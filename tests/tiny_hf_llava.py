"""A tiny random HF LLaVA built from its parts the CoIN way (tests only; nothing is downloaded).

`write_llava_parts(root)` saves what CoIN's LLaVA is assembled from: `root/llm` (a 2-layer
Llama with a character tokenizer that lacks `<image>`, like Vicuna's), `root/clip` (a
3-layer CLIP vision tower, 32 px images, 8 px patches, with its image processor) and
`root/mm_projector.bin` (LLaVA's two-layer MLP projector, `model.mm_projector.{0,2}`).
`write_tiny_llava(root)` assembles those with `sefe_fast.model.build.assemble_llava` and
saves the HF LLaVA under `root/llava`, loadable with `--model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from sefe_fast.data.char_tokenizer import build_char_tokenizer
from sefe_fast.model.build import assemble_llava
from sefe_fast.model.tiny import tiny_image_processor

LLM_HIDDEN = 32
VISION_HIDDEN = 16


@dataclass
class LlavaParts:
    """The saved parts (`root/llm`, `root/clip`, `root/mm_projector.bin`) and the objects saved."""

    root: Path
    llm: LlamaForCausalLM
    vision: CLIPVisionModel
    projector: dict[str, torch.Tensor]


def char_tokenizer_without_image() -> PreTrainedTokenizerFast:
    """The character tokenizer's vocabulary without `<image>`, renumbered (an LLM's tokenizer)."""
    chars = [t for t, _ in sorted(build_char_tokenizer().get_vocab().items(), key=lambda x: x[1])]
    vocab = {t: i for i, t in enumerate(c for c in chars if c != "<image>")}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _tower_sizes(hidden: int, layers: int) -> dict[str, int]:
    """The sizes both tiny towers share the form of: width, 2× MLP width, layers, 2 heads."""
    return {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
    }


def write_llava_parts(
    root: Path, *, projector_scale: float = 1.0, projector_bias: bool = True
) -> LlavaParts:
    """Save random LLM, CLIP and projector parts under `root` (seeded: torch.manual_seed(0)).

    Projector weights are N(0, projector_scale²); biases the same, or zero with
    `projector_bias=False`.
    """
    tokenizer = char_tokenizer_without_image()
    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer.get_vocab()),
            num_key_value_heads=2,
            max_position_embeddings=4096,
            **_tower_sizes(LLM_HIDDEN, layers=2),
        )
    )
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    vision = CLIPVisionModel(
        CLIPVisionConfig(image_size=32, patch_size=8, **_tower_sizes(VISION_HIDDEN, layers=3))
    )
    vision.save_pretrained(root / "clip")
    tiny_image_processor(32).save_pretrained(root / "clip")
    projector = {}
    for layer, fan_in in ((0, VISION_HIDDEN), (2, LLM_HIDDEN)):
        prefix = f"model.mm_projector.{layer}"
        projector[f"{prefix}.weight"] = torch.randn(LLM_HIDDEN, fan_in) * projector_scale
        projector[f"{prefix}.bias"] = (
            torch.randn(LLM_HIDDEN) * projector_scale if projector_bias else torch.zeros(LLM_HIDDEN)
        )
    torch.save(projector, root / "mm_projector.bin")
    return LlavaParts(root, llm, vision, projector)


def write_tiny_llava(root: Path) -> Path:
    """Save a random tiny HF LLaVA (model, tokenizer with <image>, image processor) under
    `root/llava` and return that directory (parts under `root/parts`; a small projector,
    zero biases)."""
    parts = write_llava_parts(root / "parts", projector_scale=0.1, projector_bias=False)
    bundle = assemble_llava(
        parts.root / "llm", parts.root / "clip", parts.root / "mm_projector.bin"
    )
    out = root / "llava"
    bundle.model.save_pretrained(out)
    bundle.tokenizer.save_pretrained(out)
    bundle.image_processor.save_pretrained(out)
    return out
