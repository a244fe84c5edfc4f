"""CoIN test files: `TestRecord` and `load_test_records`.

A task's `test.json` is a list of `{"question_id", "image", "text", "answer"}` records
(Grounding adds `answer_bbox` and `size`; docs/reference.md §4). `answer` is a string or a
non-empty list of strings (TextVQA's human answers); an absent or null `image` is a
text-only question. A bad record raises `CoinDataError` naming the file, the record and the
problem, or with `skip_bad=True` is skipped and counted in `LoadStats`, exactly as the
train loader in `sefe_fast.data.coin` does (the two share its record checks).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sefe_fast.data.coin import (
    LoadStats,
    fail_or_skip,
    read_json_records,
    record_image_path,
    record_label,
)

logger = logging.getLogger(__name__)


@dataclass
class TestRecord:
    """One CoIN test question. `image` is the resolved path (None for a text-only question);
    `extra` holds the other fields."""

    question_id: str
    image: Path | None
    text: str
    answer: str | list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gold(self) -> str | list[str]:
        """What the scorer compares with: `answer_bbox` when present (Grounding), else `answer`."""
        bbox = self.extra.get("answer_bbox")
        return bbox if bbox is not None else self.answer


def _check_test_record(record: Any, image_root: Path, verify_images: bool) -> TestRecord:
    """Validate one test record and build its TestRecord, or raise ValueError with the problem."""
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object ({type(record).__name__})")
    for key in ("question_id", "text", "answer"):
        if key not in record:
            raise ValueError(f"missing key {key!r}")
    if not isinstance(record["question_id"], str | int):
        raise ValueError("'question_id' must be a string or an integer")
    if not isinstance(record["text"], str) or not record["text"].strip():
        raise ValueError("'text' must be a non-empty string")
    answer = record["answer"]
    if isinstance(answer, list):
        if not answer or not all(isinstance(a, str) for a in answer):
            raise ValueError("'answer' must be a string or a non-empty list of strings")
    elif not isinstance(answer, str):
        raise ValueError(f"'answer' must be a string, got {type(answer).__name__}")
    if "answer_bbox" in record and not isinstance(record["answer_bbox"], str | list):
        raise ValueError("'answer_bbox' must be a string '[x1, y1, x2, y2]' or a list")
    image_path = record_image_path(record, image_root, verify_images)
    extra = {k: v for k, v in record.items() if k not in ("question_id", "image", "text", "answer")}
    return TestRecord(str(record["question_id"]), image_path, record["text"], answer, extra)


def load_test_records(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    skip_bad: bool = False,
    verify_images: bool = True,
    stats: LoadStats | None = None,
) -> list[TestRecord]:
    """Read a CoIN test file into TestRecords (images resolved against `image_root`).

    A bad record raises CoinDataError naming file, record and problem, or with `skip_bad`
    is skipped, counted in `stats` (if given) and logged as a warning.
    """
    source = Path(json_path)
    root = Path(image_root)
    stats = stats if stats is not None else LoadStats()
    stats.source = str(source)
    records = read_json_records(source)
    stats.n_records = len(records)
    out: list[TestRecord] = []
    for index, record in enumerate(records):
        try:
            out.append(_check_test_record(record, root, verify_images))
        except (ValueError, OSError) as problem:
            label = record_label(record, index, "question_id")
            fail_or_skip(stats, skip_bad, source, label, problem)
    stats.n_kept = len(out)
    if stats.n_bad_skipped:
        logger.warning(stats.summary())
    return out
