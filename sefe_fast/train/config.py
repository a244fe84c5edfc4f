"""Every setting of a continual run, defined once: `RunConfig`.

Each field of `RunConfig` carries its type (the annotation), its default (the paper's,
from `sefe_fast.paper_defaults`, for the hyperparameters; docs/reference.md §3), its help
text, its command-line group and its valid range (`setting(...)`). From that one table:

- `sefe_fast.train.cli` builds the argparse flags (`--reg-lambda` for `reg_lambda`; a
  switch that is on by default becomes `--no-<name>`, one that is off `--<name>`);
- presets (`presets.py`) are plain dicts of overrides, checked by `check_overrides` (an
  unknown key is an error that names it);
- `validate` checks every value (from a preset or a flag) before any work starts;
- `MethodConfig` and `LoopConfig` are filled from the fields of the same name (`subset`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any

from sefe_fast import paper_defaults as paper
from sefe_fast.memory_budget import DEFAULT_BUDGET_GB
from sefe_fast.methods import METHODS
from sefe_fast.reglora.penalty import BACKENDS
from sefe_fast.tasks import COIN_TASKS


def parse_task_list(text: str) -> list[str]:
    """'ScienceQA,GQA' → ["ScienceQA", "GQA"] (CoIN task names, at least one)."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in COIN_TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown tasks {unknown}; choose from {COIN_TASKS}")
    repeated = _repeated(tasks)
    if repeated:
        raise argparse.ArgumentTypeError(f"tasks {repeated} are given more than once")
    return tasks


def _repeated(tasks: list[str]) -> list[str]:
    """Task names that occur more than once (each stage's outputs are named by its task)."""
    return sorted({t for t in tasks if tasks.count(t) > 1})


def parse_task_steps(text: str) -> dict[str, int]:
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


@dataclass(frozen=True)
class Setting:
    """What the table knows about one RunConfig field besides its type and default.

    `low`/`high`: bounds (inclusive unless `low_open`/`high_open`); `choices`: the allowed
    values, or a function returning them (read when used: e.g. methods registered later);
    `optional`: None is allowed (it means "off" or "the default of the data");
    `parse`: turns a flag's text into the value; `fingerprinted`: whether the value changes
    results (what a resumed run must share); `fingerprinted_when_set`: a setting added after
    runs were already being resumed, left out of the fingerprint while None so that a run
    directory started before it existed still resumes; `in_presets`: whether a preset may
    set it.
    """

    help: str
    group: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | Callable[[], tuple[Any, ...]] | None = None
    optional: bool = False
    parse: Any = None
    fingerprinted: bool = True
    in_presets: bool = True
    fingerprinted_when_set: bool = False

    def allowed(self) -> tuple[Any, ...] | None:
        """The allowed values now (None: any value of the type)."""
        return self.choices() if callable(self.choices) else self.choices


def setting(default: Any, help: str, group: str, **spec: Any) -> Any:
    """A RunConfig field with its default and its `Setting` (lists and dicts are copied)."""
    meta = {"setting": Setting(help=help, group=group, **spec)}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


POSITIVE = {"low": 0, "low_open": True}
NON_NEGATIVE = {"low": 0}
AT_LEAST_ONE = {"low": 1}
SHARE = {"low": 0, "high": 1}  # a fraction in [0, 1]


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a continual run (see each field's help, or `--help`)."""

    benchmark: str = setting(
        "coin", "the benchmark (task order of CoIN)", "run", choices=("coin",), in_presets=False
    )
    preset: str = setting("default", "named settings (presets.py)", "run", in_presets=False)
    output_dir: str = setting(
        "runs/coin",
        "run directory (resumes if present)",
        "run",
        fingerprinted=False,
        in_presets=False,
    )
    restart: bool = setting(
        False,
        "delete the progress in --output-dir (results, checkpoints, adapters, predictions, "
        "logs) and start over; without it a rerun with other settings refuses to start",
        "run",
        fingerprinted=False,
        in_presets=False,
    )
    model: str | None = setting(
        None,
        "HF-format LLaVA directory ('tiny' = the built-in tiny LLaVA, 'smol' = SmolLM2 LLaVA)",
        "model",
        optional=True,
    )
    llm: str | None = setting(
        None,
        "LLM directory (assembled with --vision-tower and --projector)",
        "model",
        optional=True,
    )
    vision_tower: str | None = setting(None, "CLIP vision model directory", "model", optional=True)
    projector: str | None = setting(
        None, "LLaVA pretraining mm_projector file (.bin/.safetensors)", "model", optional=True
    )
    data: str | None = setting(
        None, "folder with <Task>/train.json and <Task>/test.json", "data", optional=True
    )
    image_root: str | None = setting(
        None, "folder image paths are relative to (default: --data)", "data", optional=True
    )
    # `setting` gives lists and dicts a default_factory (a fresh copy per RunConfig)
    tasks: list[str] = setting(  # noqa: RUF009
        list(COIN_TASKS), "comma-separated task order (CoIN names)", "data", parse=parse_task_list
    )
    method: str = setting(
        "sefe", "continual method", "method", choices=lambda: tuple(sorted(METHODS))
    )
    seed: int = setting(0, "seeds mini-CoIN generation and training", "training", **NON_NEGATIVE)
    lora_r: int = setting(paper.LORA_R, "LoRA rank", "training", **AT_LEAST_ONE)
    lora_alpha: float = setting(
        paper.LORA_ALPHA, "LoRA alpha (scale alpha/r)", "training", **POSITIVE
    )
    lora_dropout: float = setting(
        paper.LORA_DROPOUT, "LoRA dropout probability", "training", low=0, high=1, high_open=True
    )
    lr: float = setting(paper.LR, "LoRA learning rate", "training", **POSITIVE)
    fft_lr: float | None = setting(
        None,
        "learning rate of the LLM weights for the methods that train them directly (fft, "
        "lota); None: --lr / 10, the ratio of LLaVA-1.5's full fine-tuning (2e-5) to LoRA's "
        "lr (2e-4)",
        "training",
        optional=True,
        fingerprinted_when_set=True,
        **POSITIVE,
    )
    projector_lr: float = setting(
        paper.PROJECTOR_LR, "projector learning rate (0 = frozen)", "training", **NON_NEGATIVE
    )
    weight_decay: float = setting(
        paper.WEIGHT_DECAY, "AdamW weight decay", "training", **NON_NEGATIVE
    )
    warmup_ratio: float = setting(
        paper.WARMUP_RATIO, "share of steps with linear warmup", "training", **SHARE
    )
    max_grad_norm: float = setting(
        paper.MAX_GRAD_NORM, "gradient clipping threshold (0 = off)", "training", **NON_NEGATIVE
    )
    epochs: float = setting(
        paper.EPOCHS, "epochs per task (unless --max-steps)", "training", **POSITIVE
    )
    max_steps: int | None = setting(
        None,
        "optimizer steps per task (overrides --epochs)",
        "training",
        optional=True,
        **AT_LEAST_ONE,
    )
    task_steps: dict[str, int] = setting(  # noqa: RUF009
        {},
        "optimizer steps for named tasks, e.g. 'GQA=140,OCRVQA=140' (wins over --max-steps for "
        "them; '' = none). Giving --max-steps or --epochs alone drops the preset's",
        "training",
        parse=parse_task_steps,
    )
    global_batch_size: int = setting(
        paper.GLOBAL_BATCH_SIZE, "samples per optimizer step, all ranks", "training", **AT_LEAST_ONE
    )
    per_device_batch_size: int = setting(
        16, "samples per micro-batch per rank", "training", **AT_LEAST_ONE
    )
    max_length: int = setting(
        paper.MAX_LENGTH, "tokens per sample (after image expansion)", "training", **AT_LEAST_ONE
    )
    reg_lambda: float = setting(
        paper.REG_LAMBDA, "λ of the RegLoRA penalty (paper: 2.5e3)", "method", **NON_NEGATIVE
    )
    mask_ratio: float = setting(
        paper.MASK_RATIO,
        "key-element share M per matrix (0.02 = 2%)",
        "method",
        low=0,
        high=1,
        low_open=True,
    )
    asd_ratio: float = setting(
        paper.ASD_RATIO, "ASD share X of each task's data (0.2 = 20%)", "method", **SHARE
    )
    reg_backend: str = setting(
        "auto",
        "RegLoRA penalty implementation (auto: triton on CUDA, torch elsewhere)",
        "method",
        choices=BACKENDS,
    )
    reg_gpu_budget_gb: float = setting(
        DEFAULT_BUDGET_GB,
        "GPU memory (GB, 10^9 B) RegLoRA's device masks may keep; each matrix gets the "
        "modelled-fastest plane that fits (1-bit+list, 2-bit, 4-bit); a matrix whose "
        "smallest form exceeds it keeps that form (docs/kernels.md)",
        "method",
        **POSITIVE,
    )
    olora_lambda1: float = setting(
        paper.OLORA_LAMBDA1,
        "λ1 of O-LoRA's orthogonality penalty (paper: 0.5)",
        "method",
        **NON_NEGATIVE,
    )
    olora_lambda2: float = setting(
        paper.OLORA_LAMBDA2,
        "λ2 of O-LoRA's L2 on the new factors (paper: 0)",
        "method",
        **NON_NEGATIVE,
    )
    lota_sparsity: float | None = setting(
        None,
        "LoTA: share of each trained matrix's entries left out of a task's mask (None: the "
        "paper's 0.9, i.e. 10% of the positions trained)",
        "method",
        optional=True,
        fingerprinted_when_set=True,
        low=0,
        high=1,
        high_open=True,
    )
    lota_calibration_steps: int | None = setting(
        None,
        "LoTA: optimizer steps of the calibration fine-tune that picks each task's mask "
        "(None: a tenth of the task's steps, or of its epochs)",
        "method",
        optional=True,
        fingerprinted_when_set=True,
        **AT_LEAST_ONE,
    )
    mixture_experts: int | None = setting(
        None,
        "LoRA experts per layer of moelora and smolora, each of rank lora_r / experts "
        "(None: 8, as CoIN's and SMoLoRA's scripts; smolora: half routed by the input, "
        "half by the instruction)",
        "method",
        optional=True,
        fingerprinted_when_set=True,
        **AT_LEAST_ONE,
    )
    max_new_tokens: int | None = setting(
        None,
        "greedy decoding length in tokens, stopping at end of sequence (None or 0 = each "
        "task's own cap; the paper preset: 1024, as the official evaluation)",
        "data",
        optional=True,
        fingerprinted_when_set=True,
        **NON_NEGATIVE,
    )
    textvqa_annotations: str | None = setting(
        None,
        "TextVQA_0.5.1_val.json (ten human answers per question) for scoring real CoIN's "
        "TextVQA (default: <data>/TextVQA/ or <image-root>/TextVQA/)",
        "data",
        optional=True,
        fingerprinted_when_set=True,
    )
    eval_batch_size: int = setting(
        64, "prompts per generation batch per rank", "training", **AT_LEAST_ONE
    )
    max_test_per_task: int | None = setting(
        None, "evaluate on the first N test records", "data", optional=True, **AT_LEAST_ONE
    )
    minicoin_n_train: int | None = setting(
        None, "mini-CoIN training samples per task", "data", optional=True, **AT_LEAST_ONE
    )
    minicoin_n_test: int | None = setting(
        None, "mini-CoIN test samples per task", "data", optional=True, **AT_LEAST_ONE
    )
    save_every: int = setting(
        0,
        "in-task checkpoint every N steps (0 = off)",
        "training",
        fingerprinted=False,
        **NON_NEGATIVE,
    )
    log_every: int = setting(
        10, "log every N optimizer steps", "training", fingerprinted=False, **AT_LEAST_ONE
    )
    flash_attn: bool = setting(True, "FlashAttention-2 on CUDA when installed", "speed")
    group_by_length: bool = setting(
        True,
        "micro-batches of samples of similar length (off: plain shuffled order)",
        "speed",
    )
    liger: bool = setting(True, "Liger kernels on CUDA when installed", "speed")
    bf16: bool = setting(True, "bf16 autocast on CUDA", "speed")
    gradient_checkpointing: bool = setting(True, "gradient checkpointing on CUDA", "speed")
    fsdp: bool = setting(
        False,
        "shard the frozen model over the ranks (FSDP2) for models that do not fit one device; "
        "the LoRA and projector stay whole on every rank (with fft the trained LLM weights and "
        "their AdamW state are sharded)",
        "speed",
    )
    skip_bad: bool = setting(False, "skip bad records", "data")
    num_proc: int = setting(
        1, "processes for tokenisation", "data", fingerprinted=False, **AT_LEAST_ONE
    )
    num_workers: int | None = setting(
        None,
        "DataLoader worker processes per rank that read and preprocess training images "
        "(default: 0 on CPU, up to 4 on CUDA); the batches are the same for any value",
        "data",
        fingerprinted=False,
        optional=True,
        **NON_NEGATIVE,
    )
    stage0_steps: int | None = setting(
        None,
        "tiny model: stage-0 caption steps, vision-tower steps capped at the same "
        "(default: the shipped weights')",
        "model",
        optional=True,
        **AT_LEAST_ONE,
    )

    def fingerprinted(self) -> dict[str, Any]:
        """The settings that determine the results (what a resumed run must share)."""
        return {
            k: v
            for k, v in asdict(self).items()
            if k not in NOT_FINGERPRINTED and not (k in FINGERPRINTED_WHEN_SET and v is None)
        }

    def max_steps_for(self, task: str) -> int | None:
        """Optimizer steps for `task`: its `task_steps` entry, else `max_steps` (None: epochs)."""
        return self.task_steps.get(task, self.max_steps)

    @property
    def uses_tiny(self) -> bool:
        """True for the built-in tiny LLaVA (no model given)."""
        return self.model == "tiny"

    @property
    def uses_smol(self) -> bool:
        """True for the built-in SmolLM2-135M LLaVA (`--preset smol`, sefe_fast.model.smol)."""
        return self.model == "smol"


def settings() -> dict[str, tuple[Field, Setting]]:
    """Field name → (dataclass field, its Setting), in RunConfig's order."""
    return {f.name: (f, f.metadata["setting"]) for f in fields(RunConfig)}


def default_value(f: Field) -> Any:
    """A field's default (a fresh copy for lists and dicts)."""
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


# Settings that do not change results (left out of the resume fingerprint).
NOT_FINGERPRINTED = frozenset(name for name, (_, s) in settings().items() if not s.fingerprinted)
FINGERPRINTED_WHEN_SET = frozenset(
    name for name, (_, s) in settings().items() if s.fingerprinted_when_set
)


def flag(name: str) -> str:
    """The command-line spelling of a setting: `reg_lambda` → `--reg-lambda`."""
    return "--" + name.replace("_", "-")


def check_overrides(overrides: dict[str, Any], source: str) -> None:
    """ValueError naming every key of `overrides` that no preset may set (`source`: where from)."""
    table = settings()
    unknown = sorted(k for k in overrides if k not in table)
    fixed = sorted(k for k in overrides if k in table and not table[k][1].in_presets)
    problems = [f"unknown setting {k!r}" for k in unknown]
    problems += [f"{k!r} is given on the command line, not by a preset" for k in fixed]
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def range_text(s: Setting) -> str:
    """The valid range in words, e.g. '> 0 and <= 1' ('' when unbounded)."""
    parts = []
    if s.low is not None:
        parts.append(f"{'>' if s.low_open else '>='} {s.low:g}")
    if s.high is not None:
        parts.append(f"{'<' if s.high_open else '<='} {s.high:g}")
    return " and ".join(parts)


def _problem(name: str, value: Any, f: Field, s: Setting) -> str | None:
    """What is wrong with `value` for setting `name` (None: nothing)."""
    where = f"{flag(name)} {value!r}"
    if value is None:
        return None if s.optional else f"{flag(name)}: a value is required"
    if s.allowed() is not None and value not in s.allowed():
        return f"{where}: choose one of {list(s.allowed())}"
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind.startswith("bool"):
        return None if isinstance(value, bool) else f"{where}: must be true or false"
    if kind.startswith("int") and not (isinstance(value, int) and not isinstance(value, bool)):
        return f"{where}: must be an integer"
    if kind.startswith("float") and not _is_number(value):
        return f"{where}: must be a number"
    if _is_number(value):
        if not math.isfinite(value):
            return f"{where}: must be a finite number"
        too_low = s.low is not None and (value <= s.low if s.low_open else value < s.low)
        too_high = s.high is not None and (value >= s.high if s.high_open else value > s.high)
        if too_low or too_high:
            return f"{where}: must be {range_text(s)}"
    if name == "tasks" and (
        not isinstance(value, list) or not value or any(t not in COIN_TASKS for t in value)
    ):
        return f"{flag(name)} {value!r}: a non-empty list of CoIN task names {list(COIN_TASKS)}"
    if name == "tasks" and _repeated(value):
        return f"{flag(name)} {value!r}: tasks {_repeated(value)} are given more than once"
    if name == "task_steps" and (
        not isinstance(value, dict)
        or any(t not in COIN_TASKS or not isinstance(n, int) or n < 1 for t, n in value.items())
    ):
        return f"{flag(name)} {value!r}: TASK → steps (a CoIN task name → an integer >= 1)"
    return None


def validate(values: dict[str, Any]) -> list[str]:
    """One message per invalid value in `values` (setting name → value); [] if all are valid."""
    table = settings()
    return [
        problem
        for name, value in values.items()
        if (problem := _problem(name, value, *table[name])) is not None
    ]


def subset(target: type, config: RunConfig, **derived: Any) -> Any:
    """A `target` dataclass filled from `config`'s fields of the same name, plus `derived`
    (the values that are not settings, e.g. the per-stage seed). A `target` field that is
    neither a setting nor derived keeps its own default (TypeError if it has none)."""
    settable = {f.name for f in fields(RunConfig)}
    names = [f.name for f in fields(target) if f.name not in derived and f.name in settable]
    return target(**{name: getattr(config, name) for name in names}, **derived)
