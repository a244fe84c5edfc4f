"""mini-CoIN: a procedurally generated stand-in for CoIN that a tiny model learns on a CPU.

`python -m sefe_fast.data.minicoin --out DIR [--seed N]` writes, in CoIN's own layout (so
one loader serves both):

    DIR/<Task>/train.json   LLaVA conversations, plus an "asd" field (see below)
    DIR/<Task>/test.json    {question_id, image, text, answer} (+ answer_bbox, size for Grounding)
    DIR/Stage0/train.json   scene captions for stage-0 vision-language alignment
    DIR/images/<Task|Stage0>/<split>_<index>.png
    DIR/manifest.json       parameters and file hashes; written last

for the eight CoIN tasks in CoIN's order (`sefe_fast.tasks.COIN_TASKS`).

Design, for the tiny default model (CLIP vision 2 layers × 64 wide, patch 8; Llama 4 layers
× 128 wide; one token per character). docs/reference.md §7: at 32 px / 16 image tokens such a model
learned colours perfectly but shapes only ~50% after 1500 steps from scratch, so every
choice below makes the pictures as easy to read as possible:

- `MINICOIN_IMAGE_SIZE` = 32 px, a 4×4 grid of 8-px cells = exactly the 16 patches. Each
  thing drawn is aligned to the patches: a shape fills one cell (a "large" one 2×2 cells),
  an icon 2×2 cells, a text glyph one cell. One patch then shows one thing, and its position
  embedding is its position. 32 px rather than 48 keeps sequences short (16 image tokens).
- 6 bold colours with exact RGB values and no noise, on a mid-gray background; 5 shapes;
  8 icons (8×8 bitmaps drawn at 2×); a 5×7 capital-letter font, black on white tiles.
- Answers are short (per-character decoding) and each task has its own small vocabulary:
  ScienceQA option letters (which icon is shown; the four options are the icon's fixed set,
  always in the same order); TextVQA 16 sign words; ImageNet 8 icon names; GQA the colour,
  the shape, or small/large of the one shape in the picture (three question kinds: the
  answer kind follows the question); VizWiz colours, or "Unanswerable" for a dark or
  empty photo (~25%); Grounding the box of the one shape, snapped to the grid, so each
  coordinate is one of 0.00, 0.25, 0.50, 0.75, 1.00; VQAv2 counts 1–4 and yes/no on
  whether a colour is present; OCRVQA two-word book titles (8 × 8) and author names.
  Sharing the icons between ScienceQA (a letter) and ImageNet (a name) is deliberate: it is
  the textbook case of superficial forgetting (the model still knows the object but answers
  in the newest task's style).
- Generator v2 (GENERATOR_VERSION 2) made three tasks learnable by the tiny model and
  simplified a fourth. v1 had shuffled ScienceQA options, GQA relations between 2–4 shapes
  ("the object left of the red circle"), Grounding among 2–4 shapes and VQAv2 counts of one
  colour or kind: each needs the model to find a thing by its description or to match the
  picture to a place in the prompt, and the 4-layer character-level LLM stayed at chance on
  them whatever the step count (RESULTS.md), so plain LoRA's fine-tune accuracy (MFT) was
  ~45 and the benchmark measured capacity more than forgetting. Grounding (one shape now) is
  still not learnt: a box needs where the shape is, and the tiny tower's features keep little
  position (RESULTS.md). The tasks keep CoIN's answer formats (a letter, a box, a word or
  phrase). Stage 0's captions are versioned apart (STAGE0_VERSION): the
  shipped tiny model is trained on them, so a task change does not force a rebuild.
- Stage 0 captions every kind of scene the tasks use (shapes with positions and counts,
  icons, signs, book covers, dark/empty photos) so that alignment teaches each attribute
  the tasks ask about; it never asks a task's questions.
- Sizes: 500 train and 60 test records per task (the brief asks ≥ 200 / ≥ 50; more training
  variety costs nothing, since the trainer chooses its step count, while the test size sets
  the evaluation time after every task: 60 keeps the 36 evaluations of a run short), and
  4000 stage-0 captions.

Each train record carries an "asd" field with what ASD needs to convert it exactly:
`question` (bare, no options/suffix), `answer` (the answer as a short phrase; the option
text for ScienceQA), `answer_pool` (wrong answers of the same kind), `brief` (~20 words)
and `detailed` (~50 words) explanations written from the scene.

Generation is deterministic by seed (same seed → byte-identical JSON and PNG files); each
file is written atomically and the manifest last, so a rerun with the same parameters
reuses a complete set and an interrupted run is redone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sefe_fast.data.minicoin_render import IMAGE_SIZE, png_bytes, render
from sefe_fast.data.minicoin_tasks import (
    STAGE0_PROMPTS,
    TASK_GENERATORS,
    Sample,
    describe_scene,
    stage0_scene,
)
from sefe_fast.io_utils import atomic_write_bytes, atomic_write_json
from sefe_fast.tasks import COIN_TASKS

MINICOIN_IMAGE_SIZE = IMAGE_SIZE  # pixels, square
DEFAULT_N_TRAIN = 500
DEFAULT_N_TEST = 60
DEFAULT_N_STAGE0 = 4000
STAGE0 = "Stage0"
# Bump when the generated data changes for a given seed: GENERATOR_VERSION for the task
# splits, STAGE0_VERSION for Stage0/train.json — the shipped tiny model was trained on that
# (it is part of its fingerprint), so changing it means rebuilding the asset.
GENERATOR_VERSION = 2  # v2: new ScienceQA, GQA, Grounding and VQAv2 (see above)
STAGE0_VERSION = 1
MANIFEST = "manifest.json"


def _rng(seed: int, name: str, split: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
    version = STAGE0_VERSION if name == STAGE0 else GENERATOR_VERSION
    return random.Random(f"minicoin/v{version}/{seed}/{name}/{split}")


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def _train_record(task: str, index: int, image: str, sample: Sample) -> dict[str, Any]:
    return {
        "id": f"{task}_train_{index:05d}",
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{sample.question}"},
            {"from": "gpt", "value": sample.answer},
        ],
        "asd": {
            "question": sample.bare_question,
            "answer": sample.answer_text,
            "answer_pool": sample.answer_pool,
            "brief": sample.brief,
            "detailed": sample.detailed,
            "scene": describe_scene(sample.scene),
        },
    }


def _test_record(task: str, index: int, image: str, sample: Sample) -> dict[str, Any]:
    return {
        "question_id": f"{task}_test_{index:05d}",
        "image": image,
        "text": sample.question,
        "answer": sample.answer,
        **sample.test_extra,
    }


def _task_records(
    out: Path, task: str, split: str, n: int, seed: int, progress: tqdm
) -> Iterator[dict[str, Any]]:
    """Draw `n` samples of `task`, write their images, yield their JSON records."""
    generator = TASK_GENERATORS[task]
    rng = _rng(seed, task, split)
    for index in range(n):
        sample = generator(rng)
        image = f"images/{task}/{split}_{index:05d}.png"
        atomic_write_bytes(
            out / image, png_bytes(render(sample.scene.items, sample.scene.background))
        )
        progress.update(1)
        if split == "train":
            yield _train_record(task, index, image, sample)
        else:
            yield _test_record(task, index, image, sample)


def _stage0_records(out: Path, n: int, seed: int, progress: tqdm) -> Iterator[dict[str, Any]]:
    rng = _rng(seed, STAGE0, "train")
    for index in range(n):
        scene = stage0_scene(rng)
        image = f"images/{STAGE0}/train_{index:05d}.png"
        atomic_write_bytes(out / image, png_bytes(render(scene.items, scene.background)))
        progress.update(1)
        yield {
            "id": f"{STAGE0}_train_{index:05d}",
            "image": image,
            "conversations": [
                {"from": "human", "value": f"<image>\n{rng.choice(STAGE0_PROMPTS)}"},
                {"from": "gpt", "value": describe_scene(scene)},
            ],
        }


def _parameters(seed: int, n_train: int, n_test: int, n_stage0: int) -> dict[str, Any]:
    return {
        "generator": "sefe_fast.data.minicoin",
        "version": GENERATOR_VERSION,
        "stage0_version": STAGE0_VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "n_stage0": n_stage0,
        "image_size": MINICOIN_IMAGE_SIZE,
        "tasks": list(COIN_TASKS),
    }


def _is_complete(out: Path, parameters: dict[str, Any]) -> bool:
    """True when `out` holds a finished set made with `parameters` (hashes of the JSON files match)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("parameters") != parameters:
        return False
    for relative, digest in manifest.get("files", {}).items():
        path = out / relative
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            return False
    return True


def generate_minicoin(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
    n_stage0: int | None = None,
    progress: bool = True,
) -> Path:
    """Write mini-CoIN under `out_dir` (see the module docstring) and return its path.

    `n_train`/`n_test`: records per task and split (defaults DEFAULT_N_TRAIN/DEFAULT_N_TEST);
    `n_stage0`: stage-0 captions (default DEFAULT_N_STAGE0). Reuses a complete set made
    with the same parameters (recognised by `out_dir/manifest.json`).
    """
    out = Path(out_dir)
    n_train = DEFAULT_N_TRAIN if n_train is None else n_train
    n_test = DEFAULT_N_TEST if n_test is None else n_test
    n_stage0 = DEFAULT_N_STAGE0 if n_stage0 is None else n_stage0
    for name, value in (("n_train", n_train), ("n_test", n_test), ("n_stage0", n_stage0)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    parameters = _parameters(seed, n_train, n_test, n_stage0)
    if _is_complete(out, parameters):
        return out
    (out / MANIFEST).unlink(missing_ok=True)  # the set is incomplete until rewritten

    files: dict[str, str] = {}

    def write_json(relative: str, records: list[dict[str, Any]]) -> None:
        data = _dumps(records)
        atomic_write_bytes(out / relative, data)
        files[relative] = hashlib.sha256(data).hexdigest()

    total = len(COIN_TASKS) * (n_train + n_test) + n_stage0
    with tqdm(total=total, desc="mini-CoIN", unit="img", disable=not progress) as bar:
        bar.set_postfix_str(STAGE0)
        write_json(f"{STAGE0}/train.json", list(_stage0_records(out, n_stage0, seed, bar)))
        for task in COIN_TASKS:
            bar.set_postfix_str(task)
            for split, n in (("train", n_train), ("test", n_test)):
                write_json(
                    f"{task}/{split}.json", list(_task_records(out, task, split, n, seed, bar))
                )
    atomic_write_json(out / MANIFEST, {"parameters": parameters, "files": files})
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m sefe_fast.data.minicoin --out DIR [--seed N] [--n-train N] [--n-test N]."""
    parser = argparse.ArgumentParser(
        prog="python -m sefe_fast.data.minicoin", description="Generate the mini-CoIN benchmark."
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=None, help=f"default {DEFAULT_N_TRAIN}")
    parser.add_argument("--n-test", type=int, default=None, help=f"default {DEFAULT_N_TEST}")
    parser.add_argument("--n-stage0", type=int, default=None, help=f"default {DEFAULT_N_STAGE0}")
    args = parser.parse_args(argv)
    out = generate_minicoin(
        args.out, seed=args.seed, n_train=args.n_train, n_test=args.n_test, n_stage0=args.n_stage0
    )
    print(f"mini-CoIN written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
