"""The run directory's layout: the one module that knows where a run keeps each file.

Every path below is `run_dir / <relative path>`; everything else in sefe_fast asks these
functions (stage numbers are 1-based, `stage_name` gives the `stage{NN}_{task}` part):

    results.json                                  accuracy matrix, metrics, config, timing
    run_state.json                                progress, for resuming (`RunState`)
    train_log.jsonl                               one row per logged optimizer step
    report.md (+ its PNG plots)                   `python -m sefe_fast.report`
    minicoin/                                     mini-CoIN, generated when no --data is given
    asd/<task>/train_x{NN}.json                   ASD-converted training files
    adapters/stage{NN}_{task}/                    PEFT adapter + projector.safetensors
    checkpoints/stage{NN}_{task}.pt               in-task checkpoint (removed when done)
    key_elements/stage{NN}_{task}.safetensors     RegLoRA's selected positions
    olora/stage{NN}_{task}.safetensors            O-LoRA's kept lora_A matrices
    predictions/stage{NN}_{task}/{eval_task}.jsonl    greedy answers after stage NN
"""

from __future__ import annotations

import re
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
PREDICTIONS_DIR = "predictions"
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
    """`run_dir/adapters/stage{NN}_{task}/`: the stage's adapter (and projector)."""
    return Path(run_dir) / ADAPTERS_DIR / stage_name(stage, task)


def train_state_path(run_dir: str | Path, stage: int, task: str) -> Path:
    """`run_dir/checkpoints/stage{NN}_{task}.pt`: the stage's in-task checkpoint."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"{stage_name(stage, task)}.pt"


def key_elements_path(run_dir: str | Path, stage: int, task: str) -> Path:
    """`run_dir/key_elements/stage{NN}_{task}.safetensors`: one task's selected positions."""
    return Path(run_dir) / KEY_ELEMENTS_DIR / f"{stage_name(stage, task)}.safetensors"


def olora_path(run_dir: str | Path, stage: int, task: str) -> Path:
    """`run_dir/olora/stage{NN}_{task}.safetensors`: one task's lora_A of every module."""
    return Path(run_dir) / OLORA_DIR / f"{stage_name(stage, task)}.safetensors"


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
