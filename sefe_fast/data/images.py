"""Image loading and LLaVA-1.5 preprocessing: pad to a square, then the model's image processor.

LLaVA-1.5 ("pad" aspect mode) pads every image to a square, centred, with the image
processor's mean colour (`image_mean` × 255, e.g. CLIP's (122, 116, 104)), so that after
normalisation the padding is exactly zero; then it resizes and normalises with the vision
tower's processor. Grounding boxes are normalised to that padded square.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open the image at `path` as RGB; FileNotFoundError / ValueError naming the path otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as handle:
            return handle.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"unreadable image: {path}: {error}") from error


def check_image_readable(path: str | os.PathLike, decode: bool = False) -> None:
    """Check that `path` is an image PIL can identify (the header only: cheap), or with
    `decode` that its pixels decode to the end (a truncated file passes the header check)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as handle:
            handle.size  # noqa: B018  (touching size forces the header parse)
            if decode:
                handle.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"unreadable image: {path}: {error}") from error


def mean_colour(image: Image.Image) -> tuple[int, int, int]:
    """The image's mean RGB colour, each channel rounded to an integer in 0..255."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3)
    return tuple(round(float(v)) for v in pixels.mean(axis=0))  # type: ignore[return-value]


def processor_fill(image_processor: Any) -> tuple[int, int, int]:
    """The padding colour LLaVA-1.5 uses: the processor's `image_mean` scaled to 0..255."""
    mean: Sequence[float] = image_processor.image_mean
    return tuple(int(x * 255) for x in mean)  # type: ignore[return-value]


def expand_to_square(image: Image.Image, fill: tuple[int, int, int] | None = None) -> Image.Image:
    """Pad `image` to a centred square of side max(width, height) with the mean colour.

    `fill` is the RGB padding colour; None uses the image's own mean colour.
    `image_to_pixel_values` passes the processor's mean colour, as LLaVA-1.5 does.
    A square image is returned unchanged.
    """
    width, height = image.size
    if width == height:
        return image
    colour = mean_colour(image) if fill is None else tuple(fill)
    side = max(width, height)
    square = Image.new(image.mode, (side, side), colour)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def image_to_pixel_values(image: Image.Image, image_processor: Any) -> torch.Tensor:
    """Pad to a square with the processor's mean colour, then process: FloatTensor [3, H, W]."""
    square = expand_to_square(image.convert("RGB"), processor_fill(image_processor))
    pixel_values = image_processor(images=square, return_tensors="pt")["pixel_values"]
    return torch.as_tensor(pixel_values[0], dtype=torch.float32)
