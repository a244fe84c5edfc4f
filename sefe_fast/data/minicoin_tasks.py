"""Per-task scene and question generators of mini-CoIN (see `minicoin` for the design).

Each generator draws one sample from a `random.Random`: the picture (a list of placed items
and a background), the question text as CoIN words it (instruction suffix included, no
`<image>`), the gold answer, and what ASD needs to rewrite it exactly: the bare question,
the answer as a short phrase, a pool of wrong answers of the same kind, and a brief
(~20 words) and a detailed (~50 words) explanation built from the scene.

Longer than the project's ~450 lines on purpose: the eight generators share the scene
vocabulary and the explanation phrasing defined at the top, and reading them side by side
is how one checks that every task's answers and distractors are drawn alike.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sefe_fast.data.minicoin_render import (
    BACKGROUND,
    COLOURS,
    DARK_BACKGROUND,
    GRID,
    ICONS,
    IMAGE_SIZE,
    SHAPES,
    Placed,
    format_box,
)
from sefe_fast.tasks import GROUNDING_SUFFIX, MCQ_SUFFIX, SHORT_SUFFIX

COLOUR_NAMES = tuple(COLOURS)
SHAPE_NAMES = tuple(SHAPES)
ICON_NAMES = tuple(ICONS)
SIGN_WORDS = (
    "stop", "open", "sale", "exit", "bank", "shop", "park", "cafe",
    "bar", "inn", "gas", "post", "toll", "spa", "taxi", "zoo",
)  # fmt: skip
TITLE_ADJECTIVES = ("Old", "Dark", "Lost", "Big", "Cold", "Wild", "Last", "Tiny")
TITLE_NOUNS = ("Fox", "Sea", "Road", "King", "Moon", "Ship", "Gold", "Wolf")
AUTHORS = ("Sam", "Ann", "Tom", "Kim", "Max", "Eve", "Joe", "Liz")
OPTION_LETTERS = "ABCD"
UNANSWERABLE = "Unanswerable"
VIZWIZ_HINT = "When the provided information is insufficient, respond with 'Unanswerable'."
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

# Sentences appended, in order, until a detailed explanation reaches its length.
_DETAIL_PADDING = (
    "The picture is a small square image divided into a grid of four rows and four columns.",
    "Every object is drawn in one bold colour and fills whole cells of that grid.",
    "Nothing else in the image changes this conclusion.",
)
DETAILED_TARGET_WORDS = 40


@dataclass
class Scene:
    """What a picture shows: placed items, the background, and caption facts."""

    items: list[Placed] = field(default_factory=list)
    background: tuple[int, int, int] = BACKGROUND
    kind: str = "shapes"  # shapes | icon | sign | book | dark | blank
    word: str = ""  # sign text
    title: str = ""
    author: str = ""
    cover: str = ""  # cover colour name


@dataclass
class Sample:
    """One generated question about one scene, with the facts ASD uses."""

    scene: Scene
    question: str  # CoIN wording, suffix included, without "<image>"
    answer: str
    bare_question: str  # the question alone (no options, no suffix)
    answer_text: str  # the answer as a short phrase (the option text for MCQ)
    answer_pool: list[str]  # wrong answers of the same kind
    brief: str
    detailed: str
    test_extra: dict[str, Any] = field(default_factory=dict)


def _where(item: Placed) -> str:
    if item.height == 1 and item.width == 1:
        return f"row {item.row + 1}, column {item.col + 1}"
    rows = f"rows {item.row + 1}-{item.row + item.height}"
    if item.width == 1:
        return f"{rows}, column {item.col + 1}"
    return f"{rows}, columns {item.col + 1}-{item.col + item.width}"


def name_item(item: Placed) -> str:
    """'a red circle', 'a large blue square', 'a green fish'."""
    size = "large " if item.kind == "shape" and item.height > 1 else ""
    article = "an" if (size or item.colour)[0] in "aeiou" else "a"
    return f"{article} {size}{item.colour} {item.name}"


def describe_item(item: Placed) -> str:
    """'a red circle at row 1, column 2'."""
    return f"{name_item(item)} at {_where(item)}"


def describe_scene(scene: Scene) -> str:
    """A caption listing everything in the scene in reading order (stage-0 style)."""
    if scene.kind == "dark":
        return "A dark, blurry photo in which nothing can be seen."
    if scene.kind == "blank":
        return "An empty gray picture with nothing in it."
    if scene.kind == "book":
        # "A orange book cover": a known slip kept because the shipped tiny model was trained
        # on these captions (fixing it means STAGE0_VERSION 2 and a rebuilt asset).
        return (
            f'A {scene.cover} book cover with the title "{scene.title}" '
            f'and the author name "{scene.author}".'
        )
    objects = sorted(
        (item for item in scene.items if item.kind != "glyph"), key=lambda i: (i.row, i.col)
    )
    parts = []
    if scene.kind == "sign":
        glyphs = [item for item in scene.items if item.kind == "glyph"]
        parts.append(
            f'A sign reading "{scene.word}" at row {glyphs[0].row + 1}, '
            f"columns {glyphs[0].col + 1}-{glyphs[-1].col + 1}."
        )
    shapes = [item for item in objects if item.kind == "shape"]
    icons = [item for item in objects if item.kind == "icon"]
    for icon in icons:
        parts.append(describe_item(icon)[0].upper() + describe_item(icon)[1:] + ".")
    if shapes:
        noun = "shape" if len(shapes) == 1 else "shapes"
        listed = "; ".join(describe_item(item) for item in shapes)
        parts.append(f"{len(shapes)} {noun}: {listed}.")
    return " ".join(parts)


def _detailed(scene: Scene, reasoning: str, conclusion: str) -> str:
    """Scene caption + reasoning + conclusion, padded to about DETAILED_TARGET_WORDS words."""
    text = f"{describe_scene(scene)} {reasoning} {conclusion}"
    for sentence in _DETAIL_PADDING:
        if len(text.split()) >= DETAILED_TARGET_WORDS:
            break
        text = f"{text} {sentence}"
    return text


def _with_suffix(question: str, suffix: str = SHORT_SUFFIX) -> str:
    return f"{question}\n{suffix}"


def _place_shapes(
    rng: random.Random, n_small: int, *, large: bool = False, unique: bool = True
) -> list[Placed]:
    """Random shapes on free cells (one optional 2×2 large shape), (colour, shape) unique."""
    items: list[Placed] = []
    taken: set[tuple[int, int]] = set()
    used: set[tuple[str, str]] = set()

    def attributes() -> tuple[str, str]:
        while True:
            pair = (rng.choice(COLOUR_NAMES), rng.choice(SHAPE_NAMES))
            if not unique or pair not in used:
                used.add(pair)
                return pair

    if large:
        row, col = rng.randrange(GRID - 1), rng.randrange(GRID - 1)
        colour, shape = attributes()
        items.append(Placed("shape", shape, colour, row, col, 2, 2))
        taken |= {(row + dr, col + dc) for dr in (0, 1) for dc in (0, 1)}
    free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in taken]
    for row, col in rng.sample(free, n_small):
        colour, shape = attributes()
        items.append(Placed("shape", shape, colour, row, col))
    return items


def _icon(rng: random.Random, name: str | None = None) -> Placed:
    return Placed(
        "icon",
        name or rng.choice(ICON_NAMES),
        rng.choice(COLOUR_NAMES),
        rng.randrange(GRID - 1),
        rng.randrange(GRID - 1),
        2,
        2,
    )


def _wrong(pool: tuple[str, ...] | list[str], answer: str) -> list[str]:
    return [value for value in pool if value != answer]


# ScienceQA's option lists: the shown icon's set, always in this order (see `science_qa`).
SCIENCEQA_OPTION_SETS = (ICON_NAMES[:4], ICON_NAMES[4:])


def science_qa(rng: random.Random) -> Sample:
    """MCQ: which object (icon) is shown; the options are the icon's fixed set of four, always
    listed in the same order, so the letter follows from the object (answer: a letter).

    Shuffled option lists (generator v1) asked the tiny char-level LLM to match the picture
    to a position in the prompt: it stayed at chance (~33 %, flat over 200 steps).
    """
    icon = _icon(rng)
    options = next(list(group) for group in SCIENCEQA_OPTION_SETS if icon.name in group)
    letter = OPTION_LETTERS[options.index(icon.name)]
    bare = rng.choice(
        ("Which of these objects is shown in the picture?", "Which object is in the image?")
    )
    listed = "\n".join(f"{OPTION_LETTERS[i]}. {text}" for i, text in enumerate(options))
    scene = Scene([icon], kind="icon")
    return Sample(
        scene=scene,
        question=f"{bare}\n{listed}\n{MCQ_SUFFIX}",
        answer=letter,
        bare_question=bare,
        answer_text=icon.name,
        answer_pool=_wrong(options, icon.name),
        # Explanations answer the bare question (ASD drops the options): name, not letter.
        brief=f"The picture shows {name_item(icon)} at {_where(icon)}, so the object shown "
        f"is the {icon.name}.",
        detailed=_detailed(
            scene,
            f"Its outline has the typical form of a {icon.name}, and no other object appears, "
            f"so among the possible objects only the {icon.name} matches the picture.",
            f"Therefore the object shown is the {icon.name}.",
        ),
    )


def text_vqa(rng: random.Random) -> Sample:
    """Read a sign: a 3–4 letter word in one row of glyph tiles, plus 0–2 shapes."""
    word = rng.choice(SIGN_WORDS)
    row = rng.randrange(GRID)
    start = rng.randrange(GRID - len(word) + 1)
    glyphs = [Placed("glyph", ch.upper(), "", row, start + i) for i, ch in enumerate(word)]
    others = [item for item in _place_shapes(rng, rng.randint(0, 2) + 4) if item.row != row][
        : rng.randint(0, 2)
    ]
    scene = Scene(glyphs + others, kind="sign", word=word)
    bare = rng.choice(
        (
            "What word is written on the sign?",
            "What does the sign say?",
            "What is written in the image?",
        )
    )
    return Sample(
        scene=scene,
        question=_with_suffix(bare),
        answer=word,
        bare_question=bare,
        answer_text=word,
        answer_pool=_wrong(SIGN_WORDS, word),
        brief=f'The white sign in row {row + 1} spells the letters of the word "{word}", '
        f"so the answer is {word}.",
        detailed=_detailed(
            scene,
            f"Reading the black letters on the white tiles from left to right gives "
            f"{', '.join(word.upper())}, which spell the word {word}.",
            f"So the sign says {word}.",
        ),
    )


def image_net(rng: random.Random) -> Sample:
    """Object category: one icon, answer its name."""
    icon = _icon(rng)
    scene = Scene([icon], kind="icon")
    bare = "What is the object in the image?"
    return Sample(
        scene=scene,
        question=_with_suffix(bare),
        answer=icon.name,
        bare_question=bare,
        answer_text=icon.name,
        answer_pool=_wrong(ICON_NAMES, icon.name),
        brief=f"The image shows {name_item(icon)} drawn at {_where(icon)}, so the object is a "
        f"{icon.name}.",
        detailed=_detailed(
            scene,
            f"Its outline has the typical form of a {icon.name}, and there is no other object "
            "in the picture.",
            f"So the object in the image is a {icon.name}.",
        ),
    )


def _single_shape(rng: random.Random, *, large: bool) -> Placed:
    """One shape: a small one on any cell, or a large 2×2 one in one of the four quadrants."""
    colour, shape = rng.choice(COLOUR_NAMES), rng.choice(SHAPE_NAMES)
    if large:
        row, col = rng.choice((0, GRID // 2)), rng.choice((0, GRID // 2))
        return Placed("shape", shape, colour, row, col, 2, 2)
    return Placed("shape", shape, colour, rng.randrange(GRID), rng.randrange(GRID))


GQA_KINDS = ("colour", "shape", "size")


def gqa(rng: random.Random) -> Sample:
    """Attribute questions about the one shape in the picture: its colour, its shape, or
    whether it is small (one cell) or large (2×2) — the answer kind is set by the question.

    Generator v1 asked relations between 2–4 shapes ("the object left of the red circle"):
    finding a thing by its description is beyond the tiny LLM (22 %, flat over 200 steps).
    Where-questions (left/right, top/bottom) stayed at chance too: the tiny tower's features
    keep little position (RESULTS.md).
    """
    kind = rng.choice(GQA_KINDS)
    item = _single_shape(rng, large=rng.random() < 0.5)
    where = _where(item)
    size = "large" if item.height > 1 else "small"
    bare, answer, reasoning, pool = {
        "colour": (
            "What color is the shape?", item.colour,
            f"The only shape is {name_item(item)} at {where}; its color is {item.colour}.",
            COLOUR_NAMES,
        ),
        "shape": (
            "What shape is it?", item.name,
            f"The only shape is {name_item(item)} at {where}; it is a {item.name}.",
            SHAPE_NAMES,
        ),
        "size": (
            "Is the shape small or large?", size,
            f"The only shape is {name_item(item)} at {where}; it fills "
            f"{'four cells' if size == 'large' else 'one cell'} of the grid, so it is {size}.",
            ("small", "large"),
        ),
    }[kind]  # fmt: skip
    scene = Scene([item])
    return Sample(
        scene=scene,
        question=_with_suffix(bare),
        answer=answer,
        bare_question=bare,
        answer_text=answer,
        answer_pool=_wrong(pool, answer),
        brief=f"{reasoning} So the answer is {answer}.",
        detailed=_detailed(scene, reasoning, f"Therefore the answer is {answer}."),
    )


def viz_wiz(rng: random.Random) -> Sample:
    """Colour of the photographed object, or 'Unanswerable' for a dark or empty photo (~25%)."""
    bare = rng.choice(("What color is this object?", "What color is this?"))
    question = f"{bare}\n{VIZWIZ_HINT}\n{SHORT_SUFFIX}"
    if rng.random() < 0.25:
        kind = rng.choice(("dark", "blank"))
        scene = Scene([], DARK_BACKGROUND if kind == "dark" else BACKGROUND, kind=kind)
        reason = "too dark to see" if kind == "dark" else "empty, with no object"
        return Sample(
            scene=scene,
            question=question,
            answer=UNANSWERABLE,
            bare_question=bare,
            answer_text=UNANSWERABLE,
            answer_pool=list(COLOUR_NAMES),
            brief=f"The photo is {reason}, so the color of the object cannot be told and "
            f"the answer is {UNANSWERABLE}.",
            detailed=_detailed(
                scene,
                f"Because the photo is {reason}, no object and no color are visible.",
                f"The information is insufficient, so the answer is {UNANSWERABLE}.",
            ),
        )
    icon = _icon(rng)
    scene = Scene([icon], kind="icon")
    return Sample(
        scene=scene,
        question=question,
        answer=icon.colour,
        bare_question=bare,
        answer_text=icon.colour,
        answer_pool=[*_wrong(COLOUR_NAMES, icon.colour), UNANSWERABLE],
        brief=f"The photo clearly shows {name_item(icon)}, so the color of the object is "
        f"{icon.colour}.",
        detailed=_detailed(
            scene,
            f"The object is fully visible and filled with a single {icon.colour} color.",
            f"So the answer is {icon.colour}.",
        ),
    )


def grounding(rng: random.Random) -> Sample:
    """Box of the one shape in the picture (small, or large in a quadrant), referred to by
    colour and shape or by shape alone; snapped to the 4×4 grid: two decimals.

    Generator v1 referred to one of 2–4 shapes: the tiny LLM never learnt to find it (0 %).
    """
    target = _single_shape(rng, large=rng.random() < 0.3)
    items = [target]
    ref = f"the {target.name}" if rng.random() < 0.5 else f"the {target.colour} {target.name}"
    box = format_box(target.box())
    grid_boxes = [
        format_box(Placed("shape", "", "", r, c).box()) for r in range(GRID) for c in range(GRID)
    ]
    pool = [b for b in grid_boxes if b != box]
    scene = Scene(items)
    sentence = ref[0].upper() + ref[1:] + "."
    reasoning = (
        f"{ref.capitalize()} is at {_where(target)}, spanning x from "
        f"{target.box()[0]:.2f} to {target.box()[2]:.2f} and y from {target.box()[1]:.2f} to "
        f"{target.box()[3]:.2f}."
    )
    return Sample(
        scene=scene,
        question=f"{sentence}\n{GROUNDING_SUFFIX}",
        answer=box,
        bare_question=sentence,
        answer_text=box,
        answer_pool=pool,
        brief=f"{reasoning} So its box is {box}.",
        detailed=_detailed(scene, reasoning, f"Its bounding box is therefore {box}."),
        test_extra={"answer_bbox": box, "size": [IMAGE_SIZE, IMAGE_SIZE]},
    )


def vqa_v2(rng: random.Random) -> Sample:
    """Counting (1–4 shapes) and yes/no questions on whether a colour is present (1–3 shapes).

    Generator v1 also counted shapes of one colour or kind and asked about colour–shape
    pairs: binding an attribute to an object is beyond the tiny LLM (~30 %, mostly "1").
    """
    if rng.random() < 0.5:
        n = rng.randint(1, 4)
        items = _place_shapes(rng, n, unique=False)
        bare = "How many shapes are there?"
        answer = str(n)
        reasoning = f"Counting every shape in the picture gives {COUNT_WORDS[n]}."
        pool = [str(k) for k in range(1, 5) if k != n]
    else:
        colour = rng.choice(COLOUR_NAMES)
        present = rng.random() < 0.5
        items = _place_shapes(rng, rng.randint(1, 3), unique=False)
        others = _wrong(COLOUR_NAMES, colour)
        items = [_with(item, "colour", rng.choice(others)) for item in items]
        if present:
            index = rng.randrange(len(items))
            items[index] = _with(items[index], "colour", colour)
        bare = f"Is there a {colour} shape?"
        answer = "yes" if present else "no"
        reasoning = (
            f"There {'is' if present else 'is no'} {colour} shape among the shapes in the picture."
        )
        pool = ["no" if present else "yes"]
    scene = Scene(items)
    return Sample(
        scene=scene,
        question=_with_suffix(bare),
        answer=answer,
        bare_question=bare,
        answer_text=answer,
        answer_pool=pool,
        brief=f"{reasoning} So the answer is {answer}.",
        detailed=_detailed(scene, reasoning, f"Therefore the answer is {answer}."),
    )


def _with(item: Placed, attribute: str, value: str) -> Placed:
    fields = {**item.__dict__, attribute: value}
    return Placed(**fields)


def ocr_vqa(rng: random.Random) -> Sample:
    """Book covers: read the two-word title (rows of glyph tiles) or the author's name."""
    adjective, noun = rng.choice(TITLE_ADJECTIVES), rng.choice(TITLE_NOUNS)
    author = rng.choice(AUTHORS)
    title = f"{adjective} {noun}"
    cover = rng.choice(COLOUR_NAMES)
    first_row = rng.randrange(2)
    items: list[Placed] = []
    for row, word in ((first_row, adjective), (first_row + 1, noun), (3, author)):
        start = rng.randrange(GRID - len(word) + 1)
        items += [Placed("glyph", ch.upper(), "", row, start + i) for i, ch in enumerate(word)]
    scene = Scene(items, COLOURS[cover], kind="book", title=title, author=author, cover=cover)
    if rng.random() < 0.7:
        bare = rng.choice(("What is the title of this book?", "What is the name of this book?"))
        answer = title
        pool = [f"{a} {n}" for a in TITLE_ADJECTIVES for n in TITLE_NOUNS if f"{a} {n}" != title]
        pool = rng.sample(pool, 8)
        reasoning = (
            f'The two upper lines of white tiles on the cover spell "{adjective.upper()}" and '
            f'"{noun.upper()}", which form the title.'
        )
    else:
        bare = rng.choice(("Who wrote this book?", "Who is the author of this book?"))
        answer = author
        pool = _wrong(AUTHORS, author)
        reasoning = (
            f'The bottom line of white tiles on the cover spells "{author.upper()}", '
            "the author's name."
        )
    return Sample(
        scene=scene,
        question=_with_suffix(bare),
        answer=answer,
        bare_question=bare,
        answer_text=answer,
        answer_pool=pool,
        brief=f"{reasoning} So the answer is {answer}.",
        detailed=_detailed(scene, reasoning, f"Therefore the answer is {answer}."),
    )


TASK_GENERATORS: dict[str, Callable[[random.Random], Sample]] = {
    "ScienceQA": science_qa,
    "TextVQA": text_vqa,
    "ImageNet": image_net,
    "GQA": gqa,
    "VizWiz": viz_wiz,
    "Grounding": grounding,
    "VQAv2": vqa_v2,
    "OCRVQA": ocr_vqa,
}


def stage0_scene(rng: random.Random) -> Scene:
    """A random scene of any kind the tasks use, for the stage-0 captions."""
    kind = rng.choices(
        ("shapes", "icon", "sign", "book", "dark", "blank"), weights=(40, 20, 15, 15, 5, 5)
    )[0]
    if kind == "shapes":
        return Scene(_place_shapes(rng, rng.randint(1, 5), large=rng.random() < 0.3))
    if kind == "icon":
        return Scene([_icon(rng)], kind="icon")
    if kind == "sign":
        return text_vqa(rng).scene
    if kind == "book":
        return ocr_vqa(rng).scene
    return Scene([], DARK_BACKGROUND if kind == "dark" else BACKGROUND, kind=kind)


STAGE0_PROMPTS = (
    "Describe the image.",
    "What is in this picture?",
    "Give a short description of the image.",
    "List everything you see in the image.",
)
