"""Tests of the CoIN loader: tokenizer, template and label masking, images, records, stats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor

from sefe_fast.data.char_tokenizer import IMAGE_TOKEN, build_char_tokenizer
from sefe_fast.data.coin import CoinDataError, collate_train, load_train_dataset
from sefe_fast.data.coin_test_records import load_test_records
from sefe_fast.data.conversation import (
    SYSTEM_PROMPT,
    build_generation_prompt,
    tokenize_conversation,
)
from sefe_fast.data.images import expand_to_square, image_to_pixel_values

N_IMG = 16


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def processor():
    return CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    )


def _image_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _conv(*turns: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


def _labelled_runs(labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive labelled (≠ -100) tokens."""
    runs, current = [], []
    for label in labels:
        if label != -100:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def test_char_tokenizer_ids_and_round_trip(tmp_path: Path, tokenizer) -> None:
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<unk>")] == [
        0,
        1,
        2,
        3,
    ]
    assert tokenizer.pad_token_id == 0 and tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == 2 and _image_id(tokenizer) == 4
    text = "Hi <image>\nA red [0.25, 0.50]!"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 1 and ids.count(4) == 1
    assert len(ids) == 1 + len(text) - len(IMAGE_TOKEN) + 1  # bos + chars, <image> one token
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert build_char_tokenizer().get_vocab() == tokenizer.get_vocab()
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert again.decode(ids[1:]) == text


def test_labels_exactly_on_answer_tokens_and_image_expansion(tokenizer) -> None:
    out = tokenize_conversation(
        _conv("<image>\nWhat colour?", "red"),
        tokenizer,
        image_token_id=200,
        num_image_tokens=N_IMG,
        max_length=1024,
    )
    assert not out.truncated and len(out.input_ids) == len(out.labels)
    assert out.input_ids.count(200) == N_IMG
    assert _image_id(tokenizer) not in out.input_ids
    runs = _labelled_runs(out.labels)
    assert [tokenizer.decode(r) for r in runs] == [" red</s>"]
    # The labelled tokens are the last 5 tokens and equal the input ids there.
    assert out.labels[-5:] == out.input_ids[-5:] and all(x == -100 for x in out.labels[:-5])
    text = tokenizer.decode([i for i in out.input_ids if i != 200])
    assert text == f"<s>{SYSTEM_PROMPT} USER: \nWhat colour? ASSISTANT: red</s>"
    prompt = build_generation_prompt("<image>\nWhat colour?")
    assert text.startswith("<s>" + prompt.replace(IMAGE_TOKEN, ""))


def test_multi_turn(tokenizer) -> None:
    out = tokenize_conversation(
        _conv("<image>\nQ1?", "one", "Q2?", "two words"),
        tokenizer,
        image_token_id=_image_id(tokenizer),
        num_image_tokens=N_IMG,
        max_length=1024,
    )
    runs = _labelled_runs(out.labels)
    assert [tokenizer.decode(r) for r in runs] == [" one</s>", " two words</s>"]
    text = tokenizer.decode([i for i in out.input_ids if i != _image_id(tokenizer)])
    assert text.endswith("USER: \nQ1? ASSISTANT: one</s>USER: Q2? ASSISTANT: two words</s>")
    assert out.input_ids.count(_image_id(tokenizer)) == N_IMG


def test_truncation_and_bad_conversations(tokenizer) -> None:
    full = tokenize_conversation(
        _conv("<image>\nQ?", "abcdef"), tokenizer, image_token_id=5, num_image_tokens=4,
        max_length=1000,
    )  # fmt: skip
    cut = tokenize_conversation(
        _conv("<image>\nQ?", "abcdef"), tokenizer, image_token_id=5, num_image_tokens=4,
        max_length=len(full.input_ids) - 3,
    )  # fmt: skip
    assert cut.truncated and cut.input_ids == full.input_ids[:-3]
    assert tokenizer.decode([x for x in cut.labels if x != -100]) == " abcd"
    with pytest.raises(ValueError, match="expected 'gpt'"):
        tokenize_conversation(
            _conv("<image>\nQ?", "a")[:1] * 2, tokenizer, image_token_id=5, num_image_tokens=4,
            max_length=100,
        )  # fmt: skip


def test_expand_to_square_pads_with_mean_colour(processor) -> None:
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (200, 10, 30)
    pixels[:, 20:] = (0, 100, 250)
    image = Image.fromarray(pixels)
    square = np.asarray(expand_to_square(image))
    assert square.shape == (40, 40, 3)
    mean = (100, 55, 140)
    assert (square[:10] == mean).all() and (square[30:] == mean).all()
    assert (square[10:30] == pixels).all()  # centred
    tall = np.asarray(expand_to_square(Image.fromarray(pixels.transpose(1, 0, 2).copy())))
    assert tall.shape == (40, 40, 3) and (tall[:, :10] == mean).all()
    # LLaVA-1.5 pads with the processor's mean colour: after normalisation that is ~0.
    values = image_to_pixel_values(image, processor)
    assert values.shape == (3, 32, 32) and values.dtype == torch.float32
    assert values[:, :6].abs().max() < 0.02 and values[:, 10:22].abs().max() > 0.5


def _write_image(path: Path, colour=(255, 0, 0), size=(32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _train_set(root: Path) -> Path:
    _write_image(root / "img" / "ok.png")
    (root / "img" / "broken.png").write_bytes(b"not an image")
    good = [
        {
            "id": f"g{i}",
            "image": "img/ok.png",
            "conversations": _conv("<image>\nQ?", "yes" * (i + 1)),
        }
        for i in range(3)
    ]
    long_question = {
        "id": "long",
        "image": "img/ok.png",
        "conversations": _conv("<image>\n" + "x" * 400, "ans"),
    }
    long_answer = {
        "id": "longans",
        "image": "img/ok.png",
        "conversations": _conv("<image>\nQ?", "a" * 400),
    }
    bad = [
        {"id": "noimg", "image": "img/missing.png", "conversations": _conv("<image>\nQ?", "a")},
        {"id": "broken", "image": "img/broken.png", "conversations": _conv("<image>\nQ?", "a")},
        {"id": "noplaceholder", "image": "img/ok.png", "conversations": _conv("Q?", "a")},
        {"id": "nokey", "image": "img/ok.png"},
        {"id": "badtype", "image": "img/ok.png", "conversations": [*_conv("<image>\nQ?", "a")[:1], {"from": "gpt", "value": 3}]},
        "not a dict",
    ]  # fmt: skip
    path = root / "train.json"
    path.write_text(json.dumps([*good, long_question, long_answer, *bad]))
    return path


def test_load_train_dataset_counts_and_skips(tmp_path: Path, tokenizer, processor) -> None:
    path = _train_set(tmp_path)
    kwargs = dict(image_token_id=_image_id(tokenizer), num_image_tokens=N_IMG, max_length=400)
    with pytest.raises(CoinDataError) as error:
        load_train_dataset(path, tmp_path, tokenizer, processor, **kwargs)
    assert str(path) in str(error.value) and "'noimg'" in str(error.value)
    assert "image file not found" in str(error.value)

    dataset, stats = load_train_dataset(
        path, tmp_path, tokenizer, processor, skip_bad=True, **kwargs
    )
    assert (stats.n_records, stats.n_bad_skipped) == (11, 6)
    assert stats.n_truncated == 2 and stats.n_no_answer_dropped == 1
    assert stats.n_kept == len(dataset) == 4
    reasons = "\n".join(stats.skipped_reasons)
    for ident in (
        "'noimg'",
        "'broken'",
        "'noplaceholder'",
        "'nokey'",
        "'badtype'",
        "index 10",
        "'long'",
    ):
        assert ident in reasons
    assert "unreadable image" in reasons and "missing key 'conversations'" in reasons
    summary = stats.summary()
    assert "4 kept" in summary and "6 bad records skipped" in summary and "2 truncated" in summary

    item = dataset[0]
    assert item["input_ids"].dtype == torch.long and item["pixel_values"].shape == (3, 32, 32)
    assert tokenizer.decode(item["labels"][item["labels"] != -100]) == " yes</s>"
    batch = collate_train([dataset[i] for i in range(4)], tokenizer.pad_token_id)
    lengths = [len(dataset[i]["input_ids"]) for i in range(4)]
    assert batch["input_ids"].shape == (4, max(lengths)) and batch["pixel_values"].shape == (
        4,
        3,
        32,
        32,
    )
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert (batch["labels"][short, min(lengths) :] == -100).all()
    assert (batch["input_ids"][short, min(lengths) :] == tokenizer.pad_token_id).all()
    assert max(lengths) == 400  # the truncated long answer is kept at max_length


def test_tokenisation_cache_and_processes_agree(tmp_path: Path, tokenizer, processor) -> None:
    path = _train_set(tmp_path)
    kwargs = dict(image_token_id=9, num_image_tokens=4, max_length=400, skip_bad=True)
    plain, _ = load_train_dataset(path, tmp_path, tokenizer, processor, **kwargs)
    cached, _ = load_train_dataset(
        path, tmp_path, tokenizer, processor, cache_dir=tmp_path / "c", **kwargs
    )
    again, stats = load_train_dataset(
        path, tmp_path, tokenizer, processor, cache_dir=tmp_path / "c", **kwargs
    )
    assert list((tmp_path / "c").glob("*.arrow"))
    for i in range(len(plain)):
        assert torch.equal(plain[i]["input_ids"], cached[i]["input_ids"])
        assert torch.equal(plain[i]["labels"], again[i]["labels"])
    assert stats.n_kept == len(plain)


def test_load_test_records(tmp_path: Path) -> None:
    _write_image(tmp_path / "a.png")
    records = [
        {"question_id": 1, "image": "a.png", "text": "Q?", "answer": "red"},
        {"question_id": "g", "image": "a.png", "text": "Box?", "answer": "x", "answer_bbox": "[0.00, 0.00, 0.25, 0.25]", "size": [32, 32]},
        {"question_id": "m", "image": "a.png", "text": "Q?", "answer": ["a", "b"]},
        {"question_id": "bad", "image": "a.png", "text": "Q?"},
    ]  # fmt: skip
    path = tmp_path / "test.json"
    path.write_text(json.dumps(records))
    with pytest.raises(
        CoinDataError, match=r"test\.json: record 'bad' \(index 3\): missing key 'answer'"
    ):
        load_test_records(path, tmp_path)
    out = load_test_records(path, tmp_path, skip_bad=True)
    assert [r.question_id for r in out] == ["1", "g", "m"]
    assert out[0].gold == "red" and out[1].gold == "[0.00, 0.00, 0.25, 0.25]"
    assert out[1].extra["size"] == [32, 32] and out[2].gold == ["a", "b"]
    assert out[0].image == tmp_path / "a.png"
