"""The run directory's layout: the one module that knows where a run keeps each file.

Every path below is `run_dir / <relative path>`; everything else in sefe_fast asks these
functions (stage numbers are 1-based, `stage_name` gives the `stage{NN}_{task}` part):

    results.json                                  accuracy matrix, metrics, config, timing
    run_state.json                                progress, for resuming (`RunState`)
    train_log.jsonl                               one row per logged optimizer step
    report.md (+ its PNG plots)                   `python -m sefe_fast.report`
    minicoin/                                     mini-CoIN, generated when no --data is given
    asd/<task>/train_x{NN}.json                   ASD-converted training files
    adapters/stage{NN}_{task}/                    what the stage trained, as the method saves
                                                  it (LoRA methods: PEFT adapter +
                                                  projector.safetensors; fft:
                                                  weights.safetensors)
    checkpoints/stage{NN}_{task}.pt               in-task checkpoint (removed when done)
    checkpoints/stage{NN}_{task}.{phase}.pt       the same for a method's extra phase (LoTA's
                                                  calibration), removed when it is done
    key_elements/stage{NN}_{task}.safetensors     RegLoRA's selected positions
    olora/stage{NN}_{task}.safetensors            O-LoRA's kept lora_A matrices
    lota/stage{NN}_{task}.safetensors             LoTA's sparse mask (key-element format)
    predictions/stage{NN}_{task}/{eval_task}.jsonl    greedy answers after stage NN
    run.lock                                      held by the run writing here (`sefe_fast.run_lock`)

Nothing a run stores refers to the run directory by its own path: files name each other
relative to it, so a moved or copied run directory resumes as itself.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

RESULTS_FILE = "results.json"
RUN_STATE_FILE = "run_state.json"
TRAIN_LOG_FILE = "train_log.jsonl"
REPORT_FILE = "report.md"
MINICOIN_DIR = "minicoin"
ASD_DIR = "asd"
ADAPTERS_DIR = "adapters"
CHECKPOINTS_DIR = "checkpoints"
KEY_ELEMENTS_DIR = "key_elements"
OLORA_DIR = "olora"
LOTA_DIR = "lota"
PREDICTIONS_DIR = "predictions"
LOCK_FILE = "run.lock"
# What a run's progress consists of: `--restart` removes these (and only these), and a
# directory holding any of them without `run_state.json` is not resumed blindly.
PROGRESS_ENTRIES = (
    RESULTS_FILE,
    RUN_STATE_FILE,
    TRAIN_LOG_FILE,
    REPORT_FILE,
    ASD_DIR,
    ADAPTERS_DIR,
    CHECKPOINTS_DIR,
    KEY_ELEMENTS_DIR,
    OLORA_DIR,
    LOTA_DIR,
    PREDICTIONS_DIR,
)
# A stage folder's name: `stage{NN}_{task}` (NN: 1-based stage, at least two digits).
STAGE_NAME = re.compile(r"^stage(\d{2,})_(.+)$")


def stage_name(stage: int, task: str) -> str:
    """`stage{NN}_{task}` (stage 1-based), the name every per-stage output uses."""
    if isinstance(stage, bool) or not isinstance(stage, int) or stage < 1:
        raise ValueError(f"stage must be a 1-based int, got {stage!r}")
    return f"stage{stage:02d}_{task}"


def results_path(run_dir: str | Path) -> Path:
    """`run_dir/results.json`."""
    return Path(run_dir) / RESULTS_FILE


def run_state_path(run_dir: str | Path) -> Path:
    """`run_dir/run_state.json`."""
    return Path(run_dir) / RUN_STATE_FILE


def train_log_path(run_dir: str | Path) -> Path:
    """`run_dir/train_log.jsonl`."""
    return Path(run_dir) / TRAIN_LOG_FILE


def report_path(run_dir: str | Path) -> Path:
    """`run_dir/report.md` (its plots are written beside it)."""
    return Path(run_dir) / REPORT_FILE


def minicoin_dir(run_dir: str | Path) -> Path:
    """`run_dir/minicoin/`: the generated mini-CoIN of a run without --data."""
    return Path(run_dir) / MINICOIN_DIR


def asd_path(run_dir: str | Path, task: str, file_name: str) -> Path:
    """`run_dir/asd/{task}/{file_name}`: a training file converted by ASD in this run."""
    return Path(run_dir) / ASD_DIR / task / file_name


def adapter_dir(run_dir: str | Path, stage: int, task: str) -> Path:
    """`run_dir/adapters/stage{NN}_{task}/`: the stage's saved weights (`save_stage` of the
    method: a LoRA method's adapter and projector)."""
    return Path(run_dir) / ADAPTERS_DIR / stage_name(stage, task)


def train_state_path(run_dir: str | Path, stage: int, task: str, phase: str = "") -> Path:
    """`run_dir/checkpoints/stage{NN}_{task}.pt`: the stage's in-task checkpoint
    (`stage{NN}_{task}.{phase}.pt` for a phase other than the task's training)."""
    suffix = f".{phase}.pt" if phase else ".pt"
    return Path(run_dir) / CHECKPOINTS_DIR / f"{stage_name(stage, task)}{suffix}"


def stage_checkpoints(run_dir: str | Path, stage: int, task: str) -> list[Path]:
    """Every in-task checkpoint of the stage that exists (the task's and its phases')."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    name = stage_name(stage, task)
    return sorted(p for p in folder.glob(f"{name}*.pt") if p.name.split(".")[0] == name)


def key_elements_path(run_dir: str | Path, stage: int, task: str) -> Path:
    """`run_dir/key_elements/stage{NN}_{task}.safetensors`: one task's selected positions."""
    return Path(run_dir) / KEY_ELEMENTS_DIR / f"{stage_name(stage, task)}.safetensors"


def olora_path(run_dir: str | Path, stage: int, task: str) -> Path:
    """`run_dir/olora/stage{NN}_{task}.safetensors`: one task's lora_A of every module."""
    return Path(run_dir) / OLORA_DIR / f"{stage_name(stage, task)}.safetensors"


def lota_mask_path(run_dir: str | Path, stage: int, task: str) -> Path:
    """`run_dir/lota/stage{NN}_{task}.safetensors`: one task's LoTA mask (key elements)."""
    return Path(run_dir) / LOTA_DIR / f"{stage_name(stage, task)}.safetensors"


def predictions_root(run_dir: str | Path) -> Path:
    """`run_dir/predictions/`: one folder per stage."""
    return Path(run_dir) / PREDICTIONS_DIR


def predictions_path(run_dir: str | Path, stage: int, trained_task: str, eval_task: str) -> Path:
    """`run_dir/predictions/stage{NN}_{trained_task}/{eval_task}.jsonl` (stage 1-based)."""
    return predictions_root(run_dir) / stage_name(stage, trained_task) / f"{eval_task}.jsonl"


def parse_stage_name(name: str) -> tuple[int, str] | None:
    """(stage, task) of a `stage{NN}_{task}` folder or file stem; None for another name."""
    match = STAGE_NAME.match(name)
    return None if match is None else (int(match.group(1)), match.group(2))


def lock_path(run_dir: str | Path) -> Path:
    """`run_dir/run.lock`: pid, host and start time of the run writing into `run_dir`."""
    return Path(run_dir) / LOCK_FILE


def progress_paths(run_dir: str | Path) -> list[Path]:
    """The entries of `PROGRESS_ENTRIES` present in `run_dir` (report plots included)."""
    root = Path(run_dir)
    found = [root / name for name in PROGRESS_ENTRIES if (root / name).exists()]
    return found + sorted(root.glob("*.png")) if root.is_dir() else []


def relative_to_run(run_dir: str | Path, path: str | Path) -> str:
    """`path` as stored in the run's own files: relative to `run_dir`, '/'-separated."""
    return Path(path).relative_to(Path(run_dir)).as_posix()


def resolve_in_run(run_dir: str | Path, stored: str) -> Path:
    """A path stored by `relative_to_run`, inside `run_dir`.

    Runs made before paths were stored relative kept them as typed at launch
    (`runs/x/key_elements/stage01_ScienceQA.safetensors`); their last two parts (layout
    folder, file name) are what addresses the file inside the run, wherever it now lives.
    """
    path = Path(stored)
    if path.is_absolute() or len(path.parts) > 2:
        path = Path(*path.parts[-2:])
    return Path(run_dir) / path


def remove_progress(run_dir: str | Path) -> list[str]:
    """Delete a run's progress (`progress_paths`) from `run_dir`; return the names removed.
    The generated mini-CoIN stays (it is reused only when its manifest matches)."""
    removed = []
    for path in progress_paths(run_dir):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    return removed
