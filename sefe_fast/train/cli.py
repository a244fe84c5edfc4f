"""`python -m sefe_fast.train coin [flags]` (or under `torchrun`): parse flags into a RunConfig.

A preset (`--preset`, see `presets.py`) gives every setting a value; each flag given on the
command line overrides it.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from typing import Any

from sefe_fast.methods import METHODS
from sefe_fast.tasks import COIN_TASKS
from sefe_fast.train.presets import PRESETS, REQUIRES_MODEL_AND_DATA

# Settings that do not change results (left out of the resume fingerprint).
NOT_FINGERPRINTED = frozenset({"output_dir", "save_every", "log_every", "num_proc"})


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a continual run (see `--help` for each one's meaning and unit)."""

    benchmark: str
    preset: str
    output_dir: str
    model: str | None
    llm: str | None
    vision_tower: str | None
    projector: str | None
    data: str | None
    image_root: str | None
    tasks: list[str]
    method: str
    seed: int
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lr: float
    projector_lr: float
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    epochs: float
    max_steps: int | None
    task_steps: dict[str, int]
    global_batch_size: int
    per_device_batch_size: int
    max_length: int
    reg_lambda: float
    mask_ratio: float
    asd_ratio: float
    reg_backend: str
    olora_lambda1: float
    olora_lambda2: float
    eval_batch_size: int
    max_test_per_task: int | None
    minicoin_n_train: int | None
    minicoin_n_test: int | None
    save_every: int
    log_every: int
    flash_attn: bool
    group_by_length: bool
    liger: bool
    bf16: bool
    gradient_checkpointing: bool
    fsdp: bool
    skip_bad: bool
    num_proc: int
    stage0_steps: int | None

    def fingerprinted(self) -> dict[str, Any]:
        """The settings that determine the results (what a resumed run must share)."""
        return {k: v for k, v in asdict(self).items() if k not in NOT_FINGERPRINTED}

    def max_steps_for(self, task: str) -> int | None:
        """Optimizer steps for `task`: its `task_steps` entry, else `max_steps` (None: epochs)."""
        return self.task_steps.get(task, self.max_steps)

    @property
    def uses_tiny(self) -> bool:
        """True for the built-in tiny LLaVA (no model given)."""
        return self.model == "tiny"


def _task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in COIN_TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown tasks {unknown}; choose from {COIN_TASKS}")
    return tasks


def _task_steps(text: str) -> dict[str, int]:
    """'GQA=140,OCRVQA=140' → {"GQA": 140, "OCRVQA": 140} ('' → {})."""
    out: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        task, sep, steps = item.partition("=")
        if not sep or task.strip() not in COIN_TASKS or not steps.strip().isdigit():
            raise argparse.ArgumentTypeError(
                f"--task-steps: {item!r} is not TASK=STEPS with TASK one of {COIN_TASKS} "
                "and STEPS a positive integer"
            )
        if int(steps) < 1:
            raise argparse.ArgumentTypeError(f"--task-steps: {item!r}: steps must be >= 1")
        out[task.strip()] = int(steps)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every default is None so the preset fills it in."""
    p = argparse.ArgumentParser(
        prog="python -m sefe_fast.train",
        description="Continual instruction tuning of a LLaVA model on CoIN (SEFE: ASD + RegLoRA).",
    )
    p.add_argument("benchmark", choices=["coin"], help="the benchmark (task order of CoIN)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--output-dir", default="runs/coin", help="run directory (resumes if present)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="HF-format LLaVA directory ('tiny' = the built-in tiny LLaVA)")
    g.add_argument("--llm", help="LLM directory (assembled with --vision-tower and --projector)")
    g.add_argument("--vision-tower", help="CLIP vision model directory")
    g.add_argument("--projector", help="LLaVA pretraining mm_projector file (.bin/.safetensors)")
    g.add_argument(
        "--stage0-steps",
        type=int,
        help="tiny model: stage-0 caption steps, vision-tower steps capped at the same "
        "(default: the shipped weights')",
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", help="folder with <Task>/train.json and <Task>/test.json")
    g.add_argument("--image-root", help="folder image paths are relative to (default: --data)")
    g.add_argument("--tasks", type=_task_list, help="comma-separated task order (CoIN names)")
    g.add_argument("--max-test-per-task", type=int, help="evaluate on the first N test records")
    g.add_argument("--minicoin-n-train", type=int, help="mini-CoIN training samples per task")
    g.add_argument("--minicoin-n-test", type=int, help="mini-CoIN test samples per task")
    g.add_argument("--skip-bad", action="store_true", default=None, help="skip bad records")
    g.add_argument("--num-proc", type=int, help="processes for tokenisation")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=sorted(METHODS))
    g.add_argument("--reg-lambda", type=float, help="λ of the RegLoRA penalty (paper: 2.5e3)")
    g.add_argument("--mask-ratio", type=float, help="key-element share M per matrix (0.02 = 2%%)")
    g.add_argument("--asd-ratio", type=float, help="ASD share X of each task's data (0.2 = 20%%)")
    g.add_argument(
        "--reg-backend",
        choices=["auto", "torch", "reference", "triton", "triton_tile", "triton_gather"],
    )
    g.add_argument(
        "--olora-lambda1", type=float, help="λ1 of O-LoRA's orthogonality penalty (paper: 0.5)"
    )
    g.add_argument(
        "--olora-lambda2", type=float, help="λ2 of O-LoRA's L2 on the new factors (paper: 0)"
    )
    g = p.add_argument_group("training")
    g.add_argument("--seed", type=int, help="seeds mini-CoIN generation and training")
    g.add_argument("--lora-r", type=int)
    g.add_argument("--lora-alpha", type=float)
    g.add_argument("--lora-dropout", type=float)
    g.add_argument("--lr", type=float, help="LoRA learning rate")
    g.add_argument("--projector-lr", type=float, help="projector learning rate")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-ratio", type=float, help="share of steps with linear warmup")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping threshold (0 = off)")
    g.add_argument("--epochs", type=float, help="epochs per task (unless --max-steps)")
    g.add_argument("--max-steps", type=int, help="optimizer steps per task (overrides --epochs)")
    g.add_argument(
        "--task-steps",
        type=_task_steps,
        help="optimizer steps for named tasks, e.g. 'GQA=140,OCRVQA=140' (wins over "
        "--max-steps for them; '' = none). Giving --max-steps or --epochs alone drops the "
        "preset's",
    )
    g.add_argument("--global-batch-size", type=int, help="samples per optimizer step, all ranks")
    g.add_argument("--per-device-batch-size", type=int, help="samples per micro-batch per rank")
    g.add_argument("--max-length", type=int, help="tokens per sample (after image expansion)")
    g.add_argument("--eval-batch-size", type=int, help="prompts per generation batch per rank")
    g.add_argument("--save-every", type=int, help="in-task checkpoint every N steps (0 = off)")
    g.add_argument("--log-every", type=int, help="log every N optimizer steps")
    g = p.add_argument_group("speed")
    g.add_argument(
        "--fsdp",
        action="store_true",
        default=None,
        help="shard the frozen model over the ranks (FSDP2) for models that do not fit one "
        "device; the LoRA and projector stay whole on every rank",
    )
    g.add_argument("--no-flash-attn", dest="flash_attn", action="store_false", default=None)
    g.add_argument(
        "--no-group-by-length",
        dest="group_by_length",
        action="store_false",
        default=None,
        help="micro-batches in plain shuffled order (default: samples of similar length together)",
    )
    g.add_argument("--no-liger", dest="liger", action="store_false", default=None)
    g.add_argument("--no-bf16", dest="bf16", action="store_false", default=None)
    g.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        default=None,
    )
    return p


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Flags → RunConfig (preset values for every flag not given); errors name the flag."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    preset = dict(PRESETS[args["preset"]])
    values: dict[str, Any] = {}
    for f in fields(RunConfig):
        given = args.get(f.name)
        values[f.name] = given if given is not None else preset.get(f.name)
    values["task_steps"] = dict(values["task_steps"] or {})  # never the preset's own dict
    if args["task_steps"] is None and (args["max_steps"] is not None or args["epochs"] is not None):
        values["task_steps"] = {}  # a step count given on the command line is for every task
    needs_model = args["preset"] in REQUIRES_MODEL_AND_DATA
    if needs_model and values["model"] is None and values["llm"] is None:
        parser.error(f"--preset {args['preset']} needs --model (or --llm/--vision-tower)")
    if needs_model and values["data"] is None:
        parser.error(f"--preset {args['preset']} needs --data")
    if values["llm"] is not None:
        if values["vision_tower"] is None:
            parser.error("--llm needs --vision-tower (and usually --projector)")
        values["model"] = None
    elif values["model"] == "tiny" and values["data"] is not None:
        parser.error("the tiny model only knows mini-CoIN: give --model with --data")
    if values["model"] not in (None, "tiny") and values["data"] is None:
        parser.error("--model needs --data (CoIN in LLaVA format)")
    return RunConfig(**values)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m sefe_fast.train`."""
    config = parse_config(argv)
    from sefe_fast.train.continual import run_continual

    run_continual(config)
    return 0
