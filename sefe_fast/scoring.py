"""Per-record scoring of the eight CoIN tasks, and the superficial/essential split of errors.

`score(task, prediction, answer)` follows CoIN's public scorers (docs/reference.md §4) with
their two bugs fixed; `legacy=True` gives the public behaviour back so numbers can be
set beside published ones. Predictions are stripped of surrounding whitespace first in
both modes (the public pipeline strips generated text before scoring).

Scoring rules (fixed mode; the legacy differences are marked *legacy*):

- ScienceQA: the option letter is read with `sefe_fast.asd.formats.option_letter`
  (a bare "B", "B.", "(B)", "B. text" or "The answer is B.") and compared with the gold
  letter (the gold may itself be "B" or "B. text"). *legacy*: the parse behind the
  paper's numbers, SEFE's `eval_science_qa.py` — the text itself if it is one of A–E, else
  its first letter when it is one of A–E followed by ". ", else the one capital letter
  caught by the regular expression `The answer is ([A-Z]).` when it matches exactly once
  (its "." is any character, so "The answer is B" at the very end is not read); anything
  else is a failed parse, wrong.
- TextVQA: VQA soft accuracy (`sefe_fast.vqa_normalize.vqa_soft_accuracy`) over a list
  of human answers (real CoIN: the ten of TextVQA_0.5.1_val.json, attached by
  `sefe_fast.data.textvqa`); a single string answer (mini-CoIN's) is compared after VQA
  normalisation.
- ImageNet: correct when the label is a substring of the prediction or the reverse
  (case-sensitive, as published); an empty prediction is wrong. *legacy*: an empty
  prediction is a substring of every label and counts as correct (the public bug).
- GQA: lower-case and strip one trailing "." from both, then exact match.
- VizWiz, VQAv2: case-insensitive exact match against the one answer. A list of
  several human answers, if a data set carries one, is scored with VQA soft accuracy.
- OCRVQA: case-insensitive exact match; a prediction containing "Unanswerable" is wrong.
- Grounding: the prediction must be one box "x1, y1, x2, y2" (square brackets optional,
  four numbers); correct when IoU with the gold box > 0.5; anything unparseable scores 0.
  The gold is "[x1, y1, x2, y2]" or a list of four numbers. A box with x2 < x1 or
  y2 < y1 has zero area. *legacy*: the public parse — drop one leading space, delete
  the brackets, then drop one more character at each end before splitting on commas
  (so "[0.12, 0.34, 0.56, 0.78]" is read with y2 = 0.7), and the public IoU formula.

`classify(task, prediction, answer)` puts each record in one of three classes:

- "correct": the record earns credit, score > 0 (for VQA soft accuracy: at least one
  human gave this answer). Correct wins over any format concern.
- "superficial": wrong, and the response does not have the task's expected format,
  `has_response_kind(task_spec(task).response_kind, prediction)`:
  - "letter" (ScienceQA): an option letter ("B", "B. text", "(B)", "The answer is B.");
    a box, a word or phrase, or an explanation there is superficial.
  - "box" (Grounding): exactly one `[x1, y1, x2, y2]`; a letter, a word or an
    explanation there is superficial.
  - "short" (TextVQA, ImageNet, GQA, VizWiz, VQAv2, OCRVQA): 1–10 words, not a box and
    not a lone option letter; a box, a lone letter ("B") or a long explanation there
    is superficial.
  An empty response has no format at all: superficial.
- "essential": wrong with the right format.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

from sefe_fast.asd.formats import has_response_kind, option_letter
from sefe_fast.tasks import task_spec
from sefe_fast.vqa_normalize import normalize_vqa_answer, vqa_soft_accuracy

Answer = str | Sequence[str]
ErrorClass = Literal["correct", "superficial", "essential"]

# Tasks whose gold may be a list of human answers scored with VQA soft accuracy.
_SOFT_ACCURACY_TASKS = frozenset({"TextVQA", "VizWiz", "VQAv2"})
_LEGACY_SQA_OPTIONS = ("A", "B", "C", "D", "E")
# SEFE's eval_science_qa.py pattern, unescaped "." included.
_LEGACY_SQA_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_BOX_BODY = re.compile(
    rf"^\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*$"
)
IOU_THRESHOLD = 0.5

Box = tuple[float, float, float, float]


def _single_answer(task: str, answer: Answer) -> str:
    """The one gold string of a task scored against a single answer."""
    if isinstance(answer, str):
        return answer
    answers = list(answer)
    if len(answers) == 1 and isinstance(answers[0], str):
        return answers[0]
    raise ValueError(f"{task} is scored against one gold answer, got a list of {len(answers)}")


def _answer_list(task: str, answer: Answer) -> list[str]:
    answers = list(answer)
    bad = [a for a in answers if not isinstance(a, str)]
    if bad:
        raise ValueError(f"{task}: gold answers must be strings, got {bad[0]!r}")
    return answers


# ---------------------------------------------------------------- ScienceQA


def _legacy_sqa_letter(prediction: str) -> str | None:
    if prediction in _LEGACY_SQA_OPTIONS:
        return prediction
    if len(prediction) >= 3 and prediction[0] in _LEGACY_SQA_OPTIONS and prediction[1:3] == ". ":
        return prediction[0]
    found = _LEGACY_SQA_THE_ANSWER_IS.findall(prediction)
    return found[0] if len(found) == 1 else None


def _score_scienceqa(prediction: str, answer: str, legacy: bool) -> float:
    gold = option_letter(answer)
    if gold is None:
        raise ValueError(f"ScienceQA gold answer {answer!r} is not an option letter")
    letter = _legacy_sqa_letter(prediction) if legacy else option_letter(prediction)
    return float(letter == gold)


# ---------------------------------------------------------------- ImageNet / GQA / exact


def _score_imagenet(prediction: str, answer: str, legacy: bool) -> float:
    if not legacy and prediction == "":
        return 0.0
    return float(answer in prediction or prediction in answer)


def _score_gqa(prediction: str, answer: str) -> float:
    def canon(text: str) -> str:
        text = text.strip().lower()
        return text[:-1] if text.endswith(".") else text

    return float(canon(prediction) == canon(answer))


def _score_ocrvqa(prediction: str, answer: str) -> float:
    if "Unanswerable" in prediction:
        return 0.0
    return float(prediction.lower() == answer.strip().lower())


# ---------------------------------------------------------------- Grounding


def parse_box(text: str) -> Box | None:
    """The box "[x1, y1, x2, y2]" (brackets optional) as four floats, or None if it is not one."""
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    match = _BOX_BODY.match(body)
    if match is None:
        return None
    box = tuple(float(group) for group in match.groups())
    if not all(math.isfinite(v) for v in box):
        return None
    return box  # type: ignore[return-value]


def _legacy_parse_box(text: str) -> Box | None:
    # The public CoIN parse, bug included: after deleting the brackets it still drops
    # one character at each end, so the last digit of y2 is lost.
    if text.startswith(" "):
        text = text[1:]
    text = text.replace("[", "").replace("]", "")
    try:
        values = [float(part) for part in text[1:-1].split(",")]
    except ValueError:
        return None
    if len(values) != 4:
        return None
    return tuple(values)  # type: ignore[return-value]


def _gold_box(answer: Answer) -> Box:
    if isinstance(answer, str):
        box = parse_box(answer)
        if box is None:
            raise ValueError(f"Grounding gold box {answer!r} is not '[x1, y1, x2, y2]'")
        return box
    values = list(answer)
    if len(values) != 4 or not all(isinstance(v, int | float) for v in values):
        raise ValueError(f"Grounding gold box {answer!r} is not four numbers")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def box_iou(box_a: Box, box_b: Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; inverted boxes have zero area."""
    inter_w = max(0.0, min(box_a[2], box_b[2]) - max(box_a[0], box_b[0]))
    inter_h = max(0.0, min(box_a[3], box_b[3]) - max(box_a[1], box_b[1]))
    inter = inter_w * inter_h
    area_a = max(0.0, box_a[2] - box_a[0]) * max(0.0, box_a[3] - box_a[1])
    area_b = max(0.0, box_b[2] - box_b[0]) * max(0.0, box_b[3] - box_b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _legacy_box_iou(box_a: Box, box_b: Box) -> float:
    # The public formula: signed areas, so an inverted box can give odd values.
    inter = max(0.0, min(box_a[2], box_b[2]) - max(box_a[0], box_b[0])) * max(
        0.0, min(box_a[3], box_b[3]) - max(box_a[1], box_b[1])
    )
    union = (
        (box_a[2] - box_a[0]) * (box_a[3] - box_a[1])
        + (box_b[2] - box_b[0]) * (box_b[3] - box_b[1])
        - inter
    )
    return inter / union if union > 0 else 0.0


def grounding_iou(prediction: str, answer: Answer, legacy: bool = False) -> float | None:
    """IoU of the predicted box with the gold box, or None when the prediction has no box."""
    gold = _gold_box(answer)
    pred = _legacy_parse_box(prediction) if legacy else parse_box(prediction)
    if pred is None:
        return None
    return _legacy_box_iou(pred, gold) if legacy else box_iou(pred, gold)


def _score_grounding(prediction: str, answer: Answer, legacy: bool) -> float:
    iou = grounding_iou(prediction, answer, legacy=legacy)
    return float(iou is not None and iou > IOU_THRESHOLD)


# ---------------------------------------------------------------- public API


def score(task: str, prediction: str, answer: Answer, legacy: bool = False) -> float:
    """Score one prediction of a CoIN task against its gold: a float in [0, 1].

    1.0/0.0 for every task except VQA soft accuracy (TextVQA, or VizWiz/VQAv2 given a
    list of human answers), which gives fractions. `legacy=True` reproduces the public
    CoIN scorers' behaviour (see the module docstring). Unknown task: ValueError.
    """
    task_spec(task)  # unknown task -> ValueError naming the known ones
    if not isinstance(prediction, str):
        raise TypeError(f"{task}: prediction must be a string, got {type(prediction).__name__}")
    if not isinstance(answer, str) and not isinstance(answer, Sequence):
        raise TypeError(f"{task}: gold answer must be a string or a list, got {answer!r}")
    pred = prediction.strip()
    if task == "Grounding":
        return _score_grounding(pred, answer, legacy)
    if task in _SOFT_ACCURACY_TASKS and not isinstance(answer, str):
        answers = _answer_list(task, answer)
        if task == "TextVQA" or len(answers) > 1:
            return vqa_soft_accuracy(pred, answers)
    if task == "TextVQA":
        return float(normalize_vqa_answer(pred) == normalize_vqa_answer(answer))  # type: ignore[arg-type]
    gold = _single_answer(task, answer)
    if task == "ScienceQA":
        return _score_scienceqa(pred, gold, legacy)
    if task == "ImageNet":
        return _score_imagenet(pred, gold, legacy)
    if task == "GQA":
        return _score_gqa(pred, gold)
    if task == "OCRVQA":
        return _score_ocrvqa(pred, gold)
    # VizWiz, VQAv2: case-insensitive exact match.
    return float(pred.lower() == gold.strip().lower())


def is_expected_format(task: str, prediction: str) -> bool:
    """True when `prediction` has the response format task `task` asks for (see module doc)."""
    return has_response_kind(task_spec(task).response_kind, prediction.strip())


def classify_scored(task: str, prediction: str, score_value: float) -> ErrorClass:
    """The class of a prediction whose score is already known (saves scoring twice)."""
    if score_value > 0.0:
        return "correct"
    return "essential" if is_expected_format(task, prediction) else "superficial"


def classify(task: str, prediction: str, answer: Answer, legacy: bool = False) -> ErrorClass:
    """Return "correct" (score > 0), else "superficial" (wrong format) or "essential"."""
    return classify_scored(task, prediction, score(task, prediction, answer, legacy=legacy))
