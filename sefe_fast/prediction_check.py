"""A run's prediction files against the test records they answer: nothing missing, nothing extra.

Rescoring a prediction file that lost rows (a file cut to 3 of 16 rows scores those 3) or
gained invented ones gives a number that looks fine and is not the run's. Each file must
hold exactly one row per test record the run evaluated: the records of
`<data>/<task>/test.json` in file order, the first `max_test_per_task` of them, records
with unreadable images dropped when the run had `skip_bad`. Where the data is comes from
`results.json`'s config (`data`; a run without --data used its own `minicoin/`), or is
given (`--data` of `python -m sefe_fast.evaluation`, for a run whose data has moved).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sefe_fast.data.coin_test_records import load_test_records
from sefe_fast.run_layout import minicoin_dir, results_path

# How many missing or extra question ids an error lists.
SHOWN_IDS = 5


class PredictionsMismatchError(ValueError):
    """A prediction file does not answer exactly the run's test records."""


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = results_path(run_dir)
    if not path.is_file():
        return {}
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None
    config = results.get("config") if isinstance(results, dict) else None
    return config if isinstance(config, dict) else {}


def locate_test_data(run_dir: str | Path, data_dir: str | Path | None = None) -> Path | None:
    """The folder holding `<task>/test.json` for this run (None: cannot be told)."""
    run_dir = Path(run_dir)
    if data_dir is not None:
        return Path(data_dir)
    config = _run_config(run_dir)
    if config.get("data"):
        return Path(config["data"])
    generated = minicoin_dir(run_dir)
    return generated if generated.is_dir() else None


def expected_question_ids(run_dir: str | Path, task: str, data_dir: str | Path) -> list[str]:
    """Question ids of the test records the run evaluated on `task` (module docstring)."""
    config = _run_config(Path(run_dir))
    test_file = Path(data_dir) / task / "test.json"
    if not test_file.is_file():
        raise FileNotFoundError(
            f"{test_file}: the test file the predictions answer is missing (give the data "
            "folder with --data)"
        )
    skip_bad = bool(config.get("skip_bad", False))
    records = load_test_records(
        test_file,
        config.get("image_root") or data_dir,
        skip_bad=skip_bad,
        verify_images=skip_bad,  # only then does an image decide whether a record counts
    )
    limit = config.get("max_test_per_task")
    return [r.question_id for r in (records[:limit] if limit else records)]


def check_rows_answer_test(
    path: str | Path, rows: Sequence[Mapping[str, Any]], expected_ids: Sequence[str]
) -> None:
    """PredictionsMismatchError naming the test records without a row and the rows without
    a test record (their question ids, the first few)."""
    got = [str(row["question_id"]) for row in rows]
    missing = [qid for qid in expected_ids if qid not in set(got)]
    extra = [qid for qid in got if qid not in set(expected_ids)]
    if not missing and not extra:
        return
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} of the {len(expected_ids)} test records have no prediction "
            f"(question_id {missing[:SHOWN_IDS]}{' ...' if len(missing) > SHOWN_IDS else ''})"
        )
    if extra:
        problems.append(
            f"{len(extra)} rows answer no test record of the run "
            f"(question_id {extra[:SHOWN_IDS]}{' ...' if len(extra) > SHOWN_IDS else ''})"
        )
    raise PredictionsMismatchError(
        f"{path}: {'; '.join(problems)}; rescoring it would not give the run's accuracy"
    )
