"""VQA answer normalisation and VQA soft accuracy.

The normalisation follows the steps of the standard VQA evaluation (Antol et al. 2015,
used for VQAv2 and TextVQA): whitespace clean-up, punctuation handling, lower-casing,
number words to digits, dropping articles, and restoring apostrophes in contractions
written without them ("dont" -> "don't"). Written from the published description.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

# Punctuation the VQA evaluation removes or turns into a space. The apostrophe is not in
# the list on purpose: contractions keep it, and "dont" is mapped to "don't" instead.
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
# A comma between digits ("1,000") means the punctuation is a number separator: then
# every punctuation mark is deleted rather than replaced by a space.
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A full stop is dropped unless a digit follows it (keeps "3.5" and ".5").
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Contractions in their written form; the lookup table maps every way of writing them
# with some apostrophes missing to the written form.
_CONTRACTED_FORMS = [
    "ain't",
    "aren't",
    "can't",
    "could've",
    "couldn't",
    "couldn't've",
    "didn't",
    "doesn't",
    "don't",
    "hadn't",
    "hadn't've",
    "hasn't",
    "haven't",
    "he'd",
    "he'd've",
    "he'll",
    "he's",
    "how'd",
    "how'll",
    "how's",
    "i'd",
    "i'd've",
    "i'll",
    "i'm",
    "i've",
    "isn't",
    "it'd",
    "it'd've",
    "it'll",
    "it's",
    "let's",
    "ma'am",
    "mightn't",
    "mightn't've",
    "might've",
    "mustn't",
    "must've",
    "needn't",
    "not've",
    "o'clock",
    "oughtn't",
    "shan't",
    "she'd",
    "she'd've",
    "she'll",
    "she's",
    "should've",
    "shouldn't",
    "shouldn't've",
    "somebody'd",
    "somebody'd've",
    "somebody'll",
    "somebody's",
    "someone'd",
    "someone'd've",
    "someone'll",
    "someone's",
    "something'd",
    "something'd've",
    "something'll",
    "that's",
    "there'd",
    "there'd've",
    "there're",
    "there's",
    "they'd",
    "they'd've",
    "they'll",
    "they're",
    "they've",
    "wasn't",
    "we'd",
    "we'd've",
    "we'll",
    "we're",
    "we've",
    "weren't",
    "what'll",
    "what're",
    "what's",
    "what've",
    "when's",
    "where'd",
    "where's",
    "where've",
    "who'd",
    "who'd've",
    "who'll",
    "who's",
    "who've",
    "why'll",
    "why're",
    "why's",
    "won't",
    "would've",
    "wouldn't",
    "wouldn't've",
    "y'all",
    "y'all'll",
    "y'all'd've",
    "you'd",
    "you'd've",
    "you'll",
    "you're",
    "you've",
]
# Without their apostrophes these are ordinary English words: never rewrite them.
_REAL_WORDS = frozenset(
    {"hell", "id", "ill", "its", "lets", "shed", "shell", "wed", "well", "were"}
)


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for form in _CONTRACTED_FORMS:
        pieces = form.split("'")
        n_gaps = len(pieces) - 1
        # Every subset of the apostrophes dropped, except keeping them all (already right).
        for keep in itertools.product((False, True), repeat=n_gaps):
            if all(keep):
                continue
            written = pieces[0]
            for kept, piece in zip(keep, pieces[1:]):
                written += ("'" if kept else "") + piece
            if written not in _REAL_WORDS:
                table[written] = form
    return table


CONTRACTIONS: dict[str, str] = _contraction_table()


def _process_punctuation(text: str) -> str:
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        if mark not in out:
            continue
        # A mark next to a space is a separator already: delete it; inside a token
        # ("black-and-white") it separates words: replace with a space.
        if f"{mark} " in text or f" {mark}" in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _process_digits_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """Normalise a VQA answer: "Two dogs." -> "2 dogs", "The Black-and-White" -> "black and white"."""
    cleaned = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_articles(_process_punctuation(cleaned))


def vqa_soft_accuracy(prediction: str, gold_answers: Sequence[str]) -> float:
    """VQA soft accuracy in [0, 1] of `prediction` against the human answers.

    With n >= 2 answers: the mean, over the n ways of leaving one answer out, of
    min(#remaining answers equal to the prediction / 3, 1), everything normalised with
    `normalize_vqa_answer`. With 10 answers and k matches this gives 0.3, 0.6, 0.9, 1.0
    for k = 1, 2, 3, >=4. With one answer: 1.0 on a normalised exact match, else 0.0.
    """
    if len(gold_answers) == 0:
        raise ValueError("VQA soft accuracy needs at least one gold answer, got an empty list")
    pred = normalize_vqa_answer(prediction)
    golds = [normalize_vqa_answer(answer) for answer in gold_answers]
    if len(golds) == 1:
        return float(pred == golds[0])
    n_matches = sum(gold == pred for gold in golds)
    total = 0.0
    for gold in golds:
        remaining_matches = n_matches - (gold == pred)
        total += min(remaining_matches / 3.0, 1.0)
    return total / len(golds)
