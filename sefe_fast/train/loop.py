"""The per-task training loop: AdamW, cosine schedule with warmup, gradient accumulation,
clipping, DDP (or FSDP, `sefe_fast.model.sharding`), periodic checkpoints, a NaN/inf stop,
and a tqdm bar + JSONL log on rank 0.

Non-finite values stop the task before they reach the weights: the loss is checked before
the backward's result is used, the global gradient norm (the one clipping computes anyway)
before each optimizer step, and the trained weights before the stage is saved
(`check_finite_weights`). The run stops with `NonFiniteLossError` (no step is skipped
silently) and keeps its last good in-task checkpoint.

One optimizer step consumes `grad_accum` micro-batches per rank. The loss of a step is the
token-mean cross-entropy over all of the step's answer tokens on all ranks (each
micro-batch's summed CE is divided by the global token count), so accumulation and data
parallelism give the same update as one big batch. The method's extra loss (RegLoRA
penalty) is added once per step. Data order is a DistributedSampler permutation per epoch,
cut into per-rank micro-batches (`sefe_fast.train.feed.BatchSchedule`), by default grouped
by length (`group_by_length`: samples of similar length share a micro-batch, so ASD's few
long explanations do not pad every batch); a resumed loop recomputes the order and starts
at its step.

Shared prompt prefix (`share_prompt_prefix`): every sample starts with the same tokens
(bos, the system line, "USER: " — about half of a tiny-model sequence in characters).
That prefix is run once per micro-batch and its key/value cache is repeated over the batch;
the rest of each sequence attends to it. Causal attention makes this exact (same loss and
gradients; only LoRA dropout on the prefix is shared by the batch). It needs the KV cache,
so it is off with gradient checkpointing (CUDA), where the prefix is a small share anyway.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from sefe_fast import paper_defaults as paper
from sefe_fast.generate import vision_anchor
from sefe_fast.model.accel import AccelConfig, autocast
from sefe_fast.model.kv_cache import cache_kwargs, output_cache
from sefe_fast.model.sharding import (
    clip_sharded_grad_norm,
    copy_full_into,
    full_tensor,
    gathered_copy,
    is_sharded,
    local_state_share,
    shard_optimizer_state,
)
from sefe_fast.train.checkpoint import capture_rng, restore_rng
from sefe_fast.train.distributed import (
    DistContext,
    all_reduce_sum,
    average_gradients,
    barrier,
    gather_objects,
)
from sefe_fast.train.feed import BatchSchedule, micro_batch_loader
from sefe_fast.train.train_log import TrainLog

# Test hook: the process exits abruptly (like a SIGKILL) after this many optimizer steps.
FAIL_AFTER_STEPS_ENV = "SEFE_FAST_FAIL_AFTER_STEPS"
_steps_done_in_process = 0


class NonFiniteLossError(RuntimeError):
    """The loss, a gradient or a weight became NaN or infinite; the run stops, the last
    checkpoint is kept."""


def check_finite_weights(model: torch.nn.Module, what: str) -> None:
    """NonFiniteLossError naming the first trainable parameter of `model` with a NaN/inf."""
    for name, param in model.named_parameters():
        if param.requires_grad and not bool(torch.isfinite(param.detach()).all()):
            raise NonFiniteLossError(
                f"{what}: trainable weight {name} holds NaN/inf after training; the stage is "
                "not saved (lower the learning rate or λ and rerun)"
            )


@dataclass(frozen=True)
class LoopConfig:
    """How one task is trained.

    per_device_batch_size: samples per micro-batch per rank; grad_accum: micro-batches per
    optimizer step; epochs: passes over the data (fractions allowed) unless max_steps (optimizer
    steps) is set; warmup_ratio: share of the steps with linear warmup; max_grad_norm: clip
    threshold (0 = off); log_every / save_every: in optimizer steps (save_every 0 = off);
    num_workers / prefetch_factor: DataLoader workers per rank and batches each keeps ready.
    """

    per_device_batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = paper.WARMUP_RATIO
    weight_decay: float = 0.0
    max_grad_norm: float = paper.MAX_GRAD_NORM
    log_every: int = 10
    save_every: int = 0
    seed: int = 0
    share_prompt_prefix: bool = True
    group_by_length: bool = True
    num_workers: int = 0
    prefetch_factor: int = 2


@dataclass
class LoopResult:
    """Optimizer steps run (total, of which `resumed_from` were done before), last loss, speed,
    and the share of the optimizer state's elements this rank held (1.0 unless sharded)."""

    steps: int
    resumed_from: int
    last_loss: float
    last_penalty: float
    tokens_per_s: float
    seconds: float
    optimizer_state_share: float = 1.0


def total_steps(cfg: LoopConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the task: max_steps if set, else ceil(epochs · steps per epoch)."""
    if cfg.max_steps is not None:
        return int(cfg.max_steps)
    return max(1, math.ceil(cfg.epochs * steps_per_epoch))


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss after the causal shift (labels[:, 1:] != -100)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that require grad, by name (whole: a sharded one is gathered,
    so every rank must call this)."""
    return {
        n: full_tensor(p.detach()).cpu().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters back into `model` (names must match exactly; a
    sharded parameter takes its rows of the saved whole tensor)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        diff = sorted(set(params) ^ set(state))[:4]
        raise ValueError(f"checkpoint does not match the model's trainable parameters: {diff}")
    for name, param in params.items():
        copy_full_into(param, state[name])


# Below this many shared tokens the prefix pass costs more than it saves.
MIN_SHARED_PREFIX = 32


def shared_prefix_length(batch: dict[str, torch.Tensor], image_token_id: int | None) -> int:
    """Tokens at the start of every row that are identical, unmasked, carry no label, and end
    before the first image token and before the first labelled position (0 if too few)."""
    ids, labels = batch["input_ids"], batch["labels"]
    same = (ids == ids[:1]).all(dim=0) & (batch["attention_mask"] == 1).all(dim=0)
    # The label at position P is predicted from the prefix's last logits: it must be -100.
    unlabeled = (labels == -100).all(dim=0)
    ok = same & torch.cat([unlabeled[1:], unlabeled.new_zeros(1)])
    if image_token_id is not None:
        ok &= ~(ids == image_token_id).any(dim=0)
    bad = torch.nonzero(~ok)
    length = int(bad[0]) if bad.numel() else ids.shape[1]
    return length if length >= MIN_SHARED_PREFIX and length < ids.shape[1] else 0


def forward_with_shared_prefix(
    model: torch.nn.Module,
    train_model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    num_items_in_batch: torch.Tensor,
    prefix: int,
):
    """The training forward with the first `prefix` tokens computed once for the batch.

    `model` (unwrapped) runs the prefix on one row with a KV cache; `train_model` (maybe
    DDP) runs the rest of every row on that cache. Returns the model output (loss as the
    plain forward's: summed answer-token CE / `num_items_in_batch`).
    """
    if prefix == 0:
        return train_model(**batch, num_items_in_batch=num_items_in_batch)
    ids = batch["input_ids"]
    cache = output_cache(model(input_ids=ids[:1, :prefix], use_cache=True))
    cache.batch_repeat_interleave(ids.shape[0])
    positions = torch.arange(prefix, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    return train_model(
        input_ids=ids[:, prefix:],
        pixel_values=batch.get("pixel_values"),
        attention_mask=batch["attention_mask"],
        labels=batch["labels"][:, prefix:],
        **cache_kwargs(cache),
        position_ids=positions,
        use_cache=False,
        num_items_in_batch=num_items_in_batch,
    )


def _maybe_fail_for_test() -> None:
    global _steps_done_in_process
    _steps_done_in_process += 1
    limit = os.environ.get(FAIL_AFTER_STEPS_ENV)
    if limit and _steps_done_in_process >= int(limit):
        # Every rank waits until rank 0 has written this step's checkpoint: a rank exiting
        # first makes torchrun kill rank 0 mid-write, and the test would not know which
        # checkpoint survived.
        barrier()
        os._exit(86)  # abrupt, no cleanup: what a SIGKILL leaves behind


def train_task(
    model: torch.nn.Module,
    dataset: Any,
    collate: Callable[[Sequence[dict]], dict[str, torch.Tensor]],
    param_groups: list[dict[str, Any]],
    cfg: LoopConfig,
    dist: DistContext,
    *,
    accel: AccelConfig,
    extra_loss: Callable[[torch.nn.Module, int], torch.Tensor | None] | None = None,
    after_step: Callable[[torch.nn.Module], None] | None = None,
    log: TrainLog | None = None,
    log_fields: dict[str, Any] | None = None,
    save_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
    desc: str = "train",
    image_token_id: int | None = None,
) -> LoopResult:
    """Train `model` in place on `dataset` for one task; return what happened.

    `param_groups`: AdamW groups (`params`, `lr`, optional `name`). `extra_loss(model, step)`
    adds a term once per step (it sees the unwrapped model); `after_step(model)` runs after
    every optimizer step (e.g. to hold weights a method must not change). `save_checkpoint(state)` is
    called on every rank every `cfg.save_every` steps with the loop state (rank 0 writes
    it); `resume` is such a state. Raises NonFiniteLossError on a NaN/inf loss, before the
    optimizer step, so the last checkpoint stays good. `image_token_id` bounds the shared
    prompt prefix (image features are never part of it).
    """
    log_fields = dict(log_fields or {})
    phase = str(log_fields.get("phase", desc))
    schedule = BatchSchedule(
        len(dataset),
        batch_size=cfg.per_device_batch_size,
        grad_accum=cfg.grad_accum,
        seed=cfg.seed,
        dist=dist,
        lengths=dataset.lengths() if cfg.group_by_length and hasattr(dataset, "lengths") else None,
    )
    n_steps = total_steps(cfg, schedule.steps_per_epoch)
    params = [p for group in param_groups for p in group["params"]]
    optimizer = torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(cfg.warmup_ratio * n_steps), n_steps
    )
    start = 0
    if resume is not None:
        load_trainable_state(model, resume["trainable"])
        optimizer.load_state_dict(resume["optimizer"])
        shard_optimizer_state(optimizer)  # saved whole; sharded parameters keep theirs sharded
        scheduler.load_state_dict(resume["scheduler"])
        if len(resume["rng"]) != dist.world_size:
            raise ValueError(
                f"checkpoint was written by {len(resume['rng'])} processes, this run has "
                f"{dist.world_size}: resume with the same number of processes"
            )
        restore_rng(resume["rng"][dist.rank])
        start = int(resume["step"])
    if log is not None:
        # Rows a killed attempt logged after the step this one starts from (all of them when
        # it was killed before its first checkpoint) are replaced by this attempt's.
        log.truncate_after(phase, start)
    train_model = model
    # A sharded model (FSDP) keeps its LoRA and projector whole on every rank and averages
    # their gradients itself after the step's micro-batches (otherwise DDP does it); trained
    # weights that are sharded themselves (fft) get theirs reduce-scattered by FSDP.
    sharded = is_sharded(model)
    sharded_trainables = any(isinstance(p, DTensor) for p in params)
    whole_params = [p for p in params if not isinstance(p, DTensor)]
    use_ddp = dist.distributed and not sharded
    if use_ddp:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    model.train()

    loader = micro_batch_loader(
        dataset,
        collate,
        schedule.micro_batch,
        first=start * cfg.grad_accum,
        count=(n_steps - start) * cfg.grad_accum,
        num_workers=cfg.num_workers,
        device=dist.device,
        seed=cfg.seed,
        prefetch_factor=cfg.prefetch_factor,
    )
    batches = iter(loader)
    non_blocking = dist.device.type == "cuda"  # pinned batches: the copy overlaps compute
    bar = tqdm(total=n_steps, initial=start, desc=desc, disable=not dist.is_main, unit="step")
    t_start, tokens_seen = time.perf_counter(), 0
    loss_value = penalty_value = tokens_per_s = 0.0
    for step in range(start, n_steps):
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        counts = torch.tensor(
            [
                sum(count_label_tokens(b) for b in micro),
                sum(int(b["attention_mask"].sum()) for b in micro),
            ],
            dtype=torch.float64,
        )
        n_label, n_tokens = all_reduce_sum(counts.to(dist.device)).tolist()
        # Each rank divides by its share of the global count; DDP then averages over ranks.
        per_rank_items = torch.tensor(max(n_label, 1.0) / dist.world_size, device=dist.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
        penalty = None
        for j, batch in enumerate(micro):
            last = j == len(micro) - 1
            no_sync = train_model.no_sync() if use_ddp and not last else contextlib.nullcontext()
            with no_sync, autocast(accel, dist.device):
                batch = {
                    k: None if v is None else v.to(dist.device, non_blocking=non_blocking)
                    for k, v in batch.items()
                }
                # Sharded, every rank must run the same number of forwards: no prefix pass.
                share = cfg.share_prompt_prefix and not sharded
                prefix = shared_prefix_length(batch, image_token_id) if share else 0
                out = forward_with_shared_prefix(model, train_model, batch, per_rank_items, prefix)
                loss = out.loss
                if batch.get("pixel_values") is None and (use_ddp or sharded):
                    # Text-only micro-batch: keep the projector/vision tower in this rank's
                    # graph so DDP's gradient buckets and FSDP's collectives stay in step.
                    loss = loss + vision_anchor(model, dist.device)
                if last and extra_loss is not None:
                    penalty = extra_loss(model, step)
                    if penalty is not None:
                        loss = loss + penalty
            loss.backward()
            ce_sum += out.loss.detach().double()
        if sharded:
            average_gradients(whole_params)
        stats = all_reduce_sum(ce_sum.reshape(1)) / dist.world_size
        loss_value = float(stats[0])
        penalty_value = float(penalty.detach()) if penalty is not None else 0.0
        if not (math.isfinite(loss_value) and math.isfinite(penalty_value)):
            raise NonFiniteLossError(
                f"{desc}: non-finite loss at optimizer step {step + 1} (cross-entropy "
                f"{loss_value}, penalty {penalty_value}); the run stops here and keeps its last "
                "good checkpoint (lower the learning rate or λ and rerun)"
            )
        # Clipping computes the global norm anyway; without clipping it costs one pass over the
        # (LoRA-sized) gradients.
        if sharded_trainables:
            grad_norm = float(clip_sharded_grad_norm(params, cfg.max_grad_norm))
        else:
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if cfg.max_grad_norm > 0
                else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            )
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"{desc}: non-finite gradient (global norm {grad_norm}) at optimizer step "
                f"{step + 1} with a finite loss ({loss_value}); the step was not applied. The "
                "run stops here and keeps its last good checkpoint (lower the learning rate or "
                "λ and rerun)"
            )
        optimizer.step()
        if after_step is not None:
            after_step(model)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        tokens_seen += n_tokens
        elapsed = time.perf_counter() - t_start
        tokens_per_s = tokens_seen / max(elapsed, 1e-9)
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss_value:.4f}", pen=f"{penalty_value:.4f}", tok_s=f"{tokens_per_s:.0f}"
        )
        done = step + 1
        if log is not None and (done % cfg.log_every == 0 or done == n_steps):
            log.append(
                {
                    **log_fields,
                    "phase": phase,
                    "step": done,
                    "steps": n_steps,
                    "loss": loss_value,
                    "penalty": penalty_value,
                    "lr": [g["lr"] for g in optimizer.param_groups],
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_s,
                    "elapsed_s": elapsed,
                }
            )
        if (
            save_checkpoint is not None
            and cfg.save_every
            and done % cfg.save_every == 0
            and done < n_steps
        ):
            save_checkpoint(
                {
                    "step": done,
                    "trainable": trainable_state(model),
                    # a copy (the live state keeps changing after this call returns), whole
                    "optimizer": gathered_copy(optimizer.state_dict()),
                    "scheduler": scheduler.state_dict(),
                    "rng": gather_objects(capture_rng()),
                }
            )
        _maybe_fail_for_test()
    bar.close()
    return LoopResult(
        steps=n_steps,
        resumed_from=start,
        last_loss=loss_value,
        last_penalty=penalty_value,
        tokens_per_s=tokens_per_s,
        seconds=time.perf_counter() - t_start,
        optimizer_state_share=local_state_share(optimizer),
    )
