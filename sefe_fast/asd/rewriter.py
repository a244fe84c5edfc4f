"""Explanations from a local Hugging Face model, returned as JSON and parsed robustly.

The SEFE prompts ask an MLLM for `{"explanation": ...}`. Small or untuned models wrap the
JSON in code fences, add text around it, use single quotes or break it; `parse_explanation`
recovers the string in all those cases and returns None when there is none, so that the
caller falls back to a template (and counts the fallback).
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
from typing import Any

TARGET_WORDS = {"brief": 20, "detailed": 50}
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_KEY_VALUE = re.compile(
    r"""["']?explanation["']?\s*:\s*(?P<quote>["'])(?P<value>(?:\\.|(?!(?P=quote)).)*)(?P=quote)""",
    re.DOTALL,
)


def _explanation_from(obj: Any) -> str | None:
    if isinstance(obj, dict):
        value = obj.get("explanation")
        if isinstance(value, str) and value.strip():
            return " ".join(value.split())
    return None


def parse_explanation(text: str) -> str | None:
    """The `explanation` string in a model reply, or None.

    Accepts plain JSON, JSON inside ```json fences, JSON followed or preceded by other text,
    Python-style dicts with single quotes, and as a last resort a bare
    `explanation: "..."` pair. Whitespace in the result is collapsed to single spaces.
    """
    candidates = [match.group(1) for match in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for start in [m.start() for m in re.finditer(r"\{", candidate)]:
            try:
                obj, _ = decoder.raw_decode(candidate, start)
            except json.JSONDecodeError:
                end = candidate.find("}", start)
                while end != -1:
                    try:
                        obj = ast.literal_eval(candidate[start : end + 1])
                        break
                    except (ValueError, SyntaxError, MemoryError, RecursionError):
                        end = candidate.find("}", end + 1)
                else:
                    continue
            found = _explanation_from(obj)
            if found:
                return found
    match = _KEY_VALUE.search(text)
    if match:
        value = match.group("value")
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(f'"{value}"') if match.group("quote") == '"' else value
        value = " ".join(value.split())
        return value or None
    return None


def build_prompt(question: str, answer: str, length: str) -> str:
    """The instruction asking for a ~20-word ("brief") or ~50-word ("detailed") explanation."""
    words = TARGET_WORDS[length]
    return (
        "You are given a question about an image and its correct answer.\n"
        f"Question: {question}\nCorrect answer: {answer}\n"
        f"Write an explanation of about {words} words that justifies the correct answer and "
        "states it explicitly. Reply only with JSON of the form "
        '{"explanation": "..."}.'
    )


class Rewriter:
    """A local causal LM (or a VLM used text-only) that writes explanations; greedy decoding."""

    def __init__(
        self, model_path: str | os.PathLike, *, max_new_tokens: int = 160, device: str = "cpu"
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except (ValueError, KeyError):
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
        self.model = model.to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens

    def _encode(self, prompt: str) -> Any:
        template = getattr(self.tokenizer, "chat_template", None)
        if template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        return self.tokenizer(prompt, return_tensors="pt")

    def generate(self, prompt: str) -> str:
        """The model's greedy reply to `prompt` (decoded new tokens only)."""
        import torch

        inputs = self._encode(prompt).to(self.device)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        with torch.no_grad():
            output = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True)

    def explain(self, question: str, answer: str, length: str) -> str | None:
        """A parsed explanation of `answer` to `question`, or None if the reply had none."""
        return parse_explanation(self.generate(build_prompt(question, answer, length)))
