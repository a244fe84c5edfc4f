"""What a run keeps on disk to resume, and how it is written (atomically, by rank 0).

Where each file lives is `sefe_fast.run_layout`'s business; what they hold:

- `run_state.json` (`RunState`): the config fingerprint, the stages trained and completed,
  the accuracy matrix so far and the method's state after the last completed stage;
- each stage's adapter folder: its LoRA in PEFT format, with the stage's projector in
  `projector.safetensors` beside the adapter files. The base model plus the adapters
  replayed in order (load, merge) rebuilds the model after any stage, bit for bit, without
  storing merged weights;
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
from sefe_fast.run_layout import run_state_path


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

    @classmethod
    def fresh(cls, fingerprint: str, tasks: list[str]) -> RunState:
        """A run that has done nothing yet."""
        n = len(tasks)
        return cls(
            fingerprint=fingerprint,
            tasks=list(tasks),
            accuracy=[[None] * n for _ in range(n)],
            scores=[[None] * n for _ in range(n)],
        )

    def save(self, run_dir: Path) -> None:
        """Write `run_state.json` atomically."""
        atomic_write_json(run_state_path(run_dir), self.__dict__)

    @classmethod
    def load_or_fresh(cls, run_dir: Path, fingerprint: str, tasks: list[str]) -> RunState:
        """The saved state of this run, or a fresh one; a clear error for another run's state."""
        path = run_state_path(run_dir)
        if not path.is_file():
            return cls.fresh(fingerprint, tasks)
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("fingerprint") != fingerprint or saved.get("tasks") != list(tasks):
            raise ValueError(
                f"{path}: this output directory holds a run with other settings "
                f"(fingerprint {saved.get('fingerprint')} vs {fingerprint}, tasks "
                f"{saved.get('tasks')}); use another --output-dir or the same command as before"
            )
        return cls(**saved)


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


def save_train_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save `state` atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_train_state(path: Path) -> dict[str, Any] | None:
    """The in-task checkpoint at `path`, or None if there is none."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
