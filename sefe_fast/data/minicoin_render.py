"""Drawing mini-CoIN scenes: a palette, shapes, icons and a blocky glyph font on an 8-px grid.

Every picture element is aligned to the vision tower's 8×8 patches so that one patch shows
one thing: a shape fills one cell (a "large" shape fills 2×2 cells), an icon fills 2×2
cells, a text glyph fills one cell (black on a white tile). Colours are exact RGB values with
no noise, so the tiny CLIP's linear patch embedding sees them directly.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

CELL = 8  # pixels per grid cell = the vision tower's patch size
GRID = 4  # cells per side
IMAGE_SIZE = CELL * GRID  # 32 px

BACKGROUND = (128, 128, 128)
DARK_BACKGROUND = (20, 20, 24)
TILE = (255, 255, 255)
INK = (0, 0, 0)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 70, 235),
    "yellow": (245, 225, 20),
    "purple": (150, 40, 200),
    "orange": (250, 135, 0),
}

# 7×7 masks in the 8×8 cell ("#" = filled); the last row and column stay empty so that
# neighbouring shapes never touch.
SHAPES: dict[str, tuple[str, ...]] = {
    "square": (".......", ".######", ".######", ".######", ".######", ".######", ".######"),
    "circle": ("..###..", ".#####.", "#######", "#######", "#######", ".#####.", "..###.."),
    "triangle": ("...#...", "...#...", "..###..", "..###..", ".#####.", ".#####.", "#######"),
    "cross": ("...#...", "...#...", "...#...", "#######", "...#...", "...#...", "...#..."),
    "diamond": ("...#...", "..###..", ".#####.", "#######", ".#####.", "..###..", "...#..."),
}

# Icons are 8×8 bitmaps drawn at 2× (16×16 px, 2×2 cells).
ICONS: dict[str, tuple[str, ...]] = {
    "house": (
        "...##...",
        "..####..",
        ".######.",
        "########",
        ".##..##.",
        ".##..##.",
        ".######.",
        "........",
    ),
    "tree": (
        "..####..",
        ".######.",
        "########",
        "########",
        ".######.",
        "...##...",
        "...##...",
        "..####..",
    ),
    "fish": (
        "........",
        "#...###.",
        "##.#####",
        "####.###",
        "##.#####",
        "#...###.",
        "........",
        "........",
    ),
    "boat": (
        "...#....",
        "...##...",
        "...###..",
        "...####.",
        "...#....",
        "########",
        ".######.",
        "..####..",
    ),
    "car": (
        "........",
        "..####..",
        ".#....#.",
        "########",
        "########",
        "########",
        ".##..##.",
        ".##..##.",
    ),
    "cup": (
        "........",
        "######..",
        "######.#",
        "######.#",
        "######.#",
        "#######.",
        ".####...",
        "........",
    ),
    "key": (
        "........",
        ".###....",
        "#...####",
        "#...####",
        ".###.#.#",
        "........",
        "........",
        "........",
    ),
    "bird": (
        "........",
        ".##.....",
        "####....",
        ".######.",
        "..######",
        "...####.",
        "....#...",
        "....##..",
    ),
}

# A 5×7 capital-letter font; each glyph sits in one cell at x 1..5, y 0..6 on a white tile.
GLYPHS: dict[str, tuple[str, ...]] = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".####", "#....", "#....", "#....", "#....", "#....", ".####"),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".####", "#....", "#....", "#.###", "#...#", "#...#", ".###."),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "##..#", "#.#.#", "#.#.#", "#..##", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "Q": (".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "##.##", "#...#"),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
}


def _mask(rows: tuple[str, ...], size: int) -> np.ndarray:
    """A boolean [size, size] mask from '#' rows, padded with False at the bottom/right."""
    mask = np.zeros((size, size), dtype=bool)
    for y, row in enumerate(rows):
        for x, char in enumerate(row):
            mask[y, x] = char == "#"
    return mask


SHAPE_MASKS = {name: _mask(rows, CELL) for name, rows in SHAPES.items()}
ICON_MASKS = {name: _mask(rows, CELL) for name, rows in ICONS.items()}
GLYPH_MASKS = {
    letter: np.pad(_mask(rows, 7)[:7, :5], ((0, 1), (1, 2))) for letter, rows in GLYPHS.items()
}


@dataclass(frozen=True)
class Placed:
    """Something drawn at grid cell (row, col) spanning `height`×`width` cells (0-based)."""

    kind: str  # "shape", "icon" or "glyph"
    name: str  # shape name, icon name or letter
    colour: str  # a COLOURS key ("" for glyphs)
    row: int
    col: int
    height: int = 1
    width: int = 1

    def box(self) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2) normalised to the square image, in [0, 1]."""
        return (
            self.col / GRID,
            self.row / GRID,
            (self.col + self.width) / GRID,
            (self.row + self.height) / GRID,
        )


def format_box(box: tuple[float, float, float, float]) -> str:
    """`[x1, y1, x2, y2]` with two decimals, CoIN's grounding answer style."""
    return "[" + ", ".join(f"{value:.2f}" for value in box) + "]"


def _paint(
    canvas: np.ndarray,
    mask: np.ndarray,
    colour: tuple[int, int, int],
    row: int,
    col: int,
    scale: int,
) -> None:
    big = np.kron(mask, np.ones((scale, scale), dtype=bool)) if scale > 1 else mask
    y, x = row * CELL, col * CELL
    region = canvas[y : y + big.shape[0], x : x + big.shape[1]]
    region[big] = colour


def render(items: list[Placed], background: tuple[int, int, int] = BACKGROUND) -> np.ndarray:
    """Draw `items` on a background: uint8 array [IMAGE_SIZE, IMAGE_SIZE, 3]."""
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    canvas[:] = background
    for item in items:
        if item.kind == "shape":
            _paint(
                canvas,
                SHAPE_MASKS[item.name],
                COLOURS[item.colour],
                item.row,
                item.col,
                item.height,
            )
        elif item.kind == "icon":
            _paint(canvas, ICON_MASKS[item.name], COLOURS[item.colour], item.row, item.col, 2)
        elif item.kind == "glyph":
            y, x = item.row * CELL, item.col * CELL
            canvas[y : y + CELL, x : x + CELL] = TILE
            _paint(canvas, GLYPH_MASKS[item.name], INK, item.row, item.col, 1)
        else:
            raise ValueError(f"unknown item kind {item.kind!r}")
    return canvas


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode an RGB uint8 array as PNG (no metadata, so equal pixels give equal bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
