"""The task-after-task driver: attach, train, save, let the method look, finish, evaluate.

For each task (stage s = 1..T), through the method's hooks (`sefe_fast.methods.base`):
the method attaches what the task trains (by default a fresh LoRA) and names its
parameter groups; that is trained on the task's data (as the method prepares it, with the
method's extra loss; in the method's phases — one by default, LoTA calibrates first) and
saved in the stage's folder; the method sees the trained model
(`after_task`: RegLoRA selects and keeps its key elements) and turns it back into a plain
model (`finish_stage`: by default the LoRA is merged); the model is evaluated on every
task seen so far (greedy decoding, sharded over ranks, scored on rank 0); `results.json`
and `run_state.json` are rewritten. Rerunning the same command resumes: completed stages
are replayed from their saved folders (`load_stage`, then `finish_stage`), an interrupted
task restarts from its last in-task checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import platform
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import peft
import torch
import transformers

import sefe_fast
from sefe_fast.data.coin import collate_train, load_train_dataset
from sefe_fast.data.minicoin import generate_minicoin
from sefe_fast.data.textvqa import find_textvqa_annotations
from sefe_fast.evaluation import (
    format_matrix,
    format_metric,
    score_predictions,
    write_predictions,
)
from sefe_fast.io_utils import atomic_write_json
from sefe_fast.methods import ContinualMethod, MethodConfig, build_method
from sefe_fast.methods.base import TRAIN, Phase
from sefe_fast.metrics import continual_metrics
from sefe_fast.model.accel import AccelConfig, apply_accel, compute_dtype
from sefe_fast.model.build import ModelBundle, assemble_llava, load_llava
from sefe_fast.model.lora import projector_module, projector_parameters
from sefe_fast.model.sharding import local_parameter_share, shard_model
from sefe_fast.model.smol import smol_parts
from sefe_fast.model.tiny import Stage0Config, TinyConfig
from sefe_fast.report import write_report
from sefe_fast.run_layout import (
    adapter_dir,
    minicoin_dir,
    predictions_path,
    remove_progress,
    results_path,
    stage_checkpoints,
    stage_name,
    train_log_path,
    train_state_path,
)
from sefe_fast.run_lock import hold_run_dir
from sefe_fast.train.checkpoint import (
    RunState,
    RunStateError,
    config_fingerprint,
    load_train_state,
    read_json_file,
    save_train_state,
    seed_everything,
)
from sefe_fast.train.config import RunConfig, subset
from sefe_fast.train.distributed import (
    DistContext,
    barrier,
    broadcast_object,
    init_distributed,
    run_on_main_first,
    shutdown_distributed,
)
from sefe_fast.train.feed import resolve_num_workers
from sefe_fast.train.loop import LoopConfig, check_finite_weights, train_task
from sefe_fast.train.stage0 import load_or_pretrain_tiny
from sefe_fast.train.stage_eval import StageEvaluator
from sefe_fast.train.train_log import TrainLog

log = logging.getLogger(__name__)


def run_continual(cfg: RunConfig) -> dict[str, Any] | None:
    """Run (or resume) the whole continual sequence; return results.json's content on rank 0."""
    dist = init_distributed()
    try:
        with hold_run_dir(cfg.output_dir, enabled=dist.is_main):
            return ContinualRun(cfg, dist).run()
    finally:
        shutdown_distributed()


def _stage_seed(seed: int, stage: int, rank: int | None = None, phase: str = TRAIN.name) -> int:
    """Seed for a stage's LoRA initialisation (rank None: same on every rank) or its dropout
    (a phase other than the task's training, e.g. LoTA's calibration, gets its own)."""
    base = seed * 100_003 + stage * 1_009 + (0 if rank is None else 7 + rank)
    return base if phase == TRAIN.name else base + zlib.crc32(phase.encode()) % 100_000 * 13


class ContinualRun:
    """One continual run on one rank (all ranks run the same steps; rank 0 writes)."""

    def __init__(self, cfg: RunConfig, dist: DistContext) -> None:
        """Set up everything a stage needs: run directory, method, data, base model, state."""
        self.cfg, self.dist = cfg, dist
        self.run_dir = Path(cfg.output_dir)
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if cfg.restart:
                removed = remove_progress(self.run_dir)
                print(f"[sefe_fast] --restart: removed {', '.join(removed) or 'nothing'}")
        barrier()
        self.accel = AccelConfig(
            flash_attn=cfg.flash_attn,
            liger=cfg.liger,
            bf16=cfg.bf16,
            gradient_checkpointing=cfg.gradient_checkpointing,
        )
        per_step = cfg.per_device_batch_size * dist.world_size
        if cfg.global_batch_size % per_step:
            raise ValueError(
                f"--global-batch-size {cfg.global_batch_size} is not a multiple of "
                f"--per-device-batch-size {cfg.per_device_batch_size} x {dist.world_size} ranks"
            )
        self.grad_accum = cfg.global_batch_size // per_step
        self.sharded = cfg.fsdp and dist.distributed
        if cfg.fsdp and not dist.distributed and dist.is_main:
            print("[sefe_fast] --fsdp with one process: nothing to shard over, running unsharded")
        self.method: ContinualMethod = build_method(cfg.method, subset(MethodConfig, cfg))
        self.timing: dict[str, dict[str, float]] = {}
        # Before any work: a directory holding another run's progress refuses here.
        self.fingerprint = config_fingerprint(self.fingerprinted_config())
        self.state = self.load_state()
        self.train_log = TrainLog(train_log_path(self.run_dir), enabled=dist.is_main)
        self.data_dir, self.image_root = self.prepare_data()
        self.bundle, self.accel_info = self.build_model()
        self.method.bind_model(self.bundle)
        self.evaluator = StageEvaluator(
            cfg, dist, self.bundle, self.data_dir, self.image_root, self.accel, self.sharded
        )
        self.evaluator.check_test_sets(cfg.tasks)  # a bad test file stops the run here

    # ------------------------------------------------------------------ setup

    def prepare_data(self) -> tuple[Path, Path]:
        """(data dir with <Task>/train.json + test.json, image root); mini-CoIN if no --data."""
        cfg = self.cfg
        if cfg.data is not None:
            data = Path(cfg.data)
            for task in cfg.tasks:
                for name in ("train.json", "test.json"):
                    if not (data / task / name).is_file():
                        raise FileNotFoundError(f"--data {data}: missing {task}/{name}")
            image_root = Path(cfg.image_root) if cfg.image_root else data
            if "TextVQA" in cfg.tasks:  # fail before any training, naming the paths tried
                find_textvqa_annotations(data, image_root, cfg.textvqa_annotations)
            return data, image_root
        data = run_on_main_first(
            self.dist,
            generate_minicoin,
            minicoin_dir(self.run_dir),
            seed=cfg.seed,
            n_train=cfg.minicoin_n_train,
            n_test=cfg.minicoin_n_test,
            n_stage0=1,  # stage 0 is the base model's business, not the run's
            progress=self.dist.is_main,
        )
        return Path(data), Path(data)

    def build_model(self) -> tuple[ModelBundle, dict[str, Any]]:
        """The base model (stage-0 tiny LLaVA, a HF LLaVA, or assembled), frozen, on device,
        and what `apply_accel` (and sharding) report about it."""
        cfg, dist = self.cfg, self.dist
        dtype = compute_dtype(self.accel, dist.device)
        if cfg.uses_tiny:
            s0 = Stage0Config()
            if cfg.stage0_steps is not None:
                s0 = s0.with_steps(cfg.stage0_steps)
            bundle = load_or_pretrain_tiny(dist, TinyConfig(), s0)
        elif cfg.uses_smol:
            llm, tower, projector = run_on_main_first(dist, smol_parts)
            # the tiny tower has 2 layers: its last one is the feature layer (as for `tiny`)
            bundle = assemble_llava(llm, tower, projector, dtype=dtype, vision_feature_layer=-1)
        elif cfg.llm is not None:
            bundle = assemble_llava(cfg.llm, cfg.vision_tower, cfg.projector, dtype=dtype)
        else:
            bundle = load_llava(cfg.model, dtype=dtype)
        model = bundle.model
        if not self.sharded:
            model = model.to(dist.device)
        for param in model.parameters():
            param.requires_grad_(False)
        accel_info = apply_accel(model, self.accel, dist.device)
        if self.sharded:
            # Each block moves to the device as it is sharded: the whole model never has to
            # fit there.
            blocks = shard_model(
                model, dist.device, dist.world_size, keep_whole=projector_module(model).parameters()
            )
            share = local_parameter_share(model)
            accel_info.update(fsdp_blocks=blocks, fsdp_rank0_param_share=round(share, 4))
            if dist.is_main:
                print(
                    f"[sefe_fast] fsdp: {blocks} blocks sharded; rank 0 holds {share:.1%} of "
                    "the parameters"
                )
        return bundle, accel_info

    def fingerprinted_config(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it resumes."""
        return {**self.cfg.fingerprinted(), "world_size": self.dist.world_size}

    def load_state(self) -> RunState:
        """This run's saved progress (rank 0 reads, all ranks get it), else a fresh one, saved
        at once so every later file of the run (checkpoint, adapter) is tied to these
        settings; a resumed run's method state and timing are restored."""
        cfg, dist = self.cfg, self.dist
        saved_state = None
        if dist.is_main:
            saved_state = RunState.load_or_fresh(
                self.run_dir, self.fingerprint, cfg.tasks, self.fingerprinted_config()
            )
            saved_state.save(self.run_dir)  # unchanged when resumed; written when fresh
        state: RunState = broadcast_object(saved_state)
        if state.completed:
            self.method.load_state_dict(state.method_state, self.run_dir)
            saved = results_path(self.run_dir)
            if saved.is_file():
                self.timing = read_json_file(saved, "the run's results").get("timing", {})
        return state

    # ------------------------------------------------------------------ stages

    def loop_config(self, stage: int, task: str) -> LoopConfig:
        """The per-task loop settings (data order seeded per stage; `task_steps` wins over
        `max_steps` for the tasks it names)."""
        cfg = self.cfg
        return subset(
            LoopConfig,
            cfg,
            grad_accum=self.grad_accum,
            max_steps=cfg.max_steps_for(task),
            seed=_stage_seed(cfg.seed, stage),
            share_prompt_prefix=not self.accel_info["gradient_checkpointing"]
            and not self.sharded
            and self.method.shares_prompt_prefix,
            num_workers=resolve_num_workers(
                cfg.num_workers, self.dist.device, self.dist.world_size
            ),
        )

    def load_saved_stage(self, model: torch.nn.Module, stage: int, task: str) -> torch.nn.Module:
        """The stage as saved (by default its LoRA and projector) on `model`
        (`method.load_stage`)."""
        directory = adapter_dir(self.run_dir, stage, task)
        try:
            trained = self.method.load_stage(model, directory)
        except Exception as error:  # safetensors, peft and json raise several types
            fix = (
                "restore it from a copy, or start over with --restart"
                if stage in self.state.completed
                else "delete that folder to train the stage again"
            )
            raise RunStateError(
                f"{directory}: the saved weights of stage {stage} ({task}) cannot be read "
                f"({type(error).__name__}: {error}); {fix}"
            ) from error
        return trained

    def train_stage(self, model: torch.nn.Module, stage: int, task: str) -> torch.nn.Module:
        """Attach what the method trains (a fresh LoRA by default), train it on `task`
        (resuming its in-task checkpoint) and save it in the stage's folder."""
        cfg, dist, bundle = self.cfg, self.dist, self.bundle
        train_file = run_on_main_first(
            dist,
            self.method.prepare_train_file,
            task,
            self.data_dir / task / "train.json",
            self.run_dir,
        )
        dataset, stats = load_train_dataset(
            train_file,
            self.image_root,
            bundle.tokenizer,
            bundle.image_processor,
            image_token_id=bundle.image_token_id,
            num_image_tokens=bundle.num_image_tokens,
            max_length=cfg.max_length,
            skip_bad=cfg.skip_bad,
            num_proc=cfg.num_proc,
        )
        if dist.is_main:
            print(f"[sefe_fast] stage {stage} {task}: {stats.summary()}", flush=True)
        seed_everything(_stage_seed(cfg.seed, stage))  # same LoRA init on every rank
        trained = self.method.attach(model, cfg)
        if not self.sharded:  # sharded, peft puts the factors beside their (device) weights
            trained = trained.to(dist.device)
        for param in projector_parameters(trained):
            param.data = param.data.float()  # the projector trains in fp32 (autocast computes)
        self.method.before_task(trained, task, stage)
        for phase in self.method.phases(cfg, stage, task, self.run_dir):
            self.train_phase(trained, dataset, stage, task, phase)
        check_finite_weights(trained, f"stage {stage} {task}")
        self.method.save_stage(trained, adapter_dir(self.run_dir, stage, task), dist.is_main)
        barrier()
        return trained

    def train_phase(
        self, trained: torch.nn.Module, dataset: Any, stage: int, task: str, phase: Phase
    ) -> None:
        """Run one phase of the task's training (resuming its in-task checkpoint); the method's
        `begin_phase` before it, `end_phase` after it."""
        cfg, dist, method = self.cfg, self.dist, self.method
        main = phase == TRAIN
        method.begin_phase(trained, phase, stage, task, self.run_dir)
        # dropout differs per rank (and per phase)
        seed_everything(_stage_seed(cfg.seed, stage, dist.rank, phase.name))
        groups = method.trainable_groups(trained, cfg)
        ckpt_path = train_state_path(self.run_dir, stage, task, "" if main else phase.name)
        resume = load_train_state(ckpt_path, self.fingerprint)
        what = task if main else f"{task} {phase.name}"
        if resume is not None and dist.is_main:
            print(f"[sefe_fast] resuming {what} from step {resume['step']} ({ckpt_path})")
        loop_config = self.loop_config(stage, task)
        if phase.max_steps is not None:
            loop_config = dataclasses.replace(loop_config, max_steps=phase.max_steps)
        elif phase.epochs is not None:
            loop_config = dataclasses.replace(loop_config, max_steps=None, epochs=phase.epochs)
        log_phase = stage_name(stage, task) + ("" if main else f".{phase.name}")
        result = train_task(
            trained,
            dataset,
            functools.partial(collate_train, pad_token_id=self.bundle.tokenizer.pad_token_id),
            groups,
            loop_config,
            dist,
            accel=self.accel,
            extra_loss=method.extra_loss,
            after_step=method.after_step,
            log=self.train_log,
            log_fields={"phase": log_phase, "stage": stage, "task": task},
            save_checkpoint=(lambda state: save_train_state(ckpt_path, state, self.fingerprint))
            if dist.is_main
            else (lambda state: None),
            resume=resume,
            desc=f"[{stage}/{len(cfg.tasks)}] {what}",
            image_token_id=self.bundle.image_token_id,
        )
        method.end_phase(trained, phase, stage, task, self.run_dir, write=dist.is_main)
        timing = self.timing.setdefault(task, {})
        if main:
            timing["train_s"] = result.seconds
            timing["tokens_per_s"] = result.tokens_per_s
        else:  # its result is saved by end_phase: the checkpoint is no longer needed
            timing[f"{phase.name}_s"] = result.seconds
            if dist.is_main:
                ckpt_path.unlink(missing_ok=True)
        if self.sharded:  # 1.0 for a LoRA (replicated), about 1/N for sharded weights (fft)
            self.accel_info["fsdp_rank0_optimizer_state_share"] = round(
                result.optimizer_state_share, 4
            )
        barrier()

    # ------------------------------------------------------------------ evaluation

    def evaluate_stage(self, model: torch.nn.Module, stage: int, task: str) -> None:
        """Evaluate on tasks 1..stage; rank 0 writes predictions and fills the matrix row."""
        t0 = time.perf_counter()
        for index, eval_task in enumerate(self.cfg.tasks[:stage]):
            self.method.before_predictions(model, eval_task)
            rows = self.evaluator.predictions(model, eval_task)
            if rows is None:
                continue
            write_predictions(predictions_path(self.run_dir, stage, task, eval_task), rows)
            scored = score_predictions(eval_task, rows)
            self.state.accuracy[stage - 1][index] = scored.accuracy
            self.state.scores[stage - 1][index] = scored.to_dict()
        self.timing.setdefault(task, {})["eval_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ results

    def results(self) -> dict[str, Any]:
        """results.json's content for the stages completed so far."""
        return {
            "tasks": list(self.cfg.tasks),
            "accuracy": self.state.accuracy,
            "metrics": continual_metrics(self.state.accuracy),
            "method": self.cfg.method,
            "seed": self.cfg.seed,
            "config": {
                **self.cfg.fingerprinted(),
                "world_size": self.dist.world_size,
                "grad_accum": self.grad_accum,
                "accel": self.accel_info,
                "model_source": self.bundle.source,
                "method_detail": self.method.describe(),
            },
            "versions": {
                "sefe_fast": sefe_fast.__version__,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
            "scores": self.state.scores,
            "timing": self.timing,
        }

    def record_stage(self, stage: int, task: str) -> None:
        """Rank 0: record the stage as completed; write results.json and run_state.json."""
        if self.dist.is_main:
            self.state.completed.append(stage)
            self.state.method_state = self.method.state_dict()
            atomic_write_json(results_path(self.run_dir), self.results())
            self.state.save(self.run_dir)
            for path in stage_checkpoints(self.run_dir, stage, task):
                path.unlink(missing_ok=True)
        barrier()

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any] | None:
        """All stages in order (replaying completed ones); then the summary and report."""
        cfg, dist = self.cfg, self.dist
        model = self.bundle.model
        method = self.method
        for stage, task in enumerate(cfg.tasks, start=1):
            if stage in self.state.completed:
                model = method.finish_stage(self.load_saved_stage(model, stage, task))
                continue
            if method.is_stage_saved(adapter_dir(self.run_dir, stage, task)):
                trained = self.load_saved_stage(model, stage, task)  # trained, not evaluated
            else:
                trained = self.train_stage(model, stage, task)
            method.after_task(trained, task, stage, self.run_dir, write=dist.is_main)
            model = method.finish_stage(trained)
            self.evaluate_stage(model, stage, task)
            self.record_stage(stage, task)
        if not dist.is_main:
            return None
        results = self.results()
        self.print_summary(results)
        write_report(self.run_dir)
        return results

    def print_summary(self, results: dict[str, Any]) -> None:
        """The accuracy matrix and the continual metrics, on stdout."""
        print(f"\naccuracy (%), row = after training, column = task ({self.cfg.method}):")
        print(format_matrix(results["tasks"], results["accuracy"]))
        metrics = results["metrics"]
        print("  ".join(f"{k} {format_metric(metrics[k])}" for k in ("MFT", "MFN", "MAA", "BWT")))
        print(f"results: {results_path(self.run_dir)}", file=sys.stdout, flush=True)
