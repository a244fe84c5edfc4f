"""The tiny LLaVA for mini-CoIN, its stage-0 pretraining, and where its weights come from.

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
vocabulary) matches. Rebuild the shipped asset with

    python -m sefe_fast.model.tiny --out sefe_fast/assets/tiny-stage0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from sefe_fast.data.char_tokenizer import IMAGE_TOKEN, build_char_tokenizer
from sefe_fast.data.minicoin import MINICOIN_IMAGE_SIZE
from sefe_fast.io_utils import atomic_directory, atomic_write_json
from sefe_fast.model.build import ModelBundle
from sefe_fast.model.tiny_vision import pretrain_vision_tower

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
    from sefe_fast.data import minicoin

    blob = json.dumps(
        {
            "tiny": asdict(cfg),
            "stage0": asdict(s0),
            "vocab": build_char_tokenizer().get_vocab(),
            # Only the stage-0 data matters here; the task splits have their own version.
            "minicoin": minicoin.STAGE0_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _valid_entry(path: Path, fingerprint: str) -> bool:
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


def pretrain_stage0(
    out_dir: Path, cfg: TinyConfig, s0: Stage0Config, ctx, data_root: Path | None = None
) -> Path:
    """Train every weight of a fresh tiny LLaVA on Stage0/train.json; save it to `out_dir`.

    Runs data-parallel on every rank of `ctx`; rank 0 generates the data and writes.
    Returns `out_dir` (a HF model directory plus `stage0.json`).
    """
    from sefe_fast.data.coin import collate_train, load_train_dataset
    from sefe_fast.data.minicoin import generate_minicoin
    from sefe_fast.model.accel import AccelConfig
    from sefe_fast.train.checkpoint import load_train_state, save_train_state
    from sefe_fast.train.distributed import barrier, run_on_main_first
    from sefe_fast.train.loop import LoopConfig, train_task
    from sefe_fast.train.train_log import TrainLog

    data_root = data_root or default_cache_root() / f"minicoin-stage0-seed{s0.data_seed}"
    data_dir = run_on_main_first(  # only Stage0 is used: the task splits are kept minimal
        ctx,
        generate_minicoin,
        data_root,
        seed=s0.data_seed,
        n_train=1,
        n_test=1,
        n_stage0=s0.n_train,
        progress=ctx.is_main,
    )
    bundle = build_tiny_model(cfg, s0.train_seed)
    model = bundle.model
    tower = model.model.vision_tower
    # LLaVA reads the tower's hidden states before its final layer norm: that norm gets no
    # gradient (and DDP requires every trainable parameter to get one).
    tower.post_layernorm.requires_grad_(False)
    out_dir = Path(out_dir)
    fingerprint = stage0_fingerprint(cfg, s0)
    # Stage 0a: every rank trains the same tower from the same seed (about a minute), so the
    # ranks agree without a broadcast. Its result is kept until stage 0 ends, so that a
    # resumed stage 0b does not train it again.
    tower_file = out_dir.with_name(out_dir.name + ".tower.pt")
    saved_tower = load_train_state(tower_file)
    if saved_tower is not None and saved_tower["fingerprint"] == fingerprint:
        tower.load_state_dict(saved_tower["tower"])
        vision_report = saved_tower["report"]
    else:
        vision_report = pretrain_vision_tower(
            tower,
            steps=s0.vision_steps,
            batch_size=s0.vision_batch_size,
            lr=s0.vision_lr,
            seed=s0.train_seed,
            mean=CLIP_MEAN,
            std=CLIP_STD,
            progress=ctx.is_main,
        )
        if ctx.is_main:
            save_train_state(
                tower_file,
                {"fingerprint": fingerprint, "tower": tower.state_dict(), "report": vision_report},
            )
    if ctx.is_main:
        print(f"[sefe_fast] stage 0a (vision tower): {vision_report}")
    tower.requires_grad_(False)
    model = model.to(ctx.device)
    dataset, stats = load_train_dataset(
        Path(data_dir) / "Stage0" / "train.json",
        data_dir,
        bundle.tokenizer,
        bundle.image_processor,
        image_token_id=bundle.image_token_id,
        num_image_tokens=bundle.num_image_tokens,
        max_length=s0.max_length,
    )
    per_device = s0.batch_size // ctx.world_size
    if per_device * ctx.world_size != s0.batch_size:
        raise ValueError(
            f"stage-0 batch {s0.batch_size} does not split over {ctx.world_size} ranks"
        )
    loop = LoopConfig(
        per_device_batch_size=per_device,
        max_steps=s0.steps,
        warmup_ratio=s0.warmup_ratio,
        max_grad_norm=1.0,
        log_every=50,
        save_every=250,
        seed=s0.train_seed,
    )
    torch.manual_seed(s0.train_seed + ctx.rank)
    pad = bundle.tokenizer.pad_token_id
    log = TrainLog(out_dir.with_name(out_dir.name + ".train_log.jsonl"), ctx.is_main)
    ckpt = out_dir.with_name(out_dir.name + ".ckpt.pt")  # resumes an interrupted stage 0
    resume = load_train_state(ckpt)
    if resume is not None and ctx.is_main:
        print(f"[sefe_fast] resuming stage 0 from step {resume['step']} ({ckpt})")
    result = train_task(
        model,
        dataset,
        lambda items: collate_train(items, pad),
        [{"params": [p for p in model.parameters() if p.requires_grad], "lr": s0.lr}],
        loop,
        ctx,
        accel=AccelConfig(),
        log=log,
        log_fields={"phase": "stage0"},
        save_checkpoint=(lambda state: save_train_state(ckpt, state))
        if ctx.is_main
        else (lambda state: None),
        resume=resume,
        desc="stage 0 (tiny LLaVA pretraining)",
        image_token_id=bundle.image_token_id,
    )
    if ctx.is_main:
        _save_dir_atomically(
            model,
            out_dir,
            {
                "fingerprint": fingerprint,
                "tiny": asdict(cfg),
                "stage0": asdict(s0),
                "final_loss": result.last_loss,
                "vision_tower": vision_report,
                "seconds": result.seconds,
                "data": stats.summary(),
                "command": "python -m sefe_fast.model.tiny --out DIR",
            },
        )
        ckpt.unlink(missing_ok=True)
        tower_file.unlink(missing_ok=True)
    barrier()
    return out_dir


def _save_dir_atomically(model: torch.nn.Module, out_dir: Path, meta: dict[str, Any]) -> None:
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(tmp / STAGE0_META, meta)


def load_or_pretrain_tiny(
    ctx, cfg: TinyConfig = TinyConfig(), s0: Stage0Config = Stage0Config()
) -> ModelBundle:
    """The stage-0 tiny LLaVA: shipped asset, else cache, else pretrain into the cache."""
    fingerprint = stage0_fingerprint(cfg, s0)
    if _valid_entry(ASSET_DIR, fingerprint):
        return load_tiny_from(ASSET_DIR, cfg)
    cached = default_cache_root() / f"tiny-stage0-{fingerprint}"
    if not _valid_entry(cached, fingerprint):
        if ctx.is_main:
            print(f"[sefe_fast] no stage-0 weights for the tiny model; pretraining into {cached}")
        pretrain_stage0(cached, cfg, s0, ctx)
    return load_tiny_from(cached, cfg)


def main(argv: list[str] | None = None) -> int:
    """CLI: pretrain the tiny model's stage 0 into `--out` (the shipped asset by default)."""
    parser = argparse.ArgumentParser(prog="python -m sefe_fast.model.tiny", description=__doc__)
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    parser.add_argument("--steps", type=int, default=Stage0Config.steps)
    parser.add_argument("--batch-size", type=int, default=Stage0Config.batch_size)
    parser.add_argument("--lr", type=float, default=Stage0Config.lr)
    args = parser.parse_args(argv)
    from sefe_fast.train.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed()
    s0 = replace(Stage0Config(), steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    pretrain_stage0(args.out, TinyConfig(), s0, ctx)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
