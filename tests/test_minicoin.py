"""Tests of the mini-CoIN generator: layout, determinism, well-formed answers, semantics."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sefe_fast.asd.formats import has_format, has_response_kind
from sefe_fast.data.coin import read_json_records
from sefe_fast.data.coin_test_records import load_test_records
from sefe_fast.data.minicoin import (
    DEFAULT_N_TEST,
    DEFAULT_N_TRAIN,
    MINICOIN_IMAGE_SIZE,
    generate_minicoin,
    main,
)
from sefe_fast.data.minicoin_render import BACKGROUND, CELL, COLOURS, GRID
from sefe_fast.data.minicoin_tasks import OPTION_LETTERS, SCIENCEQA_OPTION_SETS
from sefe_fast.tasks import COIN_TASKS, task_spec

SMALL = {"n_train": 40, "n_test": 12, "n_stage0": 30}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate_minicoin(tmp_path_factory.mktemp("mc") / "d", seed=0, progress=False, **SMALL)


def _pixels(root: Path, image: str) -> np.ndarray:
    return np.asarray(Image.open(root / image).convert("RGB"))


def test_layout_and_sizes(data: Path) -> None:
    assert DEFAULT_N_TRAIN >= 200 and DEFAULT_N_TEST >= 50
    assert (data / "manifest.json").is_file()
    assert len(read_json_records(data / "Stage0" / "train.json")) == SMALL["n_stage0"]
    for task in COIN_TASKS:
        train = read_json_records(data / task / "train.json")
        test = read_json_records(data / task / "test.json")
        assert len(train) == SMALL["n_train"] and len(test) == SMALL["n_test"]
        for record in train:
            assert set(record) == {"id", "image", "conversations", "asd"}
            assert record["conversations"][0]["value"].startswith("<image>\n")
            assert Image.open(data / record["image"]).size == (MINICOIN_IMAGE_SIZE,) * 2
        for record in test:
            assert {"question_id", "image", "text", "answer"} <= set(record)
            assert "<image>" not in record["text"]
        assert len({r["id"] for r in train}) == len(train)
        # the one loader reads mini-CoIN test files
        assert len(load_test_records(data / task / "test.json", data)) == len(test)


def test_every_answer_is_well_formed(data: Path) -> None:
    for task in COIN_TASKS:
        kind = task_spec(task).response_kind
        for record in read_json_records(data / task / "train.json"):
            answer = record["conversations"][1]["value"]
            assert has_response_kind(kind, answer), (task, answer)
            asd = record["asd"]
            assert has_format("brief", asd["brief"]) and has_format("detailed", asd["detailed"])
            assert 12 <= len(asd["brief"].split()) <= 35 and len(asd["detailed"].split()) >= 40
            assert asd["answer"] not in asd["answer_pool"] and asd["answer_pool"]
            assert asd["answer"] in asd["brief"] and asd["answer"] in asd["detailed"]
        for record in read_json_records(data / task / "test.json"):
            assert has_response_kind(kind, record["answer"]), (task, record["answer"])
            if task == "Grounding":
                assert record["answer_bbox"] == record["answer"]
                assert record["size"] == [MINICOIN_IMAGE_SIZE, MINICOIN_IMAGE_SIZE]


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path, data: Path) -> None:
    again = generate_minicoin(tmp_path / "again", seed=0, progress=False, **SMALL)
    assert _hashes(again) == _hashes(data)
    other = generate_minicoin(tmp_path / "other", seed=1, progress=False, **SMALL)
    differs = [
        task
        for task in (*COIN_TASKS, "Stage0")
        if (other / task / "train.json").read_bytes() != (data / task / "train.json").read_bytes()
    ]
    assert len(differs) == len(COIN_TASKS) + 1


def test_rerun_reuses_and_incomplete_set_is_redone(tmp_path: Path) -> None:
    out = generate_minicoin(tmp_path / "d", seed=3, progress=False, n_train=3, n_test=2, n_stage0=2)
    train = out / "GQA" / "train.json"
    stamp = train.stat().st_mtime_ns
    assert (
        main(
            ["--out", str(out), "--seed", "3", "--n-train", "3", "--n-test", "2", "--n-stage0", "2"]
        )
        == 0
    )
    assert train.stat().st_mtime_ns == stamp  # reused, not rewritten
    train.write_text("[]")  # a damaged set is regenerated
    generate_minicoin(out, seed=3, progress=False, n_train=3, n_test=2, n_stage0=2)
    assert len(json.loads(train.read_text())) == 3
    generate_minicoin(out, seed=3, progress=False, n_train=4, n_test=2, n_stage0=2)
    assert len(json.loads(train.read_text())) == 4  # other parameters → new set
    with pytest.raises(ValueError, match="n_train"):
        generate_minicoin(tmp_path / "e", n_train=0)


def _cells_with(pixels: np.ndarray, colour: tuple[int, int, int]) -> set[tuple[int, int]]:
    match = (pixels == colour).all(-1)
    return {(r, c) for r in range(GRID) for c in range(GRID) if match[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL].any()}  # fmt: skip


def test_answers_match_the_pictures(data: Path) -> None:
    """Spot checks that the gold answers are read off the rendered pixels."""
    for record in read_json_records(data / "ScienceQA" / "train.json"):
        question, letter = (turn["value"] for turn in record["conversations"])
        options = dict(re.findall(r"^([A-D])\. (\w+)$", question, re.MULTILINE))
        assert letter in OPTION_LETTERS and options[letter] == record["asd"]["answer"]
        # v2: the shown icon's fixed option set, always in the same order
        assert tuple(options.values()) in SCIENCEQA_OPTION_SETS
    for record in read_json_records(data / "Grounding" / "test.json"):
        x1, y1, x2, y2 = (float(v) for v in record["answer_bbox"].strip("[]").split(","))
        pixels = _pixels(data, record["image"])
        s = MINICOIN_IMAGE_SIZE
        inside = pixels[round(y1 * s) : round(y2 * s), round(x1 * s) : round(x2 * s)]
        words = record["text"].split("\n")[0].rstrip(".").split()
        assert (inside != BACKGROUND).any(-1).mean() > 0.15
        if words[1] in COLOURS:
            assert (inside == COLOURS[words[1]]).all(-1).mean() > 0.15
    for record in read_json_records(data / "VizWiz" / "test.json"):
        pixels = _pixels(data, record["image"])
        if record["answer"] == "Unanswerable":
            assert len(np.unique(pixels.reshape(-1, 3), axis=0)) == 1
        else:
            assert (pixels == COLOURS[record["answer"]]).all(-1).sum() > 20
    for record in read_json_records(data / "VQAv2" / "test.json"):
        if record["text"].startswith("How many shapes"):
            pixels = _pixels(data, record["image"])
            occupied = {cell for colour in COLOURS.values() for cell in _cells_with(pixels, colour)}
            assert len(occupied) == int(record["answer"])


def test_gqa_answers_are_read_off_the_one_shape(data: Path) -> None:
    kinds = set()
    for record in read_json_records(data / "GQA" / "test.json"):
        pixels = _pixels(data, record["image"])
        occupied = {cell for colour in COLOURS.values() for cell in _cells_with(pixels, colour)}
        rows, cols = {r for r, _ in occupied}, {c for _, c in occupied}
        answer, question = record["answer"], record["text"]
        # one small shape, or one large one inside a 2×2 block
        assert occupied and max(rows) - min(rows) <= 1 and max(cols) - min(cols) <= 1, record
        if answer in COLOURS:
            assert _cells_with(pixels, COLOURS[answer]) == occupied
        elif answer in ("small", "large"):
            assert (len(occupied) == 1) == (answer == "small")
        kinds.add(question.split()[1])  # "color", "shape" or "the"
    assert len(kinds) == 3


def test_stage0_data_is_pinned(data: Path) -> None:
    """The shipped tiny model was trained on this Stage0/train.json: changing a task generator
    must not change it (else bump STAGE0_VERSION and rebuild the asset; see tiny.py)."""
    digest = hashlib.sha256((data / "Stage0" / "train.json").read_bytes()).hexdigest()
    assert digest == "0d8e89f97a4fe9d6e0867222fc94c39e9e30c4a8b3a699b06b671f7d8093203f"
