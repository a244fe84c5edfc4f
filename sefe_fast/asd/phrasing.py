"""Wording of ASD's rule-built questions and explanations, chosen by answer kind.

Yes/no (`yes_no_question`): SEFE builds a two-way choice from the true answer and one
plausible wrong one and asks about one of them (`docs/reference.md §2`). The question is
rephrased around the candidate when its form allows ("What color is the bus?" + "red" →
"Is the bus red?"; "How many dogs are there?" + "3" → "Are there exactly 3 dogs?"; an
ImageNet class → "Is the object in the image a tabby cat?"; OCR-VQA → "Was this book
written by X?"); otherwise the original question is kept and a kind-fitting follow-up is
asked ('Is the answer "X"?'). A question whose answer already is yes/no is asked as is.

Explanations (`explanation`): without an MLLM the converter cannot look at the image, so
an explanation restates the question and points to the evidence that kind of answer rests
on (counting for numbers, the printed text for OCR, the option set for ScienceQA, ...),
with several wordings per kind, ending on the answer. Grounding's explanations describe
the boxed object from its referring expression, its position and its size (the official
prompt asks an MLLM to describe the boxed target). `docs/reference.md §2` and the README
state what this lacks against an MLLM rewriter: no visual detail beyond the record's text.
"""

from __future__ import annotations

import random
import re

from sefe_fast.asd.kinds import box_values, is_counting
from sefe_fast.asd.records import AsdItem


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


_DETERMINERS = frozenset(
    ("a", "an", "the", "this", "that", "these", "those", "his", "her", "its", "their", "my",
     "your", "our", "some", "one", "two", "three")
)  # fmt: skip


def _with_article(noun: str) -> str:
    """An article before a single lower-case singular word ("racket" → "a racket")."""
    word = noun.strip()
    if " " in word or not word.isalpha() or not word.islower() or word.endswith(("s", "ing")):
        return word
    return f"{_article(word)} {word}"


def _definite(expression: str) -> str:
    """A referring expression as a noun phrase: "man in red" → "the man in red"."""
    first = expression.split(" ", 1)[0].lower()
    return expression if first in _DETERMINERS else f"the {expression}"


def _clean(text: str) -> str:
    return text.strip().rstrip(".?!").strip()


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


_WHAT_COLOUR = re.compile(r"^what colou?rs? (is|are) (.+?)\??$", re.IGNORECASE)
_HOW_MANY = re.compile(
    r"^how many (.+?) (?:are|is|were|can you see|do you see)( there)?(.*?)\??$", re.IGNORECASE
)
# "What is the man holding (in his hand)?": after the -ing verb, nothing or a preposition
# (so "What is the building made of?" is not read as the verb "building").
_WHAT_DOING = re.compile(
    r"^what (is|are) (.+?) (\w+ing)((?: (?:in|on|at|with|to|from|under|near|for)\b.*?)?)\??$",
    re.IGNORECASE,
)
_WHAT_DOES_SAY = re.compile(r"^what does (.+?) say\??$", re.IGNORECASE)
_WHAT_IS_THE = re.compile(r"^what (is|are) (the|this|that|these|those) (.+?)\??$", re.IGNORECASE)
_WHERE = re.compile(r"^where (is|are) (.+?)\??$", re.IGNORECASE)
_WHO = re.compile(r"^who (is|are|was) (.+?)\??$", re.IGNORECASE)


def _rephrased(item: AsdItem, candidate: str) -> str | None:
    """The question turned into a yes/no question about `candidate`, or None."""
    question, kind, value = item.question.strip(), item.kind, _clean(candidate)
    if kind == "colour" and (m := _WHAT_COLOUR.match(question)):
        return f"{_capitalise(m.group(1).lower())} {_clean(m.group(2))} {value}?"
    if kind == "number" and (m := _HOW_MANY.match(question)):
        return f"Are there exactly {value} {m.group(1)}{m.group(3).rstrip('?')}?"
    if kind == "class":
        return f"Is the object in the image {_article(value)} {value}?"
    if kind == "genre":
        return f'Is the genre of this book "{value}"?'
    if kind == "title":
        return f'Is the title of this book "{value}"?'
    if kind == "author":
        return f"Was this book written by {value}?"
    if kind.startswith("phrase:"):
        if m := _WHAT_DOES_SAY.match(question):
            return f'Does {m.group(1)} say "{value}"?'
        if m := _WHAT_DOING.match(question):
            be, subject, verb, rest = m.group(1).lower(), m.group(2), m.group(3), m.group(4)
            if verb.lower() == "doing":  # "What is the man doing?" + "surfing"
                return f"{_capitalise(be)} {subject} {value}{rest}?"
            return f"{_capitalise(be)} {subject} {verb} {_with_article(value)}{rest}?"
        if m := _WHAT_IS_THE.match(question):
            return f'{_capitalise(m.group(1).lower())} {m.group(2).lower()} {m.group(3)} "{value}"?'
        if m := _WHERE.match(question):
            return f"{_capitalise(m.group(1).lower())} {m.group(2)} {value}?"
        if m := _WHO.match(question):
            who = value if value[:1].isupper() else f"the {value}"  # a name or a noun
            return f"Is it {who} who {m.group(1).lower()} {m.group(2)}?"
    return None


_FOLLOW_UPS = {
    "number": ("Is the number {c}?", "Is the count {c}?"),
    "colour": ("Is the colour {c}?", "Is it {c}?"),
    "option": ('Is the answer "{c}"?', 'Is "{c}" the correct choice?'),
    "box": ("Is {c} the bounding box of this region?", "Does the box {c} enclose this region?"),
}
_GENERIC_FOLLOW_UPS = ('Is the answer "{c}"?', 'Is "{c}" the correct answer?')


def yes_no_question(item: AsdItem, candidate: str, rng: random.Random) -> str:
    """The prompt (without the format suffix) asking whether `candidate` is the answer."""
    if item.kind == "yes_no":
        return item.body(with_hints=False)
    if item.kind == "box":
        ask = rng.choice(_FOLLOW_UPS["box"]).format(c=candidate)
        return f"The region this sentence describes: {_clean(item.question)}.\n{ask}"
    rephrased = _rephrased(item, candidate)
    if rephrased is not None:
        return "\n".join([*item.context, rephrased])
    follow_ups = _FOLLOW_UPS.get(item.kind, _GENERIC_FOLLOW_UPS)
    return f"{item.body()}\n{rng.choice(follow_ups).format(c=_clean(candidate))}"


def mcq_question(item: AsdItem) -> str:
    """The question an MCQ conversion lists its options under (without options/suffix)."""
    if item.kind == "box":
        return f"Which bounding box encloses the region this sentence describes: {_clean(item.question)}?"
    return item.body()


def explanation_question(item: AsdItem) -> str:
    """The question an explanation conversion asks (grounding: describe the boxed region)."""
    if item.kind == "box":
        return f"Describe the object in the region {item.answer} of the image."
    return item.body()


# Evidence sentences per kind: {a} is the answer; brief ones are about 15-25 words in all.
_EVIDENCE = {
    "yes_no": (
        "Checking the image for exactly what the question asks about, the answer is {a}.",
        "What the picture shows settles the question, so the answer is {a}.",
    ),
    "number_read": (
        "The number that can be read in the image where the question points is {a}.",
        "Reading the digits shown on the object in question gives {a}.",
    ),
    "text": (
        'The text visible in the image where the question points reads "{a}".',
        'Reading the words written in the picture, the relevant one is "{a}".',
    ),
    "number": (
        "Counting the relevant objects in the image one by one gives a total of {a}.",
        "There are {a} of them when every one visible in the picture is counted.",
    ),
    "colour": (
        "The colour clearly visible on the object in question is {a}.",
        "Looking at the object the question refers to, its colour is {a}.",
    ),
    "class": (
        "The main object's shape, parts and texture match the typical look of {art} {a}.",
        "The distinctive features of the subject in the picture identify it as {art} {a}.",
    ),
    "genre": (
        "The cover's title, artwork and layout are typical of a book in the {a} category.",
        "Judging by the words and the design on its cover, this book belongs to {a}.",
    ),
    "title": (
        'The large text printed on the front cover reads "{a}", which is the title.',
        'The title shown prominently on the cover of this book is "{a}".',
    ),
    "author": (
        "The name printed on the cover as the writer of this book is {a}.",
        "The cover credits {a} as the author of this book.",
    ),
    "option": (
        "Of the given choices, {a} is the one that fits the question{where}.",
        "Weighing each option against the question{where}, the correct one is {a}.",
    ),
    "unanswerable": (
        "The photo is too blurry, dark or badly framed to tell, so the question is {a}.",
        "What the question asks about cannot be made out in this photo: it is {a}.",
    ),
    "phrase": (
        "Looking at the part of the image the question refers to, it shows {a}.",
        "The visual evidence in the picture points to {a} as the answer.",
    ),
}
_OPENINGS = (
    'The question asks: "{q}"',
    'To answer "{q}", one has to look at the relevant detail',
    'The question "{q}" concerns a specific detail',
)
_SUPPORT = (
    "Other possible answers do not match what is there, and nothing else contradicts it.",
    "The alternatives one might consider are ruled out by what can actually be seen.",
    "No other reading of the evidence fits as well, so the conclusion is clear.",
)
_CLOSINGS = (
    "Therefore, the answer is {a}.",
    "So the correct answer is {a}.",
    "Hence the answer is {a}.",
)


def _position(box: str) -> tuple[str, str, int]:
    """(position words, size word, percent of the image) of a normalised box."""
    x1, y1, x2, y2 = box_values(box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    where = (
        "centre" if (vertical, horizontal) == ("middle", "centre") else f"{vertical} {horizontal}"
    )
    area = max(0.0, (x2 - x1) * (y2 - y1))
    size = "small" if area < 0.05 else "medium-sized" if area < 0.25 else "large"
    return where, size, round(100 * area)


def _grounding_explanation(item: AsdItem, length: str, rng: random.Random) -> str:
    expression = _definite(_clean(item.question))
    where, size, percent = _position(item.answer)
    x1, y1, x2, y2 = box_values(item.answer)
    brief = rng.choice(
        (
            f"The region shows {expression}, a {size} object in the {where} of the image.",
            f"This {size} area in the {where} of the picture contains {expression}.",
        )
    )
    if length == "brief":
        return brief
    return (
        f"{brief} It covers about {percent}% of the image, spanning from {x1:.2f} to "
        f"{x2:.2f} horizontally and from {y1:.2f} to {y2:.2f} vertically. "
        + rng.choice(
            (
                f'The description "{_clean(item.question)}" singles it out from the other things in the '
                "scene, so this box marks exactly that object.",
                f'Of everything visible, only this object fits "{_clean(item.question)}", which is why '
                "the box is drawn around it and not elsewhere.",
            )
        )
    )


# Questions longer than this (in words) are not restated in a brief explanation.
BRIEF_QUESTION_WORDS = 10


def template_explanation(item: AsdItem, length: str, rng: random.Random) -> str:
    """A rule-written "brief" (~20 words) or "detailed" (~50 words) explanation."""
    if item.kind == "box":
        return _grounding_explanation(item, length, rng)
    answer = _clean(item.answer) if item.kind != "yes_no" else item.answer.strip().lower()
    family = "phrase" if item.kind.startswith("phrase:") else item.kind
    if family == "phrase" and item.task == "TextVQA":
        family = "text"
    if family == "number" and not is_counting(item.question):
        family = "number_read"
    if answer.lower() == "unanswerable":
        family, answer = "unanswerable", answer.lower()
    where = " and the context given" if item.context else ""
    if item.has_image:
        where = " and the picture" + (" and its context" if item.context else "")
    evidence = rng.choice(_EVIDENCE[family]).format(a=answer, art=_article(answer), where=where)
    opening = f"{rng.choice(_OPENINGS).format(q=_clean(item.question))}."
    if length == "brief":
        # A long question would push the explanation past a brief one's ~20 words.
        return (
            evidence
            if len(item.question.split()) > BRIEF_QUESTION_WORDS
            else f"{opening} {evidence}"
        )
    return " ".join(
        [
            opening,
            evidence,
            rng.choice(_SUPPORT),
            rng.choice(_CLOSINGS).format(a=answer),
        ]
    )
