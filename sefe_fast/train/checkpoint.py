"""What a run keeps on disk to resume, and how it is written (atomically, by rank 0).

Where each file lives is `sefe_fast.run_layout`'s business; what they hold:

- `run_state.json` (`RunState`): the config fingerprint, the stages trained and completed,
  the accuracy matrix so far and the method's state after the last completed stage;
- each stage's folder (`adapters/stage{NN}_{task}/`), written by the method's
  `save_stage`: for the LoRA methods its LoRA in PEFT format, with the stage's projector in
  `projector.safetensors` beside the adapter files. The base model plus the stages
  replayed in order (`load_stage`, `finish_stage`: load, merge) rebuilds the model after
  any stage, bit for bit, without storing merged weights;
- each stage's in-task checkpoint (`save_train_state`): the state inside a task every
  `--save-every` optimizer steps (trainable weights, optimizer, schedule, every rank's
  RNG), removed when the stage completes.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sefe_fast.io_utils import atomic_path, atomic_write_json
from sefe_fast.run_layout import progress_paths, run_state_path


def config_fingerprint(config: dict[str, Any]) -> str:
    """A short hash of the settings that change results (JSON-sorted)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class RunState:
    """Progress of a run: stages (1-based) trained and completed, the matrix, the method state."""

    fingerprint: str
    tasks: list[str]
    trained: list[int] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)
    accuracy: list[list[float | None]] = field(default_factory=list)
    scores: list[list[dict | None]] = field(default_factory=list)
    method_state: dict[str, Any] = field(default_factory=dict)
    # The fingerprinted settings themselves, so a rerun with others can name what differs.
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fresh(cls, fingerprint: str, tasks: list[str], config: dict[str, Any]) -> RunState:
        """A run that has done nothing yet."""
        n = len(tasks)
        return cls(
            fingerprint=fingerprint,
            config=dict(config),
            tasks=list(tasks),
            accuracy=[[None] * n for _ in range(n)],
            scores=[[None] * n for _ in range(n)],
        )

    def save(self, run_dir: Path) -> None:
        """Write `run_state.json` atomically."""
        atomic_write_json(run_state_path(run_dir), self.__dict__)

    @classmethod
    def load_or_fresh(
        cls, run_dir: Path, fingerprint: str, tasks: list[str], config: dict[str, Any]
    ) -> RunState:
        """The saved state of this run, or a fresh one; RunMismatchError (naming the settings
        that differ) for a directory holding another run's state or stray progress."""
        path = run_state_path(run_dir)
        if not path.is_file():
            leftovers = [p.name for p in progress_paths(run_dir)]
            if leftovers:
                raise RunMismatchError(
                    f"{run_dir} holds {', '.join(leftovers)} but no {path.name}: files of "
                    f"another or unfinished run. {WAYS_OUT}"
                )
            return cls.fresh(fingerprint, tasks, config)
        saved = read_json_file(path, what="the run's progress")
        nothing_done = [p.name for p in progress_paths(run_dir)] == [path.name]
        if nothing_done:  # stopped before its first step (e.g. by a bad test file)
            return cls.fresh(fingerprint, tasks, config)
        if saved.get("fingerprint") != fingerprint or saved.get("tasks") != list(tasks):
            raise RunMismatchError(
                f"{run_dir} holds a run with other settings: "
                f"{describe_differences(saved.get('config'), config, saved.get('tasks'), tasks)}"
                f". {WAYS_OUT}"
            )
        try:
            return cls(**saved)
        except TypeError as exc:
            raise RunStateError(f"{path}: not a run_state.json of this version ({exc})") from exc


# How to get out of a run-directory mismatch (said by every such error).
WAYS_OUT = (
    "Rerun with the same settings to resume it, give another --output-dir, or add "
    "--restart to delete its progress and start over"
)


class RunMismatchError(ValueError):
    """The run directory holds progress made with other settings."""


class RunStateError(ValueError):
    """A file the run resumes from cannot be read."""


def describe_differences(
    saved: dict[str, Any] | None, current: dict[str, Any], saved_tasks: Any, tasks: list[str]
) -> str:
    """'--lr 0.002 → 0.001, ...': the fingerprinted settings that differ (flag spelling)."""
    if not saved:
        return f"tasks {saved_tasks} → {tasks} (its run_state.json does not list its settings)"
    names = sorted(set(saved) | set(current))
    diffs = [
        f"--{name.replace('_', '-')} {saved.get(name)!r} → {current.get(name)!r}"
        for name in names
        if saved.get(name) != current.get(name)
    ]
    return ", ".join(diffs) or "the same flags, another fingerprint (another sefe_fast version?)"


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; RunStateError naming the file if it is truncated or not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunStateError(
            f"{path}: {what} is damaged ({exc}); restore it from a copy, or start over with "
            "--restart (or another --output-dir)"
        ) from exc
    if not isinstance(data, dict):
        raise RunStateError(f"{path}: {what} is not a JSON object; start over with --restart")
    return data


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, Python, NumPy)."""
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore RNG states captured by `capture_rng`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch, Python and NumPy with one integer."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def save_train_state(path: Path, state: dict[str, Any], fingerprint: str | None = None) -> None:
    """torch.save `state` atomically, tagged with the run's config `fingerprint` if given."""
    tagged = state if fingerprint is None else {**state, "fingerprint": fingerprint}
    with atomic_path(path) as tmp:
        torch.save(tagged, tmp)


def load_train_state(path: Path, fingerprint: str | None = None) -> dict[str, Any] | None:
    """The in-task checkpoint at `path`, or None if there is none; RunMismatchError if it
    was written with settings other than `fingerprint`'s (when given), RunStateError if it
    cannot be read."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for a damaged file
        raise RunStateError(
            f"{path}: the in-task checkpoint cannot be read ({type(exc).__name__}: {exc}); "
            "delete it to restart this task from its first step"
        ) from exc
    if fingerprint is None:
        return state
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise RunMismatchError(
            f"{path}: this in-task checkpoint was written with other settings (fingerprint "
            f"{state.get('fingerprint') if isinstance(state, dict) else None} vs {fingerprint}). "
            f"{WAYS_OUT}"
        )
    return state
