"""TextVQA's human answers: the annotation file real CoIN is scored against.

CoIN's TextVQA `test.json` carries one answer string per question, but the official
evaluation (SEFE's and CoIN's `eval_textvqa.py`) scores each prediction against the ten
human answers of TextVQA's own annotation file, `TextVQA_0.5.1_val.json`
(`{"data": [{"question_id", "answers": [ten strings], ...}, ...]}`), joined on
`question_id` (compared as strings), with VQA soft accuracy (docs/reference.md §4). CoIN's
layout keeps that file in the TextVQA image folder (`<image root>/TextVQA/`).

How the two data sources coexist:

- real CoIN (`--data` given): the file is required. It is looked for at
  `--textvqa-annotations` if given, else `<data>/TextVQA/TextVQA_0.5.1_val.json`, else
  `<image root>/TextVQA/TextVQA_0.5.1_val.json`; if none exists the run stops before
  training with an error naming the paths tried and the flag. Each test record's `answer`
  becomes its list of ten answers (the test file's own string is kept in
  `extra["coin_answer"]`), so the predictions file stores the list it was scored against.
- mini-CoIN (no `--data`): the generator writes one correct reading per question and no
  annotation file; the record keeps that single answer, scored by normalised exact match,
  which is what VQA soft accuracy gives with a single human answer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TEXTVQA_ANNOTATION_FILE = "TextVQA_0.5.1_val.json"
# The official scorer asserts exactly ten human answers per question.
N_HUMAN_ANSWERS = 10


def annotation_candidates(data_dir: str | os.PathLike, image_root: str | os.PathLike) -> list[Path]:
    """Where the annotation file is looked for when no path is given, in order."""
    candidates = [Path(data_dir) / "TextVQA" / TEXTVQA_ANNOTATION_FILE]
    in_images = Path(image_root) / "TextVQA" / TEXTVQA_ANNOTATION_FILE
    if in_images not in candidates:
        candidates.append(in_images)
    return candidates


def find_textvqa_annotations(
    data_dir: str | os.PathLike,
    image_root: str | os.PathLike,
    given: str | os.PathLike | None = None,
) -> Path:
    """The annotation file to use: `given` if set (it must exist), else the first candidate
    that exists. FileNotFoundError names every path tried and the flag that sets one."""
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"--textvqa-annotations {path}: file not found")
        return path
    candidates = annotation_candidates(data_dir, image_root)
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"TextVQA is scored against the ten human answers of {TEXTVQA_ANNOTATION_FILE} "
        f"(TextVQA's val annotations), not found at {tried}; put it there (CoIN's layout keeps "
        "it in the TextVQA image folder) or give its path with --textvqa-annotations"
    )


def load_textvqa_answers(path: str | os.PathLike) -> dict[str, list[str]]:
    """question_id (as a string) → its ten human answers; errors name the file and entry."""
    path = Path(path)
    try:
        content: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"TextVQA annotation file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON: {error}") from None
    data = content.get("data") if isinstance(content, dict) else None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected an object with a 'data' list (TextVQA's layout)")
    answers: dict[str, list[str]] = {}
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or "question_id" not in entry or "answers" not in entry:
            raise ValueError(f"{path}: data[{index}] lacks 'question_id' or 'answers'")
        human = entry["answers"]
        if (
            not isinstance(human, list)
            or len(human) != N_HUMAN_ANSWERS
            or not all(isinstance(a, str) for a in human)
        ):
            raise ValueError(
                f"{path}: data[{index}] (question_id {entry['question_id']!r}): 'answers' must "
                f"be a list of {N_HUMAN_ANSWERS} strings, got {human!r}"
            )
        answers[str(entry["question_id"])] = list(human)
    return answers


def attach_human_answers(
    records: Sequence[Any], answers: dict[str, list[str]], source: Path
) -> None:
    """Give every TextVQA test record (a `TestRecord`) its human answers, in place.

    `record.answer` becomes the list; the test file's own string moves to
    `record.extra["coin_answer"]`. A question_id absent from the annotations is a
    ValueError naming it and `source`.
    """
    missing = [r.question_id for r in records if str(r.question_id) not in answers]
    if missing:
        raise ValueError(
            f"{source}: no human answers for {len(missing)} TextVQA test question(s), "
            f"e.g. question_id {missing[:5]}"
        )
    for record in records:
        record.extra.setdefault("coin_answer", record.answer)
        record.answer = answers[str(record.question_id)]
