"""The CoIN task list and the per-task conventions every stage shares.

Data generation, ASD, scoring and the trainer all read these, so a task's name, its own
answer format and its instruction suffix are defined once.
"""

from __future__ import annotations

from dataclasses import dataclass

MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
SHORT_SUFFIX = "Answer the question using a single word or phrase."
YES_NO_SUFFIX = "Answer yes or no."
BRIEF_SUFFIX = "Answer with a brief explanation of about 20 words."
DETAILED_SUFFIX = "Answer with a detailed explanation of about 50 words."
GROUNDING_SUFFIX = (
    "Please provide the bounding box coordinate of the region this sentence describes "
    "as [x1, y1, x2, y2], normalised to the image, with two decimals."
)

# The five ASD answer styles (docs/reference.md §2).
ANSWER_FORMATS: tuple[str, ...] = ("short", "yes_no", "mcq", "brief", "detailed")
FORMAT_SUFFIX: dict[str, str] = {
    "short": SHORT_SUFFIX,
    "yes_no": YES_NO_SUFFIX,
    "mcq": MCQ_SUFFIX,
    "brief": BRIEF_SUFFIX,
    "detailed": DETAILED_SUFFIX,
}


@dataclass(frozen=True)
class TaskSpec:
    """What a CoIN task asks for.

    `answer_format` is the task's own ASD format (one of ANSWER_FORMATS); `response_kind`
    is what a correct response looks like to the format checkers: "letter" (an option
    letter), "box" (`[x1, y1, x2, y2]`) or "short" (a word or phrase).
    `max_new_tokens` is the task's own cap on greedy decoding, in tokens: what a run uses
    unless it sets its own decoding length (`decode_length`).
    """

    name: str
    answer_format: str
    response_kind: str
    max_new_tokens: int


COIN_TASK_SPECS: tuple[TaskSpec, ...] = (
    TaskSpec("ScienceQA", "mcq", "letter", 8),
    TaskSpec("TextVQA", "short", "short", 16),
    TaskSpec("ImageNet", "short", "short", 16),
    TaskSpec("GQA", "short", "short", 16),
    TaskSpec("VizWiz", "short", "short", 16),
    # A box is the grounding task's own (short, closed-set) answer style.
    TaskSpec("Grounding", "short", "box", 32),
    TaskSpec("VQAv2", "short", "short", 16),
    TaskSpec("OCRVQA", "short", "short", 32),
)
COIN_TASKS: tuple[str, ...] = tuple(spec.name for spec in COIN_TASK_SPECS)
_SPECS_BY_NAME = {spec.name: spec for spec in COIN_TASK_SPECS}


def task_spec(name: str) -> TaskSpec:
    """Return the TaskSpec of a CoIN task; a clear ValueError for an unknown name."""
    try:
        return _SPECS_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown CoIN task {name!r}; expected one of {COIN_TASKS}") from None


# The official CoIN/SEFE evaluation decodes greedily up to this many new tokens, stopping at
# end of sequence (`max_new_tokens=1024` in its model_science_qa.py / model_others.py).
OFFICIAL_MAX_NEW_TOKENS = 1024


def decode_length(task: str, max_new_tokens: int | None) -> int:
    """New tokens greedy decoding may produce for `task`: the run's `max_new_tokens`, or the
    task's own cap (`TaskSpec.max_new_tokens`) when that is None or 0."""
    if max_new_tokens is None or max_new_tokens == 0:
        return task_spec(task).max_new_tokens
    if isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0 (0 = the task's cap), got {max_new_tokens}")
    return int(max_new_tokens)


def evaluation_question(task: str, text: str) -> str:
    """The question put to the model for a test record of `task`; `<image>\\n` is put in
    front afterwards for a record with an image (`sefe_fast.generate.encode_prompt`).

    ScienceQA gets the official MCQ instruction on a line of its own, as the official
    evaluation does (`--single-pred-prompt`: the question with `<image>` removed and
    stripped, then "\\n" + MCQ_SUFFIX, for text-only and image questions alike). The
    official code appends it unconditionally; here a question that already ends with the
    line (mini-CoIN's test questions do) keeps one copy, so mini-CoIN's prompts stay those
    its training data teaches. Every other task's question is used as written.
    """
    task_spec(task)
    if task != "ScienceQA":
        return text
    body = text.replace("<image>", "").strip()  # the image, if any, goes in front later
    return body if body.endswith(MCQ_SUFFIX) else f"{body}\n{MCQ_SUFFIX}"
