"""The LLaVA-1.5 "vicuna_v1" conversation template, and tokenisation with answer-only labels.

A conversation `[{"from": "human", "value": q1}, {"from": "gpt", "value": a1}, ...]` renders as

    {SYSTEM_PROMPT} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

(separator " " after a user turn, "</s>" after an assistant turn), with the tokenizer's bos
in front. Labels are -100 everywhere except on each answer: the space after "ASSISTANT:",
the answer's characters and the "</s>" closing it. The space belongs to the answer because
a generation prompt ends in "ASSISTANT:" (as in LLaVA, where the space is part of the first
sentencepiece answer token "▁word"), so the model must learn to emit it; decoded
generations are therefore stripped of leading whitespace by the caller.

A tokenizer with a chat template of its own (an assembled instruction LLM such as
SmolLM2-135M-Instruct; `sefe_fast.model.build`) renders with that template instead
(`render_chat_template`): the loss then covers each assistant turn from the end of the
template's generation prompt to the end of that turn (its end-of-turn token included).
`load_llava` drops a LLaVA checkpoint's template, so the LLaVA-7B path keeps vicuna_v1.
`<image>` (one tokenizer token) is expanded to `num_image_tokens` copies of `image_token_id`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sefe_fast.data.char_tokenizer import IMAGE_TOKEN

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"
HUMAN_FROM = "human"
GPT_FROM = "gpt"
IGNORE_INDEX = -100


@dataclass
class TokenizedConversation:
    """Token ids of one rendered conversation, its labels (-100 = no loss) and whether it was cut."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def has_chat_template(tokenizer: Any) -> bool:
    """True if `tokenizer` carries a chat template of its own (used instead of vicuna_v1)."""
    return bool(getattr(tokenizer, "chat_template", None))


def build_generation_prompt(question: str, tokenizer: Any = None) -> str:
    """The prompt for greedy decoding (`<image>` kept): the tokenizer's chat template with
    its generation prompt if it has one, else vicuna_v1's system line,
    ` USER: {question} ASSISTANT:`."""
    if tokenizer is not None and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return f"{SYSTEM_PROMPT} {USER_ROLE}: {question} {ASSISTANT_ROLE}:"


def render_chat_template(
    conversations: Sequence[dict[str, str]], tokenizer: Any
) -> tuple[str, list[tuple[int, int]]]:
    """Render with `tokenizer`'s own chat template; spans [start, end) of the answers.

    Each assistant turn's span runs from the end of the template's generation prompt for
    the turns before it to the end of the text rendered through that turn, so it covers
    the answer and the template's end-of-turn marker. Raises ValueError if the template
    does not render a conversation as a prefix of its continuation (spans would be wrong).
    """
    messages = [
        {"role": "user" if turn["from"] == HUMAN_FROM else "assistant", "content": turn["value"]}
        for turn in conversations
    ]
    spans: list[tuple[int, int]] = []
    text = ""  # rendered through the last assistant turn so far
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(
            messages[:index], tokenize=False, add_generation_prompt=True
        )
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (through.startswith(prompt) and prompt.startswith(text)):
            raise ValueError(
                f"the tokenizer's chat template does not render turn {index} as a continuation "
                "of the turns before it; answer-only labels cannot be placed"
            )
        spans.append((len(prompt), len(through)))
        text = through
    return text, spans


def with_image_placeholder(text: str) -> str:
    """`text` with `<image>\\n` in front unless it already holds `<image>` (LLaVA's eval prompt)."""
    return text if IMAGE_TOKEN in text else f"{IMAGE_TOKEN}\n{text}"


def without_image_placeholder(text: str) -> str:
    """`text` with every `<image>` removed and surrounding whitespace stripped (a text-only
    question: the official ScienceQA evaluation does `text.replace('<image>', '').strip()`)."""
    return text.replace(IMAGE_TOKEN, "").strip()


def check_conversation(conversations: Any) -> None:
    """Raise ValueError naming the problem unless `conversations` alternates human/gpt turns.

    It must be a non-empty list of `{"from": "human"|"gpt", "value": str}` starting with a
    human turn, alternating, and ending with a gpt turn (every question has an answer).
    """
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("'conversations' must be a non-empty list of turns")
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"turn {index} must be a dict with 'from' and 'value'")
        if not isinstance(turn["value"], str):
            raise ValueError(
                f"turn {index} 'value' must be a string, got {type(turn['value']).__name__}"
            )
        expected = HUMAN_FROM if index % 2 == 0 else GPT_FROM
        if turn["from"] != expected:
            raise ValueError(f"turn {index} is from {turn['from']!r}, expected {expected!r}")
    if len(conversations) % 2:
        raise ValueError("the last turn must be a 'gpt' answer")


def render_conversation(
    conversations: Sequence[dict[str, str]], eos_token: str
) -> tuple[str, list[tuple[int, int]]]:
    """Render the vicuna_v1 text and the character spans [start, end) that carry the loss.

    Each span covers " {answer}{eos_token}" of one assistant turn. No validation: call
    `check_conversation` first.
    """
    parts = [SYSTEM_PROMPT, " "]
    length = len(SYSTEM_PROMPT) + 1
    spans: list[tuple[int, int]] = []
    for turn in conversations:
        if turn["from"] == HUMAN_FROM:
            piece = f"{USER_ROLE}: {turn['value']} "
            parts.append(piece)
            length += len(piece)
        else:
            head = f"{ASSISTANT_ROLE}:"
            answer = f" {turn['value']}{eos_token}"
            parts.extend((head, answer))
            start = length + len(head)
            length = start + len(answer)
            spans.append((start, length))
    return "".join(parts), spans


def render_for(
    conversations: Sequence[dict[str, str]], tokenizer: Any
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and answer spans: `tokenizer`'s chat template, else vicuna_v1."""
    if has_chat_template(tokenizer):
        return render_chat_template(conversations, tokenizer)
    return render_conversation(conversations, tokenizer.eos_token)


def add_bos(tokenizer: Any) -> bool:
    """Whether to let the tokenizer add its special tokens (bos): vicuna_v1 text needs the
    bos in front; a chat template writes every special token it wants itself."""
    return not has_chat_template(tokenizer)


def labels_from_offsets(
    input_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[tuple[int, int]],
    *,
    placeholder_id: int,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int,
) -> TokenizedConversation:
    """Label tokens whose first character lies in an answer span; expand `<image>`; truncate.

    `offsets` are the tokenizer's character offsets of `input_ids` in the rendered text;
    tokens the tokenizer added (bos) have empty offsets and get no label. The sequence is cut
    to `max_length` tokens from the right after image expansion.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = bounds[:, 0], bounds[:, 1]
    span_array = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    # Index of the last span starting at or before each token's first character.
    which = np.searchsorted(span_array[:, 0], starts, side="right") - 1
    in_answer = (which >= 0) & (ends > starts)
    in_answer &= starts < span_array[np.clip(which, 0, None), 1] if len(span_array) else False
    labels = np.where(in_answer, ids, IGNORE_INDEX)
    is_image = ids == placeholder_id
    if is_image.any():
        repeats = np.where(is_image, num_image_tokens, 1)
        ids = np.repeat(np.where(is_image, image_token_id, ids), repeats)
        labels = np.repeat(np.where(is_image, IGNORE_INDEX, labels), repeats)
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return TokenizedConversation(
        input_ids=ids.tolist(), labels=labels.tolist(), truncated=truncated
    )


def tokenize_conversation(
    conversations: Sequence[dict[str, str]],
    tokenizer: Any,
    *,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int,
) -> TokenizedConversation:
    """Tokenise one conversation (vicuna_v1, or the tokenizer's own chat template); loss
    only on the answers.

    `tokenizer` is a fast HF tokenizer that knows `<image>` as a single token (offsets are
    needed to place the labels); `image_token_id` is the model's image token id and
    `num_image_tokens` the number of image features per image. Raises ValueError for a
    malformed conversation or a tokenizer without `<image>`.
    """
    check_conversation(list(conversations))
    placeholder_id = image_placeholder_id(tokenizer)
    text, spans = render_for(conversations, tokenizer)
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_bos(tokenizer))
    return labels_from_offsets(
        encoding["input_ids"],
        encoding["offset_mapping"],
        spans,
        placeholder_id=placeholder_id,
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
        max_length=max_length,
    )


def image_placeholder_id(tokenizer: Any) -> int:
    """The tokenizer's id of `<image>`; ValueError if it is not a single known token."""
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ValueError(
            f"the tokenizer has no {IMAGE_TOKEN!r} token; add it as a special token first"
        )
    return int(ids[0])
