"""Stage 0a: per-cell labels, pixel normalisation, and that the tower learns to see."""

import random
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from sefe_fast.data.minicoin_render import COLOURS, DARK_BACKGROUND, Placed, render
from sefe_fast.data.minicoin_tasks import Scene
from sefe_fast.model.tiny import CLIP_MEAN, CLIP_STD, TinyConfig, build_tiny_model
from sefe_fast.model.tiny_vision import (
    CELL_CLASSES,
    cell_labels,
    draw_batch,
    normalise_pixels,
    pretrain_vision_tower,
)


def test_cell_labels_name_each_cell_with_its_item_quarter_or_background():
    scene = Scene(
        [
            Placed("shape", "circle", "red", 0, 0),
            Placed("icon", "fish", "blue", 2, 1, 2, 2),
            Placed("glyph", "Q", "", 0, 3),
        ],
        background=COLOURS["green"],
        kind="book",
    )
    labels = [CELL_CLASSES[i] for i in cell_labels(scene)]
    assert labels[0] == "shape|circle|red|0"
    assert labels[3] == "glyph|Q"
    assert labels[1] == "empty|green"  # a cover colour counts as the background
    assert [labels[9], labels[10], labels[13], labels[14]] == [
        f"icon|fish|blue|{q}" for q in (1, 2, 3, 4)
    ]
    dark = [CELL_CLASSES[i] for i in cell_labels(Scene([], DARK_BACKGROUND, kind="dark"))]
    assert dark == ["empty|dark"] * 16


def test_normalise_pixels_matches_the_tiny_image_processor():
    bundle = build_tiny_model(TinyConfig(), seed=0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    expected = bundle.image_processor(
        [Image.fromarray(image) for image in images], return_tensors="pt"
    )["pixel_values"]
    torch.testing.assert_close(
        normalise_pixels(images, CLIP_MEAN, CLIP_STD), expected, atol=1e-5, rtol=0
    )


def test_draw_batch_pixels_show_the_labelled_cells():
    pixels, labels = draw_batch(random.Random(3), 8, CLIP_MEAN, CLIP_STD)
    assert pixels.shape == (8, 3, 32, 32) and labels.shape == (8, 16)
    # A cell labelled as gray background is flat gray in the image.
    gray = normalise_pixels(render([])[None], CLIP_MEAN, CLIP_STD)[0, :, :8, :8]
    for image, row in zip(pixels, labels.tolist()):
        for cell, label in enumerate(row):
            if CELL_CLASSES[label] == "empty|gray":
                r, c = divmod(cell, 4)
                patch = image[:, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8]
                torch.testing.assert_close(patch, gray)


def test_vision_pretraining_learns_to_tell_cells_apart(one_thread):
    tower = build_tiny_model(TinyConfig(), seed=0).model.model.vision_tower
    report = pretrain_vision_tower(
        tower,
        steps=60,
        batch_size=32,
        lr=3e-3,
        seed=0,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        progress=False,
    )
    # Chance over the ~380 classes is < 1 %; 60 small steps already read most cells.
    assert report["cell_accuracy"] > 0.6, report
    assert report["object_cell_accuracy"] > 0.2, report


def test_the_tiny_image_processor_loads_without_the_torchvision_fallback_warning():
    # transformers >= 5 without torchvision warns at every run start when the bare name
    # CLIPImageProcessor is imported; sefe_fast asks for the PIL class it falls back to.
    code = "import sefe_fast.train.cli, sefe_fast.model.tiny as t; t.tiny_image_processor(32)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "requires torchvision" not in done.stderr, done.stderr
