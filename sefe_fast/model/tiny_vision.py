"""Pretraining the tiny vision tower: our stand-in for CLIP's own pretraining.

LLaVA starts from a CLIP tower that already sees; the tiny tower starts from random
weights. Trained only through the LLM's caption loss (stage 0) it learned little: a linear
probe on its patch features told a cell's (colour, shape) apart only ~50 % of the time, while
the same probe on raw pixels is 100 % right. So stage 0 first trains the tower alone, with a
per-patch objective: each 8×8 patch is one cell of mini-CoIN's 4×4 grid, and a linear head on
the feature LLaVA reads (the last layer's hidden state, before `post_layernorm`) classifies
what the cell shows: item kind, name, colour, which quarter of a 2×2 item, or the background.
Scenes are drawn fresh every step (`stage0_scene`, its own seeded stream), so there is no
fixed training set to overfit. Costs seconds to a few minutes on a CPU.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sefe_fast.data.minicoin_render import (
    BACKGROUND,
    COLOURS,
    DARK_BACKGROUND,
    GLYPHS,
    GRID,
    ICONS,
    SHAPES,
    render,
)
from sefe_fast.data.minicoin_tasks import Scene, stage0_scene

BACKGROUND_NAMES = {
    BACKGROUND: "gray",
    DARK_BACKGROUND: "dark",
    **{v: k for k, v in COLOURS.items()},
}


def _cell_classes() -> list[str]:
    """Every label a patch can have (fixed order: the head's output index)."""
    classes = [f"empty|{name}" for name in BACKGROUND_NAMES.values()]
    classes += [f"glyph|{letter}" for letter in GLYPHS]
    for colour in COLOURS:
        for name in SHAPES:
            classes += [f"shape|{name}|{colour}|{q}" for q in range(5)]
        for name in ICONS:
            classes += [f"icon|{name}|{colour}|{q}" for q in range(1, 5)]
    return classes


CELL_CLASSES = _cell_classes()
CELL_INDEX = {label: index for index, label in enumerate(CELL_CLASSES)}


def cell_labels(scene: Scene) -> list[int]:
    """The class index of each of the 16 cells of `scene`, in reading order.

    A 1-cell item has quarter 0; a 2×2 item's cells have quarters 1–4 (reading order).
    Later items overwrite earlier ones, as `render` paints them.
    """
    background = BACKGROUND_NAMES[tuple(scene.background)]
    grid = [f"empty|{background}"] * (GRID * GRID)
    for item in scene.items:
        for dr in range(item.height):
            for dc in range(item.width):
                quarter = 0 if item.height == 1 else 1 + 2 * dr + dc
                if item.kind == "glyph":
                    label = f"glyph|{item.name}"
                else:
                    label = f"{item.kind}|{item.name}|{item.colour}|{quarter}"
                grid[(item.row + dr) * GRID + item.col + dc] = label
    return [CELL_INDEX[label] for label in grid]


def normalise_pixels(
    images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 images [N, H, W, 3] → CLIP-normalised pixel values [N, 3, H, W] (float32).

    The same values the tiny model's CLIP image processor gives for images already at its
    size (no resize, no crop); checked against the processor in tests.
    """
    x = torch.from_numpy(images).float().div_(255.0).permute(0, 3, 1, 2)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def draw_batch(
    rng: random.Random, n: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` fresh stage-0 scenes: pixel values [n, 3, 32, 32] and cell labels [n, 16]."""
    scenes = [stage0_scene(rng) for _ in range(n)]
    pixels = np.stack([render(s.items, s.background) for s in scenes])
    labels = torch.tensor([cell_labels(s) for s in scenes], dtype=torch.long)
    return normalise_pixels(pixels, mean, std), labels


def patch_features(vision_tower: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The patch features LLaVA reads (last layer, before `post_layernorm`, no CLS): [N, 16, D]."""
    out = vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[-1][:, 1:]


def pretrain_vision_tower(
    vision_tower: torch.nn.Module,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    progress: bool = True,
) -> dict[str, Any]:
    """Train `vision_tower` in place on per-cell classification; return its held-out accuracy.

    AdamW with linear warmup (5 %) and cosine decay; the linear head is thrown away after.
    Returns `{"cell_accuracy": fraction of held-out cells right, "object_cell_accuracy":
    the same over non-empty cells, "final_loss": nats}`.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    width = vision_tower.config.hidden_size
    head = torch.nn.Linear(width, len(CELL_CLASSES))
    params = [p for p in vision_tower.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    # Kept as trained for the shipped weights (warmup from 1/warmup, not transformers' 0), so
    # the README's rebuild command reproduces them.
    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    vision_tower.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc="stage 0a (vision tower)", disable=not progress)
    for _ in bar:
        pixels, labels = draw_batch(rng, batch_size, mean, std)
        logits = head(patch_features(vision_tower, pixels))
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.view(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vision_tower.eval()
    held_out = random.Random(seed + 1_000_003)
    with torch.no_grad():
        pixels, labels = draw_batch(held_out, 512, mean, std)
        predicted = head(patch_features(vision_tower, pixels)).argmax(-1)
    right = predicted == labels
    is_object = labels >= len(BACKGROUND_NAMES)  # the background classes come first
    return {
        "cell_accuracy": right.float().mean().item(),
        "object_cell_accuracy": right[is_object].float().mean().item(),
        "final_loss": loss.item(),
    }
