"""Answer Style Diversification: rewrite a share of a task's records into the other formats.

`convert_records` picks `round(ratio × n)` single-question records at random and rewrites
them, in equal shares (within one), into the four formats among `short`, `yes_no`, `mcq`,
`brief`, `detailed` other than the record's own; all other records are copied unchanged.
A converted record keeps its other fields, gets new `conversations` and gains
`asd_format` (and, for explanations, `asd_explanation_source`).

Rules (docs/reference.md §2):
- yes/no: "Is the answer X?" with X the true answer or a distractor, exactly balanced
  (half "No" within one) inside each group;
- MCQ: the true answer among up to 3 distractors from the task's own answer pool, at a
  random letter, with CoIN's MCQ instruction; MCQ → short: the option text;
- grounding (box answers): a box MCQ with distractor boxes, a box yes/no;
- explanations: mini-CoIN records carry exact scene facts in their "asd" field (source
  "scene"); otherwise a local rewriter model (source "rewriter", falling back to the
  template on a bad reply, counted) or a template that states the answer in a full
  sentence (source "template").
The own format comes from the instruction suffix (`sefe_fast.tasks`), else from a box
answer, else from `task`. Every converted answer is checked with the format checkers; a
record whose answer cannot take its assigned format (e.g. an option text too long for a
short answer) is left unchanged, counted, and the format passes to the next record.
"""

from __future__ import annotations

import copy
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sefe_fast.asd.formats import has_format, is_box, option_letter
from sefe_fast.asd.rewriter import Rewriter
from sefe_fast.data.coin import read_json_records
from sefe_fast.io_utils import atomic_write_json
from sefe_fast.tasks import (
    ANSWER_FORMATS,
    FORMAT_SUFFIX,
    GROUNDING_SUFFIX,
    MCQ_SUFFIX,
    task_spec,
)

IMAGE_PREFIX = "<image>\n"
MCQ_LETTERS = "ABCDEFGHIJ"
N_MCQ_DISTRACTORS = 3
BOX_MCQ_QUESTION = "Which bounding box is the region this sentence describes?"
BOX_EXPLAIN_QUESTION = "Where is the region this sentence describes, as a bounding box?"
_OPTION_LINE = re.compile(r"^\(?([A-J])[.)]\s+(.+?)\s*$")
# Own format detected from the instruction's last line (longest suffixes first).
_SUFFIX_FORMATS: tuple[tuple[str, str], ...] = (
    (GROUNDING_SUFFIX, "box"),
    *((suffix, fmt) for fmt, suffix in FORMAT_SUFFIX.items()),
)


class AsdError(ValueError):
    """A record ASD cannot use; the message names the record and the problem."""


@dataclass
class AsdStats:
    """What a conversion did (counts of records)."""

    n_records: int = 0
    n_eligible: int = 0
    n_requested: int = 0
    n_converted: int = 0
    per_format: dict[str, int] = field(default_factory=dict)
    n_yes: int = 0
    n_no: int = 0
    explanation_sources: dict[str, int] = field(default_factory=dict)
    n_rewriter_fallbacks: int = 0
    n_unconvertible: int = 0
    unconvertible_reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line with the counts."""
        formats = ", ".join(f"{k}: {v}" for k, v in sorted(self.per_format.items()))
        sources = ", ".join(f"{k}: {v}" for k, v in sorted(self.explanation_sources.items()))
        return (
            f"ASD: {self.n_converted}/{self.n_requested} requested records converted out of "
            f"{self.n_records} ({self.n_eligible} single-question) [{formats}]; yes/no "
            f"{self.n_yes} yes, {self.n_no} no; explanations [{sources}], "
            f"{self.n_rewriter_fallbacks} rewriter fallbacks; {self.n_unconvertible} left "
            "unchanged (answer did not fit the assigned format)"
        )


@dataclass
class _Item:
    """A record's question and answer split into the parts a conversion needs."""

    index: int
    label: str
    own: str  # own format, or "box" for grounding
    question: str  # bare question: no <image>, no options, no instruction suffix
    answer: str  # short phrase (the option text for MCQ, the box for grounding)
    options: list[str] = field(default_factory=list)  # other option texts of an MCQ record
    facts: dict[str, Any] | None = None  # mini-CoIN scene facts ("asd" field)


def _label(record: Any, index: int) -> str:
    ident = record.get("id") if isinstance(record, dict) else None
    return f"record {ident!r} (index {index})" if ident is not None else f"record at index {index}"


def _split_instruction(text: str) -> tuple[str, str | None]:
    """(text without its instruction suffix, detected own format or None)."""
    body = text.strip()
    for suffix, fmt in _SUFFIX_FORMATS:
        if body.endswith(suffix):
            return body[: -len(suffix)].rstrip(), fmt
    return body, None


def _parse_item(record: Any, index: int, task: str | None) -> _Item | None:
    """Split a record; None for a multi-turn record (not converted); AsdError if unusable."""
    label = _label(record, index)
    if not isinstance(record, dict):
        raise AsdError(f"{label}: not a JSON object")
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise AsdError(f"{label}: 'conversations' must be a list of at least two turns")
    if len(turns) != 2:
        return None
    human, gpt = turns
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        raise AsdError(f"{label}: each turn needs a string 'value'")
    if human.get("from") != "human" or gpt.get("from") != "gpt":
        raise AsdError(f"{label}: expected a human turn then a gpt turn")
    text = human["value"].replace(IMAGE_PREFIX, "", 1).replace("<image>", "").strip()
    body, own = _split_instruction(text)
    answer = gpt["value"].strip()
    if own is None and is_box(answer):
        own = "box"
    if own is None and task is not None:
        spec = task_spec(task)
        own = "box" if spec.response_kind == "box" else spec.answer_format
    if own is None:
        raise AsdError(
            f"{label}: cannot tell the record's own answer format from its instruction "
            f"{text[-60:]!r}; pass the task name"
        )
    facts = record.get("asd") if isinstance(record.get("asd"), dict) else None
    item = _Item(index, label, own, body, answer, facts=facts)
    if own == "mcq":
        _parse_options(item, answer)
    if facts is not None:
        item.question = str(facts.get("question", item.question))
        item.answer = str(facts.get("answer", item.answer))
    return item


def _parse_options(item: _Item, letter_answer: str) -> None:
    """Split an MCQ body into the bare question and options; set the answer to its text."""
    question_lines, options = [], {}
    for line in item.question.splitlines():
        match = _OPTION_LINE.match(line.strip())
        if match and (match.group(1) in options or len(options) == ord(match.group(1)) - 65):
            options[match.group(1)] = match.group(2)
        elif line.strip() not in ("Options:", "Choices:"):
            question_lines.append(line)
    letter = option_letter(letter_answer)
    if len(options) < 2:
        raise AsdError(f"{item.label}: no 'A. ...' option lines found in the MCQ question")
    if letter not in options:
        raise AsdError(f"{item.label}: answer {letter_answer!r} is not one of the options")
    item.question = "\n".join(question_lines).strip()
    item.answer = options[letter]
    item.options = [text for key, text in options.items() if key != letter]


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _box_values(box: str) -> tuple[float, ...]:
    return tuple(float(v) for v in box.strip().strip("[]").split(","))


def _format_box(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def _shifted_boxes(box: str) -> list[str]:
    """Boxes of the same size moved by one box width/height (clipped to the image), IoU ≤ 0.3."""
    x1, y1, x2, y2 = _box_values(box)
    w, h = x2 - x1, y2 - y1
    out = []
    for dx, dy in ((w, 0), (-w, 0), (0, h), (0, -h), (w, h), (-w, -h), (w, -h), (-w, h)):
        nx1 = min(max(x1 + dx, 0.0), 1.0 - w)
        ny1 = min(max(y1 + dy, 0.0), 1.0 - h)
        moved = (nx1, ny1, nx1 + w, ny1 + h)
        if _iou(moved, (x1, y1, x2, y2)) <= 0.3:
            out.append(_format_box(moved))
    return out


class Converter:
    """Builds converted records; holds the rng, the file-level answer pools and the stats."""

    def __init__(
        self, items: list[_Item], rng: random.Random, rewriter: Rewriter | None, stats: AsdStats
    ) -> None:
        self.rng = rng
        self.rewriter = rewriter
        self.stats = stats
        pools: dict[str, set[str]] = {}
        for item in items:
            pools.setdefault(item.own, set()).update([item.answer, *item.options])
        self.pools = {own: sorted(values) for own, values in pools.items()}

    def distractors(self, item: _Item, k: int) -> list[str]:
        """Up to `k` wrong answers of the same kind: scene pool, own options, file pool."""
        seen = {item.answer.lower()}
        out: list[str] = []
        sources: list[list[str]] = []
        if item.facts and item.facts.get("answer_pool"):
            sources.append([str(v) for v in item.facts["answer_pool"]])
        sources.append(list(item.options))
        if item.own == "box":
            sources.append(_shifted_boxes(item.answer))
        sources.append(self.pools.get(item.own, []))
        for source in sources:
            candidates = [v for v in source if v.lower() not in seen]
            self.rng.shuffle(candidates)
            for value in candidates[: k - len(out)]:
                seen.add(value.lower())
                out.append(value)
            if len(out) == k:
                break
        if item.own == "box":
            out = [
                v
                for v in out
                if is_box(v) and _iou(_box_values(v), _box_values(item.answer)) <= 0.5
            ]
        return out

    def explanation(self, item: _Item, length: str) -> tuple[str, str]:
        """(explanation, source) of `length` "brief" or "detailed"."""
        if item.facts and isinstance(item.facts.get(length), str):
            return item.facts[length], "scene"
        if self.rewriter is not None:
            text = self.rewriter.explain(item.question, item.answer, length)
            if text and has_format(length, text) and item.answer.lower() in text.lower():
                return text, "rewriter"
            self.stats.n_rewriter_fallbacks += 1
        return _template_explanation(item, length, self.rng), "template"

    def convert(self, item: _Item, fmt: str, yes: bool) -> tuple[list[dict[str, str]], str | None]:
        """New conversations for `item` in format `fmt` (and the explanation source)."""
        question, answer, source = item.question, item.answer, None
        if fmt == "short":
            prompt = f"{question}\n{FORMAT_SUFFIX['short']}"
        elif fmt == "yes_no":
            candidate = answer
            if not yes:
                wrong = self.distractors(item, 1)
                if not wrong:
                    raise AsdError(f"{item.label}: no distractor answer available for yes/no")
                candidate = wrong[0]
            if item.own == "box":
                ask = f"Is {candidate} the bounding box of the region this sentence describes?"
            else:
                ask = f'Is the answer "{candidate}"?'
            prompt = f"{question}\n{ask}\n{FORMAT_SUFFIX['yes_no']}"
            answer = "Yes" if yes else "No"
        elif fmt == "mcq":
            options = [answer, *self.distractors(item, N_MCQ_DISTRACTORS)]
            if len(options) < 2:
                raise AsdError(f"{item.label}: no distractor answers available for an MCQ")
            self.rng.shuffle(options)
            letter = MCQ_LETTERS[options.index(answer)]
            listed = "\n".join(f"{MCQ_LETTERS[i]}. {text}" for i, text in enumerate(options))
            ask = f"\n{BOX_MCQ_QUESTION}" if item.own == "box" else ""
            prompt = f"{question}{ask}\n{listed}\n{MCQ_SUFFIX}"
            answer = letter
        else:
            ask = f"\n{BOX_EXPLAIN_QUESTION}" if item.own == "box" else ""
            prompt = f"{question}{ask}\n{FORMAT_SUFFIX[fmt]}"
            answer, source = self.explanation(item, fmt)
        conversations = [
            {"from": "human", "value": f"{IMAGE_PREFIX}{prompt}"},
            {"from": "gpt", "value": answer},
        ]
        return conversations, source


_BRIEF_TEMPLATES = (
    "Looking at the image, the answer to this question is {answer}, as the picture shows.",
    "Based on what is visible in the image, the correct answer here is {answer}.",
)
_DETAILED_TEMPLATES = (
    "To answer the question, I look carefully at the relevant part of the image and compare "
    "what it shows with the possible answers. What I see there matches {answer} better than "
    "any other possibility, and nothing else in the picture contradicts it. Therefore the "
    "answer to the question is {answer}.",
    "The question asks about a specific detail of the image. After examining the picture "
    "closely, the visible evidence points clearly to {answer}; the other plausible answers do "
    "not fit what is shown. So, taking everything in the image into account, the answer is "
    "{answer}.",
)


def _template_explanation(item: _Item, length: str, rng: random.Random) -> str:
    """A generic explanation stating the answer (~12 words brief, ~45 words detailed)."""
    answer = item.answer if item.own != "box" else f"the region at {item.answer}"
    templates = _BRIEF_TEMPLATES if length == "brief" else _DETAILED_TEMPLATES
    return rng.choice(templates).format(answer=answer)


def convert_records(
    records: list[dict[str, Any]],
    *,
    ratio: float,
    seed: int,
    task: str | None = None,
    rewriter: Rewriter | None = None,
) -> tuple[list[dict[str, Any]], AsdStats]:
    """Convert `ratio` of `records` into the other answer formats (see the module docstring).

    `ratio` in [0, 1]; `seed` makes the choice of records, formats, distractors and letters
    deterministic; `task` (a CoIN task name) supplies the own format when the instruction
    does not show it; `rewriter` writes explanations for records without scene facts.
    Returns the new list (same order, unconverted records unchanged) and the stats.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if task is not None:
        task_spec(task)  # unknown task → ValueError
    stats = AsdStats(n_records=len(records))
    parsed = [_parse_item(record, index, task) for index, record in enumerate(records)]
    items = [item for item in parsed if item is not None]
    stats.n_eligible = len(items)
    stats.n_requested = min(round(ratio * len(records)), len(items))
    rng = random.Random(f"asd/{seed}")
    converter = Converter(items, rng, rewriter, stats)
    order = list(items)
    rng.shuffle(order)

    # Per own format: cycle through the four other formats from a random start, and
    # alternate yes/no answers from a random start, so shares are equal within one.
    cycles: dict[str, tuple[list[str], list[int]]] = {}
    yes_next: dict[str, bool] = {}
    output = list(records)
    for item in order:
        if stats.n_converted == stats.n_requested:
            break
        if item.own not in cycles:
            own = "short" if item.own == "box" else item.own
            targets = [fmt for fmt in ANSWER_FORMATS if fmt != own]
            rng.shuffle(targets)
            cycles[item.own] = (targets, [0])
            yes_next[item.own] = rng.random() < 0.5
        targets, position = cycles[item.own]
        fmt = targets[position[0] % len(targets)]
        yes = yes_next[item.own]
        conversations, source = converter.convert(item, fmt, yes)
        answer = conversations[1]["value"]
        if not has_format(fmt, answer):
            stats.n_unconvertible += 1
            stats.unconvertible_reasons.append(
                f"{item.label}: answer {answer[:60]!r} does not have the {fmt} format"
            )
            continue
        position[0] += 1
        if fmt == "yes_no":
            yes_next[item.own] = not yes
            stats.n_yes += yes
            stats.n_no += not yes
        record = copy.deepcopy(records[item.index])
        record["conversations"] = conversations
        record["asd_format"] = fmt
        if source is not None:
            record["asd_explanation_source"] = source
            stats.explanation_sources[source] = stats.explanation_sources.get(source, 0) + 1
        output[item.index] = record
        stats.n_converted += 1
        stats.per_format[fmt] = stats.per_format.get(fmt, 0) + 1
    return output, stats


def convert_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    ratio: float,
    seed: int,
    task: str | None = None,
    rewriter_path: str | os.PathLike | None = None,
) -> AsdStats:
    """Read a LLaVA-format train file, convert it with `convert_records`, write it atomically."""
    source = Path(input_path)
    records = read_json_records(source)
    rewriter = Rewriter(rewriter_path) if rewriter_path is not None else None
    try:
        converted, stats = convert_records(
            records, ratio=ratio, seed=seed, task=task, rewriter=rewriter
        )
    except AsdError as error:
        raise AsdError(f"{source}: {error}") from error
    atomic_write_json(output_path, converted, indent=1)
    return stats


def format_counts(records: list[dict[str, Any]]) -> Counter:
    """How many records carry each `asd_format` (unconverted records are not counted)."""
    return Counter(r["asd_format"] for r in records if isinstance(r, dict) and "asd_format" in r)
