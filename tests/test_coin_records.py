"""Real CoIN records: text-only ScienceQA, decoding length, TextVQA's human answers, the MCQ line.

Each test's docstring states the official rule it pins (SEFE's `llava/eval/CoIN/*` and
CoIN's LLaVA loader), in this project's words.
"""

import json

import pytest
import torch
from coin_fixture import textvqa_human_answers, write_coin_fixture
from tiny_hf_llava import write_tiny_llava

from sefe_fast.data.coin import CoinDataError, collate_train, load_train_dataset
from sefe_fast.data.coin_test_records import load_test_records
from sefe_fast.data.textvqa import (
    TEXTVQA_ANNOTATION_FILE,
    attach_human_answers,
    find_textvqa_annotations,
    load_textvqa_answers,
)
from sefe_fast.generate import encode_prompt, greedy_generate, vision_anchor
from sefe_fast.model.build import load_llava
from sefe_fast.tasks import (
    COIN_TASKS,
    MCQ_SUFFIX,
    OFFICIAL_MAX_NEW_TOKENS,
    decode_length,
    evaluation_question,
    task_spec,
)
from sefe_fast.train.cli import parse_config


@pytest.fixture(scope="module")
def coin(tmp_path_factory):
    root = tmp_path_factory.mktemp("coin")
    counts = write_coin_fixture(root / "data")
    return root / "data", counts


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return load_llava(write_tiny_llava(tmp_path_factory.mktemp("llava")))


def _load_sqa_train(coin, llava):
    data, _ = coin
    return load_train_dataset(
        data / "ScienceQA" / "train.json",
        data,
        llava.tokenizer,
        llava.image_processor,
        image_token_id=llava.image_token_id,
        num_image_tokens=llava.num_image_tokens,
        max_length=2048,
    )


# ---------------------------------------------------------------- 1. text-only records


def test_text_only_train_records_are_kept_without_image_tokens(coin, llava):
    """Official rule (CoIN's LLaVA loader): a ScienceQA record without an image is kept and
    trained; its prompt holds no image tokens ("image" absent; null is read the same way)."""
    dataset, stats = _load_sqa_train(coin, llava)
    assert stats.n_kept == stats.n_records == 4 and stats.n_bad_skipped == 0
    items = [dataset[i] for i in range(len(dataset))]
    has_image = [item["pixel_values"] is not None for item in items]
    assert has_image == [True, False, False, True]
    for item, image in zip(items, has_image):
        n_image_tokens = int((item["input_ids"] == llava.image_token_id).sum())
        assert n_image_tokens == (llava.num_image_tokens if image else 0)
        assert (item["labels"] != -100).any()


def test_mixed_batch_gives_each_row_what_it_gives_alone(coin, llava):
    """A batch mixing image and text-only samples passes only the images present; every
    row's logits equal the same sample's logits run alone (the LLaVA forward puts image i's
    features at the i-th run of image tokens)."""
    dataset, _ = _load_sqa_train(coin, llava)
    items = [dataset[i] for i in range(len(dataset))]
    pad = llava.tokenizer.pad_token_id
    batch = collate_train(items, pad)
    assert batch["pixel_values"].shape[0] == 2  # two of the four have an image
    model = llava.model.eval()
    with torch.no_grad():
        together = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for row, item in enumerate(items):
            alone_batch = collate_train([item], pad)
            alone = model(**{k: v for k, v in alone_batch.items() if k != "labels"}).logits[0]
            length = item["input_ids"].numel()
            torch.testing.assert_close(together[row, :length], alone, rtol=1e-4, atol=1e-5)
    text_only = collate_train([items[1], items[2]], pad)
    assert text_only["pixel_values"] is None


def test_vision_anchor_is_zero_and_reaches_the_projector(llava):
    """A text-only batch under DDP/FSDP adds 0 x (features of a blank image), so the
    projector still gets a (zero) gradient and the vision tower runs as on other ranks."""
    model = llava.model
    proj = model.model.multi_modal_projector.linear_1.weight
    proj.requires_grad_(True)
    try:
        anchor = vision_anchor(model, "cpu")
        assert anchor.item() == 0.0
        anchor.backward()
        assert proj.grad is not None and torch.count_nonzero(proj.grad) == 0
    finally:
        proj.requires_grad_(False)
        proj.grad = None


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {
                "id": "t",
                "conversations": [
                    {"from": "human", "value": "<image>\nQ"},
                    {"from": "gpt", "value": "A"},
                ],
            },
            "text-only record",
        ),
        (
            {
                "id": "e",
                "image": "",
                "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
            },
            "'image'",
        ),
    ],
)
def test_bad_text_only_records_are_named(tmp_path, llava, record, message):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(CoinDataError, match=message):
        load_train_dataset(
            path,
            tmp_path,
            llava.tokenizer,
            llava.image_processor,
            image_token_id=llava.image_token_id,
            num_image_tokens=16,
            max_length=256,
        )


def test_text_only_test_records_and_prompts(coin, llava):
    """Official rule (SEFE's model_science_qa.py): the question is the test text with any
    `<image>` removed and stripped; `<image>\\n` goes in front only when the record has an
    image; a text-only question gets no image and no image tokens. All are scored."""
    data, counts = coin
    records = load_test_records(data / "ScienceQA" / "test.json", data)
    assert len(records) == counts["ScienceQA"] == 4
    assert [r.image is None for r in records] == [False, True, False, True]
    kwargs = dict(image_token_id=llava.image_token_id, num_image_tokens=llava.num_image_tokens)
    with_image = encode_prompt(records[2].text, llava.tokenizer, **kwargs)
    without = encode_prompt(records[1].text, llava.tokenizer, has_image=False, **kwargs)
    assert with_image.count(llava.image_token_id) == llava.num_image_tokens  # not doubled
    assert without.count(llava.image_token_id) == 0
    stray = encode_prompt("<image>\nWhat?", llava.tokenizer, has_image=False, **kwargs)
    assert stray == encode_prompt("What?", llava.tokenizer, has_image=False, **kwargs)


def test_generation_mixes_text_only_and_image_prompts(llava):
    """Batched greedy decoding of image and text-only prompts gives each prompt what it
    gives alone."""
    kwargs = dict(image_token_id=llava.image_token_id, num_image_tokens=llava.num_image_tokens)
    prompts = [
        encode_prompt("Is it red?", llava.tokenizer, **kwargs),
        encode_prompt("What is 2 + 2?", llava.tokenizer, has_image=False, **kwargs),
        encode_prompt("Name it.", llava.tokenizer, **kwargs),
    ]
    torch.manual_seed(1)
    pixels = [torch.randn(3, 32, 32), None, torch.randn(3, 32, 32)]
    common = dict(
        max_new_tokens=5,
        eos_token_id=llava.tokenizer.eos_token_id,
        pad_token_id=llava.tokenizer.pad_token_id,
        banned_token_ids=[llava.image_token_id],
    )
    together = greedy_generate(llava.model, prompts, pixels, batch_size=3, **common)
    alone = [
        greedy_generate(llava.model, [p], [x], batch_size=1, **common)[0]
        for p, x in zip(prompts, pixels)
    ]
    assert together == alone
    assert all(len(out) == 5 for out in together)  # a random model never stops early


# ---------------------------------------------------------------- 2. decoding length


def test_decode_length_is_a_run_setting():
    """Official rule (SEFE's model_science_qa.py / model_others.py): greedy decoding of up
    to 1024 new tokens, stopping at end of sequence. A run's max_new_tokens sets it; None
    or 0 falls back to the task's own cap (the tiny presets' choice)."""
    assert OFFICIAL_MAX_NEW_TOKENS == 1024
    for task in COIN_TASKS:
        assert decode_length(task, None) == decode_length(task, 0) == task_spec(task).max_new_tokens
        assert decode_length(task, 1024) == 1024
    with pytest.raises(ValueError, match=">= 0"):
        decode_length("GQA", -1)


def test_presets_and_flag_set_the_decoding_length():
    paper = ["coin", "--preset", "paper", "--model", "m", "--data", "d"]
    assert parse_config(paper).max_new_tokens == 1024
    assert parse_config(["coin"]).max_new_tokens is None  # default: the task caps, unchanged
    assert parse_config([*paper, "--max-new-tokens", "7"]).max_new_tokens == 7
    assert parse_config(["coin", "--max-new-tokens", "0"]).max_new_tokens == 0
    with pytest.raises(SystemExit):
        parse_config(["coin", "--max-new-tokens", "-3"])


# ---------------------------------------------------------------- 3. TextVQA's ten answers


def test_textvqa_is_scored_against_the_ten_human_answers(coin):
    """Official rule (SEFE's eval_textvqa.py): each prediction is scored against the ten
    `answers` of TextVQA_0.5.1_val.json's `data` entry with the same question_id (compared
    as strings), with VQA soft accuracy; the test file's own answer is not used."""
    data, _ = coin
    source = find_textvqa_annotations(data, data)
    assert source == data / "TextVQA" / TEXTVQA_ANNOTATION_FILE
    records = load_test_records(data / "TextVQA" / "test.json", data)
    attach_human_answers(records, load_textvqa_answers(source), source)
    for n, record in enumerate(records):
        assert record.answer == textvqa_human_answers(record.extra["coin_answer"], n)
        assert record.gold == record.answer and len(record.answer) == 10


def test_textvqa_annotation_file_lookup_and_errors(tmp_path, coin):
    data, _ = coin
    images = tmp_path / "images"
    (images / "TextVQA").mkdir(parents=True)
    target = images / "TextVQA" / TEXTVQA_ANNOTATION_FILE
    target.write_text((data / "TextVQA" / TEXTVQA_ANNOTATION_FILE).read_text())
    # CoIN's layout: in the TextVQA image folder under the image root.
    assert find_textvqa_annotations(tmp_path / "nodata", images) == target
    assert find_textvqa_annotations(tmp_path, tmp_path, given=target) == target
    with pytest.raises(FileNotFoundError, match=r"nodata/TextVQA/TextVQA_0\.5\.1_val\.json"):
        find_textvqa_annotations(tmp_path / "nodata", tmp_path / "noimages")
    with pytest.raises(FileNotFoundError, match="--textvqa-annotations"):
        find_textvqa_annotations(tmp_path, tmp_path, given=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"question_id": 5, "answers": ["a"] * 9}]}))
    with pytest.raises(ValueError, match=r"question_id 5.*10 strings"):
        load_textvqa_answers(bad)
    records = load_test_records(data / "TextVQA" / "test.json", data)
    with pytest.raises(ValueError, match=r"bad\.json: no human answers for 3"):
        attach_human_answers(records, {}, bad)


# ---------------------------------------------------------------- 4. the MCQ line


def test_scienceqa_test_prompt_gets_the_mcq_line():
    """Official rule (SEFE's scripts/Eval/1_ScienceQA.sh runs model_science_qa.py with
    --single-pred-prompt): after removing `<image>` and stripping, the question gets
    "\\n" + "Answer with the option's letter from the given choices directly." — for
    text-only and image questions alike; no other task's question changes."""
    text = "Question: Which is a noun?\nOptions: (A) run (B) table"
    assert evaluation_question("ScienceQA", text) == f"{text}\n{MCQ_SUFFIX}"
    assert evaluation_question("ScienceQA", f"<image>\n{text}\n") == f"{text}\n{MCQ_SUFFIX}"
    # mini-CoIN's questions already end with the line: kept once (documented departure).
    assert evaluation_question("ScienceQA", f"{text}\n{MCQ_SUFFIX}") == f"{text}\n{MCQ_SUFFIX}"
    assert evaluation_question("GQA", "What color?") == "What color?"


def test_minicoin_prompts_are_unchanged(tmp_path):
    """The default run's prompts stay those its results were measured with: mini-CoIN's
    ScienceQA questions already end with the MCQ line, so nothing is appended."""
    from sefe_fast.data.minicoin import generate_minicoin

    data = generate_minicoin(tmp_path, seed=0, n_train=1, n_test=12, n_stage0=1, progress=False)
    for task in COIN_TASKS:
        for record in json.loads((data / task / "test.json").read_text()):
            assert evaluation_question(task, record["text"]) == record["text"]
