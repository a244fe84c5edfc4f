"""A tiny CoIN in the real on-disk formats (the tiny random HF LLaVA to run it with:
`tiny_hf_llava.write_tiny_llava`).

`write_coin_fixture(root)` writes, for all eight tasks, `root/<Task>/train.json` (LLaVA
conversations) and `root/<Task>/test.json` (`{question_id, image, text, answer}`) as CoIN
ships them, images under `root/images/`, and TextVQA's annotation file
`root/TextVQA/TextVQA_0.5.1_val.json` with ten human answers per question. It holds the
cases real CoIN has and mini-CoIN does not: text-only ScienceQA records (no `image` key;
one with `"image": null`) in train and test, ScienceQA's one-line options
("Options: (A) ... (B) ..."), TextVQA integer question ids scored against the annotation
file, Grounding's `answer_bbox` and `size`, ImageNet class labels, OCR-VQA titles, authors
and genres.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sefe_fast.tasks import GROUNDING_SUFFIX, MCQ_SUFFIX, SHORT_SUFFIX

VIZWIZ_HINT = "When the provided information is insufficient, respond with 'Unanswerable'."


def _conversation(question: str, answer: str, with_image: bool) -> list[dict[str, str]]:
    human = f"<image>\n{question}" if with_image else question
    return [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]


def _sqa(question: str, options: list[str]) -> str:
    listed = " ".join(f"({chr(65 + i)}) {option}" for i, option in enumerate(options))
    return f"Question: {question}\nOptions: {listed}"


# Per task: (question, answer, has image) for train, then for test.
_SQA_TRAIN = [
    (_sqa("Which force pulls the nail to the magnet?", ["magnetism", "friction"]), "A", True),
    (_sqa("Which word is a noun?", ["run", "table", "quickly"]), "B", False),
    (_sqa("Which is a mammal?", ["shark", "trout", "whale", "eel"]), "C", None),  # image null
    (_sqa("Which state is Austin the capital of?", ["Ohio", "Texas"]), "B", True),
]
_SQA_TEST = [
    (_sqa("Which animal has fur?", ["frog", "bear"]), "B", True),
    (_sqa("What is 2 + 2?", ["4", "5", "3"]), "A", False),
    ("<image>\n" + _sqa("Which object is heavier?", ["feather", "brick"]), "B", True),
    (_sqa("Which sentence is a question?", ["I ran.", "Did you run?"]), "B", False),
]
_SHORT: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {
    "TextVQA": (
        [("What is written on the sign?", "stop"), ("What brand is the phone?", "nokia")],
        [
            ("What does the label say?", "cola"),
            ("What number is on the shirt?", "23"),
            ("What is the name of the shop?", "bakery"),
        ],
    ),
    "ImageNet": (
        [
            ("What is the object in the image?", "goldfish"),
            ("What is the object in the image?", "tabby cat"),
        ],
        [
            ("What is the object in the image?", "goldfish"),
            ("What is the object in the image?", "golden retriever"),
            ("What is the object in the image?", "tabby cat"),
        ],
    ),
    "GQA": (
        [("Is the cup to the left of the plate?", "yes"), ("What color is the car?", "blue")],
        [
            ("Which side is the lamp on?", "left"),
            ("Is the sky cloudy?", "no"),
            ("What is on the table?", "laptop"),
        ],
    ),
    "VizWiz": (
        [
            (f"What is this?\n{VIZWIZ_HINT}", "soup can"),
            (f"What color is this?\n{VIZWIZ_HINT}", "unanswerable"),
        ],
        [
            (f"What is in this box?\n{VIZWIZ_HINT}", "cereal"),
            (f"What does this say?\n{VIZWIZ_HINT}", "unanswerable"),
            (f"What is this?\n{VIZWIZ_HINT}", "keyboard"),
        ],
    ),
    "VQAv2": (
        [("What color is the bus?", "red"), ("How many dogs are there?", "2")],
        [
            ("Is the man wearing a hat?", "yes"),
            ("What sport is this?", "tennis"),
            ("How many people are there?", "3"),
        ],
    ),
    "OCRVQA": (
        [
            ("Who wrote this book?", "Jane Austen"),
            ("What is the genre of this book?", "Literature & Fiction"),
        ],
        [
            ("What is the title of this book?", "Pride and Prejudice"),
            ("What is the genre of this book?", "Cookbooks, Food & Wine"),
            ("Is this a romantic book?", "Yes"),
        ],
    ),
}
_GROUNDING_TRAIN = [
    ("man in red shirt", "[0.12, 0.34, 0.56, 0.78]"),
    ("dog on the left", "[0.05, 0.40, 0.31, 0.92]"),
]
_GROUNDING_TEST = [
    ("woman holding an umbrella", "[0.20, 0.15, 0.48, 0.80]", [640, 480]),
    ("car in the back", "[0.55, 0.30, 0.90, 0.52]", [500, 375]),
    ("left giraffe", "[0.02, 0.10, 0.40, 0.95]", [427, 640]),
]
# TextVQA's question ids are integers in both its annotation file and CoIN's test.json.
TEXTVQA_FIRST_ID = 34602


def _write_image(root: Path, name: str, seed: int) -> str:
    rng = np.random.default_rng(seed)
    path = root / "images" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(path)
    return f"images/{name}"


def _dump(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")


def _scienceqa(root: Path) -> None:
    train = []
    for n, (question, answer, has_image) in enumerate(_SQA_TRAIN):
        record: dict[str, Any] = {"id": f"sqa-train-{n}"}
        if has_image:
            record["image"] = _write_image(root, f"sqa_train_{n}.png", n)
        elif has_image is None:
            record["image"] = None
        record["conversations"] = _conversation(
            f"{question}\n{MCQ_SUFFIX}", answer, bool(has_image)
        )
        train.append(record)
    test = []
    for n, (text, answer, has_image) in enumerate(_SQA_TEST):
        record = {"question_id": f"sqa-test-{n}"}
        if has_image:
            record["image"] = _write_image(root, f"sqa_test_{n}.png", 100 + n)
        test.append({**record, "text": text, "answer": answer})
    _dump(root / "ScienceQA" / "train.json", train)
    _dump(root / "ScienceQA" / "test.json", test)


def _grounding(root: Path) -> None:
    train = [
        {
            "id": f"grd-train-{n}",
            "image": _write_image(root, f"grd_train_{n}.png", 200 + n),
            "conversations": _conversation(f"{GROUNDING_SUFFIX} {phrase}", box, True),
        }
        for n, (phrase, box) in enumerate(_GROUNDING_TRAIN * 2)
    ]
    test = [
        {
            "question_id": f"grd-test-{n}",
            "image": _write_image(root, f"grd_test_{n}.png", 300 + n),
            "text": f"{GROUNDING_SUFFIX} {phrase}",
            "answer": box,
            "answer_bbox": box,
            "size": size,
        }
        for n, (phrase, box, size) in enumerate(_GROUNDING_TEST)
    ]
    _dump(root / "Grounding" / "train.json", train)
    _dump(root / "Grounding" / "test.json", test)


def _short_task(root: Path, task: str, seed: int) -> list[dict[str, Any]]:
    train_pairs, test_pairs = _SHORT[task]
    train_pairs = train_pairs * 2  # four samples: one step of 2 x 2 on two ranks
    train = [
        {
            "id": f"{task}-train-{n}",
            "image": _write_image(root, f"{task}_train_{n}.png", seed + n),
            "conversations": _conversation(f"{question}\n{SHORT_SUFFIX}", answer, True),
        }
        for n, (question, answer) in enumerate(train_pairs)
    ]
    test = [
        {
            "question_id": TEXTVQA_FIRST_ID + n if task == "TextVQA" else f"{task}-test-{n}",
            "image": _write_image(root, f"{task}_test_{n}.png", seed + 50 + n),
            "text": f"{question}\n{SHORT_SUFFIX}",
            "answer": answer,
        }
        for n, (question, answer) in enumerate(test_pairs)
    ]
    _dump(root / task / "train.json", train)
    _dump(root / task / "test.json", test)
    return test


def textvqa_human_answers(answer: str, n: int) -> list[str]:
    """Ten human answers for a fixture question: the CoIN answer given by 3 + n annotators."""
    agreeing = min(3 + n, 10)
    return [answer] * agreeing + [f"other{k}" for k in range(10 - agreeing)]


def write_coin_fixture(root: Path) -> dict[str, int]:
    """Write the fixture under `root` (see the module docstring); return test records per task."""
    root.mkdir(parents=True, exist_ok=True)
    _scienceqa(root)
    _grounding(root)
    for seed, task in enumerate(_SHORT, start=1):
        test = _short_task(root, task, 1000 * seed)
        if task == "TextVQA":
            data = [
                {
                    "question_id": record["question_id"],
                    "question": record["text"].split("\n")[0],
                    "answers": textvqa_human_answers(record["answer"], n),
                }
                for n, record in enumerate(test)
            ]
            # The real file covers all 5000 val questions, more than CoIN's test set.
            data.append({"question_id": 1, "question": "unused?", "answers": ["x"] * 10})
            _dump(
                root / "TextVQA" / "TextVQA_0.5.1_val.json",
                {"dataset_name": "textvqa", "data": data},
            )
    return {
        task: len(json.loads((root / task / "test.json").read_text()))
        for task in (
            "ScienceQA",
            "TextVQA",
            "ImageNet",
            "GQA",
            "VizWiz",
            "Grounding",
            "VQAv2",
            "OCRVQA",
        )
    }
