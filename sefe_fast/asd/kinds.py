"""Answer kinds and same-kind distractors for ASD's multiple-choice and yes/no questions.

SEFE's prompts ask an MLLM for "plausible but incorrect" options (`docs/reference.md §2`).
Without one, a wrong option is plausible when it is an answer of the same kind to the same
sort of question. `answer_kind` sorts an answer into one of these kinds:

- `yes_no` (the answer is yes or no), `number` (digits or a number word, or a "How many"
  question), `colour` (a colour name, or a "What colour" question), `box` (grounding);
- `option`: an MCQ record's option text; its distractors are the record's own options;
- `class` (ImageNet's class names), and OCR-VQA's `genre`, `title`, `author`;
- `phrase:<question type>` for any other short answer, the question type being the
  question's first three words ("what sport is"), as VQA's question types are.
`is_counting` tells a "How many" number from a number read off the image (TextVQA).

`AnswerPools` holds each kind's answers in a file; `distractors` draws wrong answers of the
item's kind only. Phrase kinds fall back from the three-word question type to its first
two words ("what sport"), never further ("what" would mix sports with objects) nor to
another kind. Numbers and colours fall back to nearby numbers and
common colour names. A kind with no wrong answer left yields none: the caller counts a skip.
"""

from __future__ import annotations

import random
import re

from sefe_fast.asd.records import AsdItem

YES_NO = ("yes", "no")
COLOURS = (
    "black", "blue", "brown", "gold", "gray", "green", "grey", "orange", "pink", "purple",
    "red", "silver", "tan", "white", "yellow", "beige", "maroon", "navy", "teal",
)  # fmt: skip
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve",
)  # fmt: skip
_NUMBER = re.compile(r"^[-+]?\d+(?:[.,]\d+)?$")
_COLOUR_QUESTION = re.compile(r"\bwhat colou?rs?\b", re.IGNORECASE)
_COUNT_QUESTION = re.compile(r"^how many\b", re.IGNORECASE)
_GENRE = re.compile(r"\b(genre|type of (?:a )?book|kind of (?:a )?book)\b", re.IGNORECASE)
_TITLE = re.compile(r"\b(title|name of this book)\b", re.IGNORECASE)
_AUTHOR = re.compile(r"\b(who wrote|author|written by)\b", re.IGNORECASE)
_CLASS_QUESTION = re.compile(r"^what is the object in the image\?", re.IGNORECASE)
_WORD = re.compile(r"[a-z']+")


def is_number(answer: str) -> bool:
    """True for digits ("3", "2.5") or a number word up to twelve."""
    text = answer.strip().lower()
    return bool(_NUMBER.match(text)) or text in NUMBER_WORDS


def is_colour(answer: str) -> bool:
    """True for a colour name or colours joined by "and" ("red and white")."""
    words = [w for w in answer.strip().lower().replace(",", " ").split() if w != "and"]
    return bool(words) and all(w in COLOURS for w in words)


def question_type(question: str, n_words: int = 3) -> str:
    """The question's first `n_words` words, lower case ("what sport is")."""
    return " ".join(_WORD.findall(question.lower())[:n_words])


def answer_kind(item: AsdItem, task: str | None) -> str:
    """The item's answer kind (see the module docstring)."""
    answer, question = item.answer.strip().lower(), item.question
    if item.own == "box":
        return "box"
    if item.own == "mcq":
        return "option"
    if answer in YES_NO:
        return "yes_no"
    if task == "ImageNet" or _CLASS_QUESTION.search(question):
        return "class"  # before colours and numbers: "orange" is an ImageNet class
    if is_number(answer) or _COUNT_QUESTION.search(question):
        return "number"
    if is_colour(answer) or _COLOUR_QUESTION.search(question):
        return "colour"
    if task in (None, "OCRVQA"):
        for kind, pattern in (("genre", _GENRE), ("title", _TITLE), ("author", _AUTHOR)):
            if pattern.search(question):
                return kind
    return f"phrase:{question_type(question)}"


def box_values(box: str) -> tuple[float, ...]:
    """The four numbers of a `[x1, y1, x2, y2]` string."""
    return tuple(float(v) for v in box.strip().strip("[]").split(","))


def format_box(values: tuple[float, ...]) -> str:
    """`[x1, y1, x2, y2]` with two decimals, as CoIN writes boxes."""
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# A wrong box overlaps the true one by at most this IoU (the scorer's threshold is 0.5).
MAX_DISTRACTOR_IOU = 0.3


def shifted_boxes(box: str) -> list[str]:
    """Boxes of the same size moved by one box width/height (kept inside the image)."""
    x1, y1, x2, y2 = box_values(box)
    w, h = x2 - x1, y2 - y1
    out = []
    for dx, dy in ((w, 0), (-w, 0), (0, h), (0, -h), (w, h), (-w, -h), (w, -h), (-w, h)):
        nx1 = min(max(x1 + dx, 0.0), 1.0 - w)
        ny1 = min(max(y1 + dy, 0.0), 1.0 - h)
        out.append(format_box((nx1, ny1, nx1 + w, ny1 + h)))
    return out


def _nearby_numbers(answer: str) -> list[str]:
    """Numbers close to a numeric answer (never negative), as digits."""
    text = answer.strip().lower()
    if text in NUMBER_WORDS:
        value = NUMBER_WORDS.index(text)
    elif re.fullmatch(r"\d+", text):
        value = int(text)
    else:
        return [str(v) for v in range(0, 5)]
    return [str(v) for v in (value + 1, value - 1, value + 2, value - 2, value + 3) if v >= 0]


def _two_word_kind(kind: str) -> str:
    """`phrase:what sport is` → `phrase2:what sport` (the fallback pool's key)."""
    return "phrase2:" + " ".join(kind.split(":", 1)[1].split(" ")[:2])


def is_counting(question: str) -> bool:
    """True for a "How many ..." question."""
    return bool(_COUNT_QUESTION.search(question))


class AnswerPools:
    """Every answer of each kind in a file (sorted, so draws depend only on the seed)."""

    def __init__(self, items: list[AsdItem]) -> None:
        pools: dict[str, set[str]] = {}
        for item in items:
            keys = [item.kind]
            if item.kind.startswith("phrase:"):
                keys.append(_two_word_kind(item.kind))
            for key in keys:
                pools.setdefault(key, set()).add(item.answer)
        self.pools = {kind: sorted(values) for kind, values in pools.items()}

    def sources(self, item: AsdItem) -> list[list[str]]:
        """Candidate lists for `item`'s wrong answers, best first, all of its own kind."""
        kind = item.kind
        if kind == "option":
            return [list(item.options)]
        if kind == "yes_no":  # the other one, written as the record writes its answer
            other = "no" if item.answer.strip().lower() == "yes" else "yes"
            return [[other.capitalize() if item.answer[:1].isupper() else other]]
        sources = [self.pools.get(kind, [])]
        if kind == "box":
            sources.insert(0, shifted_boxes(item.answer))
        elif kind == "number":
            sources.insert(0, _nearby_numbers(item.answer))
        elif kind == "colour":
            sources.append(list(COLOURS))
        elif kind.startswith("phrase:"):
            sources.append(self.pools.get(_two_word_kind(kind), []))
        return sources

    def distractors(self, item: AsdItem, k: int, rng: random.Random) -> list[str]:
        """Up to `k` distinct wrong answers of `item`'s kind (scene facts first, if any)."""
        seen = {item.answer.strip().lower()}
        out: list[str] = []
        sources = self.sources(item)
        if item.facts and item.facts.get("answer_pool"):
            sources.insert(0, [str(v) for v in item.facts["answer_pool"]])
        if item.kind == "box":
            truth = box_values(item.answer)
            sources = [
                [v for v in source if box_iou(box_values(v), truth) <= MAX_DISTRACTOR_IOU]
                for source in sources
            ]
        for source in sources:
            candidates = [v for v in source if v.strip().lower() not in seen]
            rng.shuffle(candidates)
            for value in candidates[: k - len(out)]:
                seen.add(value.strip().lower())
                out.append(value)
            if len(out) == k:
                break
        return out
