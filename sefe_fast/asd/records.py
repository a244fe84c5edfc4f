"""Reading one train record for ASD: its own answer format, bare question, answer and options.

The layouts understood are those of CoIN's train files (`docs/reference.md §4`) and of
mini-CoIN:
- the `<image>` placeholder before or after the text, or absent (ScienceQA has text-only
  records, without an `image` key);
- an instruction suffix naming the format (`sefe_fast.tasks`), or none;
- multiple choice with one option per line (`A. text`, `(A) text`) or CoIN's ScienceQA
  converter layout, all options on one line: `Options: (A) text (B) text`; the answer as a
  bare letter, `(B)`, `B. text` or `The answer is B.`;
- grounding as `Please provide the bounding box coordinate of the region this sentence
  describes: <expression>` (CoIN / LLaVA) or the expression followed by the project's
  grounding suffix; the answer a `[x1, y1, x2, y2]` box.
A record that does not fit raises `RecordProblem`; the converter counts it as a skip and
copies it unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sefe_fast.asd.formats import is_box, option_letter
from sefe_fast.tasks import FORMAT_SUFFIX, GROUNDING_SUFFIX, task_spec

IMAGE_TOKEN = "<image>"
GROUNDING_PREFIX = (
    "Please provide the bounding box coordinate of the region this sentence describes:"
)
_OPTION_LINE = re.compile(r"^\(?([A-J])[.)]\s+(.+?)\s*$")
_ONE_LINE_OPTIONS = re.compile(r"^(?:Options|Choices):\s*(\(A\).*)$")
_ONE_LINE_SPLIT = re.compile(r"\(([A-J])\)\s*")
_LEADING_LABEL = re.compile(r"^(?:Question|Q):\s*")
# CoIN's ScienceQA converter can end a lecture/solution reply with "The answer is A."
_TRAILING_ANSWER = re.compile(r"\bThe answer is \(?([A-J])\)?\.?\s*$")
# Own format detected from the instruction's last line (longest suffixes first).
_SUFFIX_FORMATS: tuple[tuple[str, str], ...] = (
    (GROUNDING_SUFFIX, "box"),
    *((suffix, fmt) for fmt, suffix in FORMAT_SUFFIX.items()),
)


class RecordProblem(ValueError):
    """A record ASD cannot use; the message names the record and the problem."""


@dataclass
class AsdItem:
    """A record's question and answer split into the parts a conversion needs.

    `context` holds the lines before the question (ScienceQA's "Context: ..."), `question`
    the question line (for grounding: the referring expression), `hints` the lines after
    it that are neither options nor the suffix (VizWiz's "When the provided information is
    insufficient, ..."). `answer` is a short phrase: the option text for MCQ records, the
    box for grounding. `options` holds the other option texts of an MCQ record.
    """

    index: int
    label: str
    own: str  # own format, or "box" for grounding
    question: str
    answer: str
    has_image: bool
    context: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    facts: dict[str, Any] | None = None  # mini-CoIN scene facts ("asd" field)
    kind: str = ""  # answer kind (`sefe_fast.asd.kinds`), set by the converter
    task: str | None = None  # the CoIN task, when known

    def body(self, *, with_hints: bool = True) -> str:
        """Context, question and (optionally) hints, one per line."""
        lines = [*self.context, self.question, *(self.hints if with_hints else [])]
        return "\n".join(line for line in lines if line)


def record_label(record: Any, index: int) -> str:
    """`record 'ID' (index N)`, or `record at index N` for a record without an id."""
    ident = record.get("id") if isinstance(record, dict) else None
    return f"record {ident!r} (index {index})" if ident is not None else f"record at index {index}"


def answer_letter(answer: str) -> str | None:
    """The option letter an MCQ answer gives, also at the end of a longer reply, or None."""
    letter = option_letter(answer)
    if letter is None and (match := _TRAILING_ANSWER.search(answer)):
        letter = match.group(1)
    return letter


def _split_suffix(text: str) -> tuple[str, str | None]:
    """(text without its instruction suffix, the format the suffix names, or None)."""
    body = text.strip()
    for suffix, fmt in _SUFFIX_FORMATS:
        if body.endswith(suffix):
            return body[: -len(suffix)].rstrip(), fmt
    return body, None


def _options_of(lines: list[str]) -> tuple[list[str], dict[str, str]]:
    """(lines that are not options, options by letter) from per-line or one-line options."""
    rest, options = [], {}
    for raw in lines:
        line = raw.strip()
        one_line = _ONE_LINE_OPTIONS.match(line)
        if one_line:
            parts = _ONE_LINE_SPLIT.split(one_line.group(1))[1:]
            for letter, text in zip(parts[::2], parts[1::2]):
                if ord(letter) - 65 != len(options):
                    raise RecordProblem(f"options out of order at ({letter}) in {line[:80]!r}")
                options[letter] = text.strip()
            continue
        match = _OPTION_LINE.match(line)
        if match and ord(match.group(1)) - 65 == len(options):
            options[match.group(1)] = match.group(2)
        elif line not in ("Options:", "Choices:"):
            rest.append(raw)
    return rest, options


def _split_question(lines: list[str]) -> tuple[list[str], str, list[str]]:
    """(context lines, question line, hint lines): the question is the last line with '?'.

    "Context: ..." lines count as context wherever they stand (CoIN's ScienceQA converter
    puts the question first).
    """
    lines = [line.strip() for line in lines if line.strip()]
    context = [line for line in lines if line.startswith("Context:")]
    lines = [line for line in lines if not line.startswith("Context:")]
    if not lines:
        return context, "", []
    asks = [i for i, line in enumerate(lines) if line.endswith("?")]
    at = asks[-1] if asks else len(lines) - 1
    question = _LEADING_LABEL.sub("", lines[at])
    return context + lines[:at], question, lines[at + 1 :]


def parse_record(record: Any, index: int, task: str | None) -> AsdItem | None:
    """Split a record; None for a multi-turn record (left as is); RecordProblem if unusable."""
    label = record_label(record, index)
    if not isinstance(record, dict):
        raise RecordProblem(f"{label}: not a JSON object")
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise RecordProblem(f"{label}: 'conversations' must be a list of at least two turns")
    if len(turns) != 2:
        return None
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        raise RecordProblem(f"{label}: each turn needs a string 'value'")
    human, gpt = turns
    if human.get("from") != "human" or gpt.get("from") != "gpt":
        raise RecordProblem(f"{label}: expected a human turn then a gpt turn")
    has_image = IMAGE_TOKEN in human["value"]
    text = human["value"].replace(IMAGE_TOKEN, "").strip()
    body, own = _split_suffix(text)
    answer = gpt["value"].strip()
    if not answer:
        raise RecordProblem(f"{label}: empty answer")
    if body.startswith(GROUNDING_PREFIX):
        own, body = "box", body[len(GROUNDING_PREFIX) :].strip()
    if own is None and is_box(answer):
        own = "box"
    lines, options = _options_of(body.splitlines())
    if own is None and len(options) >= 2 and answer_letter(answer) is not None:
        own = "mcq"
    if own is None and task is not None:
        spec = task_spec(task)
        own = "box" if spec.response_kind == "box" else spec.answer_format
    if own is None:
        raise RecordProblem(
            f"{label}: cannot tell the record's own answer format from its instruction "
            f"{text[-60:]!r}; pass the task name"
        )
    if own == "box":
        if not is_box(answer):
            raise RecordProblem(f"{label}: grounding answer {answer[:40]!r} is not a box")
        context, question, hints = [], " ".join(line.strip() for line in lines).strip(), []
    else:
        context, question, hints = _split_question(lines)
    if not question:
        raise RecordProblem(f"{label}: no question text")
    facts = record.get("asd") if isinstance(record.get("asd"), dict) else None
    item = AsdItem(
        index, label, own, question, answer, has_image, context, hints, facts=facts, task=task
    )
    if own == "mcq":
        letter = answer_letter(answer)
        if len(options) < 2:
            raise RecordProblem(f"{label}: no 'A. ...' or 'Options: (A) ...' options found")
        if letter not in options:
            raise RecordProblem(f"{label}: answer {answer!r} is not one of the options")
        item.answer = options[letter]
        item.options = [text for key, text in options.items() if key != letter]
    if facts is not None:
        # mini-CoIN's facts hold the bare question (no hint lines) and the answer phrase.
        item.context, item.hints = [], []
        item.question = str(facts.get("question", item.question))
        item.answer = str(facts.get("answer", item.answer))
    return item
