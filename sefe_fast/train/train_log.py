"""The JSONL training log (`run_dir/train_log.jsonl`): one row per logged step.

Rows are kept in memory and the whole file is rewritten atomically at each flush, so a
killed run leaves a complete file; a resumed run drops the rows the killed run wrote
after its last checkpoint, so the log reads as one run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sefe_fast.io_utils import atomic_write_jsonl


class TrainLog:
    """Append-and-flush JSONL log; `enabled=False` (non-zero ranks) makes every call a no-op."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        if enabled and self.path.is_file():
            text = self.path.read_text(encoding="utf-8")
            self.rows = [json.loads(line) for line in text.splitlines() if line.strip()]

    def truncate_after(self, phase: str, step: int) -> None:
        """Drop rows of `phase` logged after optimizer step `step` (resume from a checkpoint)."""
        if self.enabled:
            self.rows = [r for r in self.rows if not (r.get("phase") == phase and r["step"] > step)]

    def append(self, row: dict[str, Any], flush: bool = True) -> None:
        """Add one row (and rewrite the file unless `flush=False`)."""
        if not self.enabled:
            return
        self.rows.append(row)
        if flush:
            self.flush()

    def flush(self) -> None:
        """Rewrite the file atomically with every row so far."""
        if self.enabled:
            atomic_write_jsonl(self.path, self.rows)
