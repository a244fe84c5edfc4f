"""Stage 0 of the tiny LLaVA: pretrain it (or find its weights) before the continual run.

Stage 0 stands in for CLIP + Vicuna + LLaVA's pretraining (see `sefe_fast.model.tiny` for
the model and what 0a and 0b learn). It trains with the trainer's own loop, so it sits after
`sefe_fast.train.loop` in the data flow. `load_or_pretrain_tiny` looks the weights up in order:
the shipped asset, the cache, else it pretrains into the cache. Rebuild the shipped asset
(21 minutes on 2 CPU cores) with

    torchrun --nproc_per_node 2 -m sefe_fast.train.stage0 --out sefe_fast/assets/tiny-stage0
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from sefe_fast.data.coin import collate_train, load_train_dataset
from sefe_fast.data.minicoin import generate_minicoin
from sefe_fast.io_utils import atomic_directory, atomic_write_json
from sefe_fast.model.accel import AccelConfig
from sefe_fast.model.build import ModelBundle
from sefe_fast.model.tiny import (
    ASSET_DIR,
    CLIP_MEAN,
    CLIP_STD,
    STAGE0_META,
    Stage0Config,
    TinyConfig,
    build_tiny_model,
    default_cache_root,
    load_tiny_from,
    stage0_fingerprint,
    valid_stage0_entry,
)
from sefe_fast.model.tiny_vision import pretrain_vision_tower
from sefe_fast.train.checkpoint import load_train_state, save_train_state
from sefe_fast.train.distributed import (
    DistContext,
    barrier,
    init_distributed,
    run_on_main_first,
    shutdown_distributed,
)
from sefe_fast.train.loop import LoopConfig, train_task
from sefe_fast.train.train_log import TrainLog


def load_stage0_captions(data_dir: str | Path, bundle: ModelBundle, max_length: int):
    """(dataset, stats) of mini-CoIN's stage-0 caption file under `data_dir`, tokenised for
    `bundle`'s model (`max_length` tokens per sample, image tokens included)."""
    return load_train_dataset(
        Path(data_dir) / "Stage0" / "train.json",
        data_dir,
        bundle.tokenizer,
        bundle.image_processor,
        image_token_id=bundle.image_token_id,
        num_image_tokens=bundle.num_image_tokens,
        max_length=max_length,
    )


def pretrain_stage0(
    out_dir: Path,
    cfg: TinyConfig,
    s0: Stage0Config,
    dist: DistContext,
    data_root: Path | None = None,
) -> Path:
    """Train every weight of a fresh tiny LLaVA on Stage0/train.json; save it to `out_dir`.

    Runs data-parallel on every rank of `dist`; rank 0 generates the data and writes.
    Returns `out_dir` (a HF model directory plus `stage0.json`).
    """
    data_root = data_root or default_cache_root() / f"minicoin-stage0-seed{s0.data_seed}"
    data_dir = run_on_main_first(  # only Stage0 is used: the task splits are kept minimal
        dist,
        generate_minicoin,
        data_root,
        seed=s0.data_seed,
        n_train=1,
        n_test=1,
        n_stage0=s0.n_train,
        progress=dist.is_main,
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
            progress=dist.is_main,
        )
        if dist.is_main:
            save_train_state(
                tower_file,
                {"fingerprint": fingerprint, "tower": tower.state_dict(), "report": vision_report},
            )
    if dist.is_main:
        print(f"[sefe_fast] stage 0a (vision tower): {vision_report}")
    tower.requires_grad_(False)
    model = model.to(dist.device)
    dataset, stats = load_stage0_captions(data_dir, bundle, s0.max_length)
    per_device = s0.batch_size // dist.world_size
    if per_device * dist.world_size != s0.batch_size:
        raise ValueError(
            f"stage-0 batch {s0.batch_size} does not split over {dist.world_size} ranks"
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
    torch.manual_seed(s0.train_seed + dist.rank)
    pad = bundle.tokenizer.pad_token_id
    log = TrainLog(out_dir.with_name(out_dir.name + ".train_log.jsonl"), dist.is_main)
    ckpt = out_dir.with_name(out_dir.name + ".ckpt.pt")  # resumes an interrupted stage 0
    resume = load_train_state(ckpt)
    if resume is not None and dist.is_main:
        print(f"[sefe_fast] resuming stage 0 from step {resume['step']} ({ckpt})")
    result = train_task(
        model,
        dataset,
        lambda items: collate_train(items, pad),
        [{"params": [p for p in model.parameters() if p.requires_grad], "lr": s0.lr}],
        loop,
        dist,
        accel=AccelConfig(),
        log=log,
        log_fields={"phase": "stage0"},
        save_checkpoint=(lambda state: save_train_state(ckpt, state))
        if dist.is_main
        else (lambda state: None),
        resume=resume,
        desc="stage 0 (tiny LLaVA pretraining)",
        image_token_id=bundle.image_token_id,
    )
    if dist.is_main:
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
                "command": "python -m sefe_fast.train.stage0 --out DIR",
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
    dist: DistContext, cfg: TinyConfig = TinyConfig(), s0: Stage0Config = Stage0Config()
) -> ModelBundle:
    """The stage-0 tiny LLaVA: shipped asset, else cache, else pretrain into the cache."""
    fingerprint = stage0_fingerprint(cfg, s0)
    if valid_stage0_entry(ASSET_DIR, fingerprint):
        return load_tiny_from(ASSET_DIR, cfg)
    cached = default_cache_root() / f"tiny-stage0-{fingerprint}"
    if not valid_stage0_entry(cached, fingerprint):
        if dist.is_main:
            print(f"[sefe_fast] no stage-0 weights for the tiny model; pretraining into {cached}")
        pretrain_stage0(cached, cfg, s0, dist)
    return load_tiny_from(cached, cfg)


def main(argv: list[str] | None = None) -> int:
    """CLI: pretrain the tiny model's stage 0 into `--out` (the shipped asset by default)."""
    parser = argparse.ArgumentParser(prog="python -m sefe_fast.train.stage0", description=__doc__)
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    parser.add_argument("--steps", type=int, default=Stage0Config.steps)
    parser.add_argument("--batch-size", type=int, default=Stage0Config.batch_size)
    parser.add_argument("--lr", type=float, default=Stage0Config.lr)
    args = parser.parse_args(argv)
    dist = init_distributed()
    s0 = replace(Stage0Config(), steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    pretrain_stage0(args.out, TinyConfig(), s0, dist)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
