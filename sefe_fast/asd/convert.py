"""Answer Style Diversification: rewrite a share of a task's records into the other formats.

`convert_records` picks `round(ratio × n)` single-question records at random and rewrites
them, in equal shares (within one), into the four formats among `short`, `yes_no`, `mcq`,
`brief`, `detailed` other than the record's own; all other records are copied unchanged.
A converted record keeps its other fields (text-only records stay text-only), gets new
`conversations` and gains `asd_format` (and, for explanations, `asd_explanation_source`).

Rules (`docs/reference.md §2`; records read by `sefe_fast.asd.records`, answer kinds in
`sefe_fast.asd.kinds`, wording in `sefe_fast.asd.phrasing`):
- MCQ: the true answer among up to 3 wrong answers of the same kind (yes/no with yes/no,
  numbers with numbers, colours, class names, genres, titles, authors, phrases answering
  the same type of question, an MCQ record's own options), at a random letter, with
  CoIN's MCQ instruction; MCQ → short: the option text;
- yes/no: a two-way choice between the true answer and one same-kind wrong answer, asked
  about one of them, the questions answered "no" exactly half (within one) of each own
  format's constructed ones; a question already answered yes/no is asked as is;
- grounding (box answers): boxes overlapping the true one little as wrong options; brief
  and detailed answers describe the boxed object from its referring expression;
- explanations: mini-CoIN records carry exact scene facts in their "asd" field (source
  "scene"); otherwise a local rewriter model (source "rewriter", falling back to the
  rules on a bad reply, counted) or the rules (source "template").
Every converted answer is checked with the format checkers. A record that cannot take its
assigned format (no same-kind wrong answer, an option text too long for a short answer)
is left unchanged, counted, and the format passes to the next record. A record the
converter cannot read at all is kept unchanged and counted with its reason: no record
aborts the file and none is dropped.
"""

from __future__ import annotations

import copy
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sefe_fast.asd.formats import has_format
from sefe_fast.asd.kinds import AnswerPools, answer_kind
from sefe_fast.asd.phrasing import (
    explanation_question,
    mcq_question,
    template_explanation,
    yes_no_question,
)
from sefe_fast.asd.records import IMAGE_TOKEN, AsdItem, RecordProblem, parse_record
from sefe_fast.asd.rewriter import Rewriter
from sefe_fast.data.coin import read_json_records
from sefe_fast.io_utils import atomic_write_json
from sefe_fast.tasks import ANSWER_FORMATS, FORMAT_SUFFIX, MCQ_SUFFIX, task_spec

MCQ_LETTERS = "ABCDEFGHIJ"
N_MCQ_DISTRACTORS = 3
# Reasons listed in the summary (the count is always complete).
SUMMARY_REASONS = 5


class AsdError(ValueError):
    """ASD cannot run on this input at all (not a record-level problem: those are skips)."""


@dataclass
class AsdStats:
    """What a conversion did (counts of records, and why records were left unchanged)."""

    n_records: int = 0
    n_eligible: int = 0
    n_requested: int = 0
    n_converted: int = 0
    per_format: dict[str, int] = field(default_factory=dict)
    per_kind: dict[str, int] = field(default_factory=dict)
    n_yes: int = 0
    n_no: int = 0
    explanation_sources: dict[str, int] = field(default_factory=dict)
    n_rewriter_fallbacks: int = 0
    n_unreadable: int = 0
    unreadable_reasons: list[str] = field(default_factory=list)
    n_unconvertible: int = 0
    unconvertible_reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line with the counts, then up to SUMMARY_REASONS reasons of each skip kind."""
        formats = ", ".join(f"{k}: {v}" for k, v in sorted(self.per_format.items()))
        sources = ", ".join(f"{k}: {v}" for k, v in sorted(self.explanation_sources.items()))
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.per_kind.items()))
        lines = [
            f"ASD: {self.n_converted}/{self.n_requested} requested records converted out of "
            f"{self.n_records} ({self.n_eligible} single-question) [{formats}]; answer kinds "
            f"[{kinds}]; yes/no "
            f"{self.n_yes} yes, {self.n_no} no; explanations [{sources}], "
            f"{self.n_rewriter_fallbacks} rewriter fallbacks; {self.n_unreadable} records "
            f"ASD could not read and {self.n_unconvertible} that did not fit their assigned "
            "format, all kept unchanged"
        ]
        for title, reasons in (
            ("could not read", self.unreadable_reasons),
            ("did not fit", self.unconvertible_reasons),
        ):
            for reason in reasons[:SUMMARY_REASONS]:
                lines.append(f"  {title}: {reason}")
            if len(reasons) > SUMMARY_REASONS:
                lines.append(f"  ... and {len(reasons) - SUMMARY_REASONS} more")
        return "\n".join(lines)


class _Unfit(Exception):
    """The item cannot take the assigned format (the message says why)."""


class Converter:
    """Builds converted records; holds the rng, the file's answer pools and the stats."""

    def __init__(
        self, items: list[AsdItem], rng: random.Random, rewriter: Rewriter | None, stats: AsdStats
    ) -> None:
        self.rng = rng
        self.rewriter = rewriter
        self.stats = stats
        self.pools = AnswerPools(items)

    def explanation(self, item: AsdItem, length: str) -> tuple[str, str]:
        """(explanation, source) of `length` "brief" or "detailed"."""
        if item.facts and isinstance(item.facts.get(length), str):
            return item.facts[length], "scene"
        if self.rewriter is not None:
            # Grounding: the model describes the boxed object, the expression is its answer.
            answer = item.question if item.kind == "box" else item.answer
            text = self.rewriter.explain(explanation_question(item), answer, length)
            if text and has_format(length, text) and answer.lower() in text.lower():
                return text, "rewriter"
            self.stats.n_rewriter_fallbacks += 1
        return template_explanation(item, length, self.rng), "template"

    def yes_no(self, item: AsdItem, yes: bool) -> tuple[str, str]:
        """(prompt, "Yes"/"No"): asks about the true answer when `yes`, else a wrong one."""
        if item.kind == "yes_no":  # the question is a yes/no question already
            return yes_no_question(item, item.answer, self.rng), item.answer.strip().capitalize()
        candidate = item.answer
        if not yes:
            wrong = self.pools.distractors(item, 1, self.rng)
            if not wrong:
                raise _Unfit(f"no wrong answer of kind {item.kind!r} for a yes/no question")
            candidate = wrong[0]
        return yes_no_question(item, candidate, self.rng), "Yes" if yes else "No"

    def convert(
        self, item: AsdItem, fmt: str, yes: bool
    ) -> tuple[list[dict[str, str]], str | None]:
        """New conversations for `item` in format `fmt` (and the explanation source)."""
        source = None
        if fmt == "short":
            prompt, answer = f"{item.body()}\n{FORMAT_SUFFIX['short']}", item.answer
        elif fmt == "yes_no":
            ask, answer = self.yes_no(item, yes)
            prompt = f"{ask}\n{FORMAT_SUFFIX['yes_no']}"
        elif fmt == "mcq":
            options = [item.answer, *self.pools.distractors(item, N_MCQ_DISTRACTORS, self.rng)]
            if len(options) < 2:
                raise _Unfit(f"no wrong answer of kind {item.kind!r} for a multiple choice")
            self.rng.shuffle(options)
            listed = "\n".join(f"{MCQ_LETTERS[i]}. {text}" for i, text in enumerate(options))
            prompt = f"{mcq_question(item)}\n{listed}\n{MCQ_SUFFIX}"
            answer = MCQ_LETTERS[options.index(item.answer)]
        else:
            prompt = f"{explanation_question(item)}\n{FORMAT_SUFFIX[fmt]}"
            answer, source = self.explanation(item, fmt)
        if not has_format(fmt, answer):
            raise _Unfit(f"answer {answer[:60]!r} does not have the {fmt} format")
        human = f"{IMAGE_TOKEN}\n{prompt}" if item.has_image else prompt
        return [{"from": "human", "value": human}, {"from": "gpt", "value": answer}], source


def _parse_all(records: list[Any], task: str | None, stats: AsdStats) -> list[AsdItem]:
    """The records ASD can convert; unreadable ones are counted with their reasons."""
    items = []
    for index, record in enumerate(records):
        try:
            item = parse_record(record, index, task)
        except RecordProblem as problem:
            stats.n_unreadable += 1
            stats.unreadable_reasons.append(str(problem))
            continue
        if item is not None:
            item.kind = answer_kind(item, task)
            items.append(item)
    return items


def convert_records(
    records: list[dict[str, Any]],
    *,
    ratio: float,
    seed: int,
    task: str | None = None,
    rewriter: Rewriter | None = None,
) -> tuple[list[dict[str, Any]], AsdStats]:
    """Convert `ratio` of `records` into the other answer formats (see the module docstring).

    `ratio` in [0, 1]; `seed` makes the choice of records, formats, distractors, wording and
    letters deterministic; `task` (a CoIN task name) supplies the own format when the
    instruction does not show it and sharpens the answer kinds (ImageNet's class names,
    OCR-VQA's genres/titles/authors); `rewriter` writes explanations for records without
    scene facts. Returns the new list (same order and length, unconverted records
    unchanged) and the stats.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if task is not None:
        task_spec(task)  # unknown task → ValueError
    stats = AsdStats(n_records=len(records))
    items = _parse_all(records, task, stats)
    stats.n_eligible = len(items)
    stats.n_requested = min(round(ratio * len(records)), len(items))
    rng = random.Random(f"asd/{seed}")
    converter = Converter(items, rng, rewriter, stats)
    order = list(items)
    rng.shuffle(order)

    # Per own format: cycle through the four other formats from a random start; each yes/no
    # question built from a two-way choice asks about the wrong option when fewer "no" than
    # "yes" answers were written so far (ties drawn at random), so "no" is half within one.
    cycles: dict[str, tuple[list[str], list[int]]] = {}
    answered: dict[str, Counter] = {}
    output = list(records)
    for item in order:
        if stats.n_converted == stats.n_requested:
            break
        if item.own not in cycles:
            own = "short" if item.own == "box" else item.own
            targets = [fmt for fmt in ANSWER_FORMATS if fmt != own]
            rng.shuffle(targets)
            cycles[item.own] = (targets, [0])
            answered[item.own] = Counter()
        targets, position = cycles[item.own]
        fmt = targets[position[0] % len(targets)]
        counts = answered[item.own]
        yes = counts["Yes"] < counts["No"] or (counts["Yes"] == counts["No"] and rng.random() < 0.5)
        try:
            conversations, source = converter.convert(item, fmt, yes)
        except _Unfit as problem:
            stats.n_unconvertible += 1
            stats.unconvertible_reasons.append(f"{item.label} ({fmt}): {problem}")
            continue
        position[0] += 1
        if fmt == "yes_no":
            given = conversations[1]["value"]
            counts[given] += 1
            stats.n_yes += given == "Yes"
            stats.n_no += given == "No"
        record = copy.deepcopy(records[item.index])
        record["conversations"] = conversations
        record["asd_format"] = fmt
        if source is not None:
            record["asd_explanation_source"] = source
            stats.explanation_sources[source] = stats.explanation_sources.get(source, 0) + 1
        output[item.index] = record
        stats.n_converted += 1
        stats.per_format[fmt] = stats.per_format.get(fmt, 0) + 1
        kind = item.kind.split(":")[0]
        stats.per_kind[kind] = stats.per_kind.get(kind, 0) + 1
    return output, stats


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def convert_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    ratio: float,
    seed: int,
    task: str | None = None,
    rewriter_path: str | os.PathLike | None = None,
) -> AsdStats:
    """Read a LLaVA-format train file, convert it with `convert_records`, write it atomically.

    Refuses (AsdError) an output path that is the input file: the original would be lost.
    """
    source, target = Path(input_path), Path(output_path)
    if _same_file(source, target):
        raise AsdError(
            f"--output {target} is the input file: ASD would overwrite the original train "
            "file; write to another path (CoIN-ASD names it train_x20.json)"
        )
    records = read_json_records(source)
    rewriter = Rewriter(rewriter_path) if rewriter_path is not None else None
    converted, stats = convert_records(
        records, ratio=ratio, seed=seed, task=task, rewriter=rewriter
    )
    atomic_write_json(target, converted, indent=1)
    return stats


def format_counts(records: list[dict[str, Any]]) -> Counter:
    """How many records carry each `asd_format` (unconverted records are not counted)."""
    return Counter(r["asd_format"] for r in records if isinstance(r, dict) and "asd_format" in r)
