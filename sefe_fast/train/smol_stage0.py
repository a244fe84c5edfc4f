"""The smol preset's LLaVA "pretraining": the projector alone on mini-CoIN's stage-0 captions.

CoIN starts from a pretrained LLM plus a projector trained on captions with the LLM and
vision tower frozen (LLaVA's pretraining stage, docs/reference.md §3). For `--preset smol`
this trains the two-layer projector between the tiny stage-0a tower and SmolLM2-135M-Instruct
on `Stage0/train.json` (scene descriptions, never the continual tasks' data), with the
trainer's own loop and SmolLM2's chat template, and saves it as the shipped asset
`sefe_fast/assets/smol-projector/` (`projector.safetensors` + `projector.json`, whose
fingerprint names the LLM and tower it was trained between; `sefe_fast.model.smol` uses it
only if that fingerprint matches). Rebuild it with

    python -m sefe_fast.train.smol_stage0 --out sefe_fast/assets/smol-projector
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from sefe_fast.data.coin import collate_train
from sefe_fast.data.minicoin import generate_minicoin
from sefe_fast.io_utils import atomic_directory, atomic_write_json
from sefe_fast.model.accel import AccelConfig
from sefe_fast.model.build import assemble_llava
from sefe_fast.model.lora import projector_module
from sefe_fast.model.smol import (
    CACHE_META,
    PROJECTOR_ASSET_DIR,
    PROJECTOR_FILE,
    PROJECTOR_META,
    SmolStage0Config,
    smol_projector_fingerprint,
    smollm2_dir,
    tiny_vision_dir,
)
from sefe_fast.model.tiny import default_cache_root
from sefe_fast.train.distributed import init_distributed, shutdown_distributed
from sefe_fast.train.loop import LoopConfig, train_task
from sefe_fast.train.stage0 import load_stage0_captions
from sefe_fast.train.train_log import TrainLog


def pretrain_smol_projector(out_dir: Path, s0: SmolStage0Config) -> Path:
    """Train the projector (LLM and tower frozen) on Stage0 captions; save it to `out_dir`."""
    dist = init_distributed()
    if dist.distributed:
        raise ValueError("the smol projector pretraining runs in one process (no torchrun)")
    llm, tower = smollm2_dir(), tiny_vision_dir()
    fingerprint = smol_projector_fingerprint(
        json.loads((llm / CACHE_META).read_text())["fingerprint"],
        json.loads((tower / CACHE_META).read_text())["fingerprint"],
        s0,
    )
    data_dir = generate_minicoin(
        default_cache_root() / f"minicoin-stage0-seed{s0.data_seed}-n{s0.n_train}",
        seed=s0.data_seed,
        n_train=1,
        n_test=1,
        n_stage0=s0.n_train,
    )
    torch.manual_seed(s0.train_seed)
    bundle = assemble_llava(llm, tower, None, vision_feature_layer=-1)
    model = bundle.model
    model.requires_grad_(False)
    projector = projector_module(model)
    projector.requires_grad_(True)
    dataset, stats = load_stage0_captions(data_dir, bundle, s0.max_length)
    loop = LoopConfig(
        per_device_batch_size=s0.batch_size,
        max_steps=s0.steps,
        warmup_ratio=s0.warmup_ratio,
        max_grad_norm=1.0,
        log_every=10,
        save_every=s0.steps + 1,
        seed=s0.train_seed,
    )
    out_dir = Path(out_dir)
    log = TrainLog(out_dir.with_name(out_dir.name + ".train_log.jsonl"), True)
    pad = bundle.tokenizer.pad_token_id
    result = train_task(
        model,
        dataset,
        lambda items: collate_train(items, pad),
        [{"params": list(projector.parameters()), "lr": s0.lr}],
        loop,
        dist,
        accel=AccelConfig(),
        log=log,
        log_fields={"phase": "smol-projector"},
        save_checkpoint=lambda state: None,
        resume=None,
        desc="smol projector pretraining",
        image_token_id=bundle.image_token_id,
    )
    with atomic_directory(out_dir) as tmp:
        state = {k: v.detach().contiguous() for k, v in projector.state_dict().items()}
        save_file(state, str(tmp / PROJECTOR_FILE))
        atomic_write_json(
            tmp / PROJECTOR_META,
            {
                "fingerprint": fingerprint,
                "config": asdict(s0),
                "final_loss": result.last_loss,
                "seconds": result.seconds,
                "data": stats.summary(),
                "command": "python -m sefe_fast.train.smol_stage0 --out DIR",
            },
        )
    shutdown_distributed()
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """CLI: pretrain the smol projector into `--out` (the shipped asset by default)."""
    parser = argparse.ArgumentParser(
        prog="python -m sefe_fast.train.smol_stage0", description=__doc__
    )
    parser.add_argument("--out", type=Path, default=PROJECTOR_ASSET_DIR)
    parser.add_argument("--steps", type=int, default=SmolStage0Config.steps)
    parser.add_argument("--batch-size", type=int, default=SmolStage0Config.batch_size)
    parser.add_argument("--lr", type=float, default=SmolStage0Config.lr)
    args = parser.parse_args(argv)
    s0 = SmolStage0Config(steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    pretrain_smol_projector(args.out, s0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
