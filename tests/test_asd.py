"""Tests of ASD: shares, untouched records, MCQ/yes-no/grounding rules, explanations, parsing."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from sefe_fast.asd import AsdError, Rewriter, convert_file, convert_records, parse_explanation
from sefe_fast.asd.__main__ import main
from sefe_fast.asd.formats import has_format, is_box
from sefe_fast.data.coin import read_json_records
from sefe_fast.data.minicoin import generate_minicoin
from sefe_fast.tasks import ANSWER_FORMATS, MCQ_SUFFIX, SHORT_SUFFIX


@pytest.fixture(scope="module")
def minicoin(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("asd") / "mc"
    return generate_minicoin(out, seed=0, n_train=80, n_test=1, n_stage0=1, progress=False)


def _records(root: Path, task: str) -> list[dict]:
    return read_json_records(root / task / "train.json")


def _options(question: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-J])\. (.+)$", question, re.MULTILINE))


def _iou(a: str, b: str) -> float:
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = (
        [float(v) for v in box.strip("[]").split(",")] for box in (a, b)
    )
    ix, iy = max(0, min(ax2, bx2) - max(ax1, bx1)), max(0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - ix * iy
    return ix * iy / union


@pytest.mark.parametrize("task", ["ScienceQA", "GQA", "Grounding", "VizWiz"])
def test_shares_untouched_records_and_formats(minicoin: Path, task: str) -> None:
    records = _records(minicoin, task)
    out, stats = convert_records(records, ratio=0.5, seed=0)
    assert len(out) == len(records) and stats.n_converted == 40
    counts = Counter(r["asd_format"] for r in out if "asd_format" in r)
    own = "mcq" if task == "ScienceQA" else "short"
    assert set(counts) == set(ANSWER_FORMATS) - {own}
    assert max(counts.values()) - min(counts.values()) <= 1
    for before, after in zip(records, out):
        if "asd_format" not in after:
            assert after == before  # copied unchanged
            continue
        assert after["id"] == before["id"] and after["image"] == before["image"]
        question, answer = (turn["value"] for turn in after["conversations"])
        assert question.startswith("<image>\n")
        assert has_format(after["asd_format"], answer), (after["asd_format"], answer)
        truth = before["asd"]["answer"]
        if after["asd_format"] == "mcq":
            options = _options(question)
            assert options[answer] == truth and question.endswith(MCQ_SUFFIX)
            assert len(set(options.values())) == len(options) >= 2
            if task == "Grounding":
                assert all(is_box(o) for o in options.values())
                assert all(_iou(o, truth) <= 0.5 for k, o in options.items() if k != answer)
        elif after["asd_format"] == "yes_no":
            candidate = re.search(r'Is the answer "(.+)"\?|Is (\[.+\]) the bounding', question)
            candidate = candidate.group(1) or candidate.group(2)
            assert (candidate == truth) == (answer == "Yes")
        elif after["asd_format"] == "short":
            assert answer == truth and question.endswith(SHORT_SUFFIX)
            assert "A. " not in question  # options dropped
        else:
            assert after["asd_explanation_source"] == "scene"
            assert answer == before["asd"][after["asd_format"]]


def test_yes_no_balance_determinism_and_seed(minicoin: Path) -> None:
    records = _records(minicoin, "GQA")
    out, stats = convert_records(records, ratio=1.0, seed=3)
    assert stats.n_converted == len(records)
    answers = Counter(
        r["conversations"][1]["value"] for r in out if r.get("asd_format") == "yes_no"
    )
    assert abs(answers["Yes"] - answers["No"]) <= 1 and answers["Yes"] + answers["No"] == 20
    assert (stats.n_yes, stats.n_no) == (answers["Yes"], answers["No"])
    again, _ = convert_records(records, ratio=1.0, seed=3)
    assert json.dumps(again) == json.dumps(out)
    other, _ = convert_records(records, ratio=1.0, seed=4)
    assert json.dumps(other) != json.dumps(out)
    untouched, stats0 = convert_records(records, ratio=0.0, seed=3)
    assert untouched == records and stats0.n_converted == 0


def _coin_like() -> list[dict]:
    """CoIN-style records without scene facts: an MCQ task and a short-answer task."""
    mcq = [
        {
            "id": f"q{i}",
            "image": f"img/{i}.png",
            "conversations": [
                {
                    "from": "human",
                    "value": f"<image>\nContext: a test.\nWhich one is item {i}?\nA. apple {i}\n"
                    f"B. pear {i}\nC. plum {i}\n{MCQ_SUFFIX}",
                },
                {"from": "gpt", "value": "ABC"[i % 3]},
            ],
        }
        for i in range(12)
    ]
    short = [
        {
            "id": f"s{i}",
            "image": f"img/s{i}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\nWhat is shown?\n{SHORT_SUFFIX}"},
                {"from": "gpt", "value": ["dog", "cat", "bus", "tree"][i % 4]},
            ],
        }
        for i in range(12)
    ]
    return mcq + short


def test_coin_records_use_rules_and_templates() -> None:
    records = _coin_like()
    out, stats = convert_records(records, ratio=1.0, seed=0)
    assert stats.n_converted == 24 and stats.explanation_sources == {"template": 12}
    for before, after in zip(records, out):
        fmt, answer = after["asd_format"], after["conversations"][1]["value"]
        assert has_format(fmt, answer)
        original = before["conversations"][1]["value"]
        if before["id"].startswith("q"):
            truth = _options(before["conversations"][0]["value"])[original]
            assert fmt != "mcq"
            if fmt == "short":
                assert answer == truth  # MCQ → short gives the option text
        else:
            truth = original
            assert fmt != "short"
            if fmt == "mcq":
                assert _options(after["conversations"][0]["value"])[answer] == truth
        if fmt in ("brief", "detailed"):
            assert after["asd_explanation_source"] == "template" and truth in answer
            assert len(answer.split()) >= (10 if fmt == "brief" else 30)
            assert "Context: a test." in after["conversations"][0]["value"] or before[
                "id"
            ].startswith("s")


def test_unusable_records_are_named() -> None:
    bad = {"id": "x7", "image": "a.png", "conversations": [{"from": "human", "value": "Hi?"}]}
    with pytest.raises(AsdError, match=r"record 'x7' \(index 0\)"):
        convert_records([bad], ratio=1.0, seed=0)
    unknown = {
        "id": "u1",
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "dog"}],
    }  # fmt: skip
    with pytest.raises(AsdError, match=r"record 'u1'.*own answer format"):
        convert_records([unknown], ratio=1.0, seed=0)
    other = {
        **unknown,
        "id": "u2",
        "conversations": [unknown["conversations"][0], {"from": "gpt", "value": "cat"}],
    }
    _out, stats = convert_records([unknown, other], ratio=1.0, seed=0, task="VQAv2")
    assert stats.n_converted == 2
    letters = {**unknown, "conversations": [{"from": "human", "value": f"<image>\nQ?\nA. x\nB. y\n{MCQ_SUFFIX}"}, {"from": "gpt", "value": "D"}]}  # fmt: skip
    with pytest.raises(AsdError, match="not one of the options"):
        convert_records([letters], ratio=1.0, seed=0)
    with pytest.raises(ValueError, match="ratio"):
        convert_records([], ratio=1.5, seed=0)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"explanation": "A red  circle."}', "A red circle."),
        ('```json\n{"explanation": "fenced"}\n```\nanything', "fenced"),
        ('Sure! {"explanation": "x y"} Hope it helps {', "x y"),
        ("{'explanation': 'single quoted'}", "single quoted"),
        ('{"note": 1} then {"explanation": "second"}', "second"),
        ('explanation: "bare pair", more', "bare pair"),
        ('{"explanation": "has \\"quote\\" in"}', 'has "quote" in'),
        ('{"explanation": ""}', None),
        ('{"explanation": "never closed', None),
        ("no json at all", None),
    ],
)
def test_parse_explanation(reply: str, expected: str | None) -> None:
    assert parse_explanation(reply) == expected


def _tiny_causal_lm(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sefe_fast.data.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_rewriter_fallback_is_counted_and_good_replies_used(tmp_path: Path, monkeypatch) -> None:
    _tiny_causal_lm(tmp_path / "lm")
    rewriter = Rewriter(tmp_path / "lm", max_new_tokens=24)
    records = _coin_like()[12:]
    out, stats = convert_records(records, ratio=1.0, seed=0, rewriter=rewriter)
    explained = [r for r in out if r["asd_format"] in ("brief", "detailed")]
    assert explained and stats.n_rewriter_fallbacks == len(explained)  # random model: fallback
    assert {r["asd_explanation_source"] for r in explained} == {"template"}

    def good_reply(self, prompt: str) -> str:
        answer = re.search(r"Correct answer: (.+)", prompt).group(1)
        words = 20 if "about 20 words" in prompt else 50
        text = " ".join([f"The answer is {answer}."] + ["word"] * (words - 4))
        return f"```json\n{json.dumps({'explanation': text})}\n```"

    monkeypatch.setattr(Rewriter, "generate", good_reply)
    out, stats = convert_records(records, ratio=1.0, seed=0, rewriter=rewriter)
    explained = [r for r in out if r["asd_format"] in ("brief", "detailed")]
    assert stats.n_rewriter_fallbacks == 0
    assert {r["asd_explanation_source"] for r in explained} == {"rewriter"}
    assert all(has_format(r["asd_format"], r["conversations"][1]["value"]) for r in explained)


def test_cli_and_convert_file(tmp_path: Path, minicoin: Path) -> None:
    source = minicoin / "VQAv2" / "train.json"
    target = tmp_path / "train_x20.json"
    assert main(["--input", str(source), "--output", str(target), "--ratio", "0.2"]) == 0
    converted = json.loads(target.read_text())
    assert len(converted) == 80 and sum("asd_format" in r for r in converted) == 16
    stats = convert_file(source, tmp_path / "again.json", ratio=0.2, seed=0)
    assert (tmp_path / "again.json").read_bytes() == target.read_bytes()
    assert stats.n_converted == 16
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "b1", "image": "x", "conversations": []}]))
    assert main(["--input", str(bad), "--output", str(tmp_path / "o.json")]) == 2
