"""`asd`: Answer Style Diversification — train each task on its ASD-converted data.

X % of each task's samples are rewritten into the four other answer styles (docs/reference.md
§2, `sefe_fast.asd`). A CoIN-ASD file shipped beside the original (`train_x20.json` for
X = 20) is used as is — the official CoIN-ASD files, written by an MLLM, are preferred over
the rule-based converter; otherwise the file is converted once into the run directory
(`work_dir/asd/<task>/train_x20.json`, reused on a rerun).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sefe_fast.asd import convert_file
from sefe_fast.methods.base import ContinualMethod
from sefe_fast.run_layout import asd_path

log = logging.getLogger(__name__)


def asd_file_name(ratio: float) -> str:
    """CoIN-ASD's file name for ratio X: `train_x{round(100·X)}.json`."""
    return f"train_x{round(100 * ratio)}.json"


class AsdMixin(ContinualMethod):
    """Swaps each task's training file for its ASD version."""

    def prepare_train_file(self, task: str, train_json: Path, work_dir: Path) -> Path:
        """`train_x20.json` beside `train_json` if present, else converted into the run dir's
        `asd/` folder (`work_dir`: the run directory)."""
        name = asd_file_name(self.config.asd_ratio)
        shipped = train_json.parent / name
        if shipped.is_file():
            return shipped
        out = asd_path(work_dir, task, name)
        if not out.is_file():
            stats = convert_file(
                train_json, out, ratio=self.config.asd_ratio, seed=self.config.seed, task=task
            )
            log.info("ASD %s: %s", task, stats.summary())
        return out

    def describe(self) -> dict[str, Any]:
        """Name and ASD ratio."""
        return {**super().describe(), "asd_ratio": self.config.asd_ratio}


class AsdMethod(AsdMixin):
    """ASD data, no regularisation."""

    name = "asd"
    summary = "LoRA on ASD data: X% of each task rewritten into the other answer styles"
