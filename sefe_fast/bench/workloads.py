"""The synthetic RegLoRA workloads every benchmark and profiler measures on.

- `random_lora(k, d, r, seed)`: a seeded (B, A) pair with a trained-LoRA-like scale;
- task t's key elements on a k×d matrix are the top `ratio` of |B·A| of
  `random_lora(k, d, r, seed=TASK_SEED_BASE + t)` (`task_selection`, cached on disk so that
  `python -m sefe_fast.profile_memory` and the benchmark suite in `bench/` share them;
  `make_masks` merges several without the cache);
- the factors being trained (the penalty's inputs) are `random_lora(..., seed=CURRENT_SEED)`.

Masks are real selections, not uniform random positions: the compact size and the
penalty's cost depend on how the selected positions cluster.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from sefe_fast.paper_defaults import MASK_RATIO
from sefe_fast.reglora import (
    KeyElements,
    KeyElementsFileError,
    load_key_elements,
    merge_key_elements,
    save_key_elements,
    select_key_elements,
)
from sefe_fast.reglora.storage import FORMAT_VERSION as KE_FORMAT_VERSION

TASK_SEED_BASE = 1000  # selection of task t uses random_lora(..., seed=TASK_SEED_BASE + t)
CURRENT_SEED = 1  # the factors being trained (the penalty's inputs)
CACHE_VERSION = 1


def random_lora(k: int, d: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B k×r, A r×d) fp32 pair with a trained-LoRA-like scale, from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    lora_B = torch.randn(k, r, generator=gen) * 0.01
    lora_A = torch.randn(r, d, generator=gen) / d**0.5
    return lora_B, lora_A


def make_masks(
    k: int, d: int, r: int, tasks: int, ratio: float = MASK_RATIO, seed: int = 0
) -> KeyElements:
    """Merged key elements of `tasks` selections from independent random LoRA pairs
    (task t: seed + TASK_SEED_BASE + t; not cached)."""
    return merge_key_elements(
        [
            select_key_elements(*random_lora(k, d, r, seed + TASK_SEED_BASE + t), ratio)
            for t in range(tasks)
        ]
    )


def default_cache_dir() -> Path:
    """$SEFE_FAST_CACHE/selections, else ~/.cache/sefe_fast/selections."""
    root = os.environ.get("SEFE_FAST_CACHE") or Path.home() / ".cache" / "sefe_fast"
    return Path(root) / "selections"


def task_selection(
    k: int, d: int, rank: int, ratio: float, task: int, cache_dir: Path | None = None
) -> KeyElements:
    """The key elements task `task` would leave on a k×d matrix: top `ratio` of |B·A| for
    `random_lora(k, d, rank, seed=TASK_SEED_BASE + task)`, streamed selection.

    Cached as a key-elements file in `cache_dir` (None: no cache). A cache file that cannot
    be read is reported on stderr and recomputed.
    """
    path = None
    if cache_dir is not None:
        # the key-elements file format is part of the name: a new format never reads old files
        name = f"v{CACHE_VERSION}.{KE_FORMAT_VERSION}_{k}x{d}_r{rank}_m{ratio:g}_t{task}"
        path = Path(cache_dir) / f"{name}.safetensors"
        if path.is_file():
            try:
                return load_key_elements(path, expected_shapes={"matrix": (k, d)})["matrix"]
            except KeyElementsFileError as exc:
                print(f"profile_memory: recomputing a bad cache file: {exc}", file=sys.stderr)
    lora_B, lora_A = random_lora(k, d, rank, seed=TASK_SEED_BASE + task)
    ke = select_key_elements(lora_B, lora_A, ratio)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_key_elements({"matrix": ke}, path)
    return ke
