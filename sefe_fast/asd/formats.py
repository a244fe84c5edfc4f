"""Format checkers: does a response have a given answer style?

The evaluation uses these to tell superficial forgetting (the response has the wrong
format, e.g. a box where a letter was asked) from essential forgetting (right format,
wrong answer); ASD uses them to check the records it writes.
"""

from __future__ import annotations

import re

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_BOX = re.compile(rf"^\[\s*{_NUMBER}\s*,\s*{_NUMBER}\s*,\s*{_NUMBER}\s*,\s*{_NUMBER}\s*\]$")
_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.):](?:\s.*)?)?$", re.DOTALL)
_THE_ANSWER_IS = re.compile(r"^the answer is \(?([A-Z])\)?\.?$", re.IGNORECASE)
_YES_NO = re.compile(r"^(yes|no)\.?$", re.IGNORECASE)

# Word-count bands of the five styles (docs/reference.md §2: brief ≈ 20 words, detailed ≈ 50).
SHORT_MAX_WORDS = 10
BRIEF_MIN_WORDS, BRIEF_MAX_WORDS = 8, 35
DETAILED_MIN_WORDS = 30


def _words(response: str) -> list[str]:
    return response.split()


def is_box(response: str) -> bool:
    """True when the response is exactly one `[x1, y1, x2, y2]` box of four numbers."""
    return bool(_BOX.match(response.strip()))


def option_letter(response: str) -> str | None:
    """The option letter a response gives ("B", "B.", "(B)", "B. text", "The answer is B."), else None."""
    text = response.strip()
    match = _LETTER.match(text) or _THE_ANSWER_IS.match(text)
    return match.group(1) if match else None


def is_option_letter(response: str) -> bool:
    """True when the response answers with an option letter (the MCQ style)."""
    return option_letter(response) is not None


def is_yes_no(response: str) -> bool:
    """True when the response is a bare "yes" or "no" (any case, optional full stop)."""
    return bool(_YES_NO.match(response.strip()))


def is_short_answer(response: str) -> bool:
    """True for a single word or phrase: 1..SHORT_MAX_WORDS words, not a box, not a lone option letter."""
    text = response.strip()
    n_words = len(_words(text))
    if n_words == 0 or n_words > SHORT_MAX_WORDS or is_box(text):
        return False
    # A lone capital letter ("B") is the MCQ style, not a short answer.
    return not (len(text) <= 3 and is_option_letter(text))


def is_brief_explanation(response: str) -> bool:
    """True for an explanation of about 20 words (BRIEF_MIN_WORDS..BRIEF_MAX_WORDS)."""
    return BRIEF_MIN_WORDS <= len(_words(response)) <= BRIEF_MAX_WORDS


def is_detailed_explanation(response: str) -> bool:
    """True for an explanation of about 50 words (at least DETAILED_MIN_WORDS)."""
    return len(_words(response)) >= DETAILED_MIN_WORDS


FORMAT_CHECKERS = {
    "short": is_short_answer,
    "yes_no": is_yes_no,
    "mcq": is_option_letter,
    "brief": is_brief_explanation,
    "detailed": is_detailed_explanation,
}

# What a correct response of each TaskSpec.response_kind looks like.
RESPONSE_KIND_CHECKERS = {
    "letter": is_option_letter,
    "box": is_box,
    "short": is_short_answer,
}


def has_format(answer_format: str, response: str) -> bool:
    """True when `response` has the ASD style `answer_format` (one of ANSWER_FORMATS)."""
    try:
        checker = FORMAT_CHECKERS[answer_format]
    except KeyError:
        raise ValueError(f"unknown answer format {answer_format!r}") from None
    return checker(response)


def has_response_kind(response_kind: str, response: str) -> bool:
    """True when `response` looks like a task's expected response ("letter", "box", "short")."""
    try:
        checker = RESPONSE_KIND_CHECKERS[response_kind]
    except KeyError:
        raise ValueError(f"unknown response kind {response_kind!r}") from None
    return checker(response)
