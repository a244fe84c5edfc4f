"""KeyElements: the key positions of one LoRA matrix ΔW = B·A, stored compactly.

The official implementation keeps every selected position as an int64 (row, col) pair:
16 bytes per entry, about 2 GB per task for LLaVA-7B (docs/reference.md §2). Here one task's
positions ("a segment") are kept as their sorted row-major linear indices, delta-encoded:

    gaps[0] = linear[0] + 1,   gaps[i] = linear[i] - linear[i-1]   (so gaps are ≥ 0)

Each gap is one uint8; a gap ≥ 255 is written as the marker 255 and its true value goes,
in order, into an int32 escape stream (int64 when k·d ≥ 2³¹). At a 2 % density the mean
gap is 50 and P(gap ≥ 255) ≈ 0.98²⁵⁴ ≈ 0.6 %, so a random mask costs about 1.03 bytes per
entry. The worst case is bounded too: the gaps sum to at most k·d = n / density, so at most
n / (255·density) gaps escape — ≤ 0.2·n at 2 %, i.e. ≤ 1.8 bytes per entry for *any* 2 % mask.
A gap of 0 (a repeated position) is allowed, so one segment can hold any multiset.

Merged key elements (all earlier tasks) are the concatenation of the tasks' segments:
duplicates across tasks are kept and counted, as in the official code.

Everything derived from them (the CPU `PositionPlan`, the GPU `DeviceMask`) is built by
streaming: `unique_row_blocks` decodes every segment chunk by chunk and yields the distinct
positions of one block of rows at a time, so no int64 array over all n positions is ever
held. Only the CPU plan is cached here (the torch backend's working copy); device copies
belong to whoever evaluates on the device (the regularizer), so there is one of each.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from sefe_fast.position_plan import PositionPlan, plan_from_blocks

ESCAPE = 255  # uint8 marker: "the real gap is the next value of the escape stream"
DECODE_CHUNK = 1 << 16  # gaps decoded at once when streaming a segment (512 KiB as int64)
BLOCK_ENTRIES = 1 << 20  # matrix cells (rows × d) per row block when streaming a mask


def _escape_dtype(shape: tuple[int, int]) -> torch.dtype:
    """int32 escapes suffice while every linear index (and gap) fits below 2³¹."""
    return torch.int32 if shape[0] * shape[1] < 2**31 else torch.int64


@dataclass(frozen=True)
class Segment:
    """One task's positions: uint8 gaps (with ESCAPE markers) and the escaped gap values.

    gaps: uint8 [n]; escapes: int32/int64 [number of gaps equal to ESCAPE]. CPU tensors.
    """

    gaps: torch.Tensor
    escapes: torch.Tensor

    def __len__(self) -> int:
        return int(self.gaps.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of compact storage (gaps plus escapes)."""
        return int(self.gaps.numel() * self.gaps.element_size()) + int(
            self.escapes.numel() * self.escapes.element_size()
        )

    def linear(self) -> torch.Tensor:
        """The sorted row-major linear indices, int64 [n] (duplicates kept)."""
        gaps = self.gaps.to(torch.int64)
        is_escape = self.gaps == ESCAPE
        gaps[is_escape] = self.escapes.to(torch.int64)
        return torch.cumsum(gaps, 0) - 1


class _SegmentReader:
    """Decodes one segment in chunks of DECODE_CHUNK gaps, handing out sorted linear
    indices below a growing bound (`take_below`)."""

    def __init__(self, segment: Segment) -> None:
        self._gaps = segment.gaps
        self._escapes = segment.escapes
        self._next_gap = 0
        self._next_escape = 0
        self._last = -1
        self._buffer = torch.empty(0, dtype=torch.int64)

    def _decode_chunk(self) -> bool:
        if self._next_gap >= self._gaps.numel():
            return False
        raw = self._gaps[self._next_gap : self._next_gap + DECODE_CHUNK]
        gaps = raw.to(torch.int64)
        is_escape = raw == ESCAPE
        n_escape = int(is_escape.sum())
        if n_escape:
            gaps[is_escape] = self._escapes[self._next_escape : self._next_escape + n_escape].to(
                torch.int64
            )
        values = torch.cumsum(gaps, 0) + self._last
        self._next_gap += int(raw.numel())
        self._next_escape += n_escape
        self._last = int(values[-1])
        self._buffer = values if self._buffer.numel() == 0 else torch.cat([self._buffer, values])
        return True

    def take_below(self, bound: int) -> torch.Tensor:
        """The next decoded indices that are < bound (int64, sorted)."""
        while (self._buffer.numel() == 0 or int(self._buffer[-1]) < bound) and (
            self._decode_chunk()
        ):
            pass
        cut = int(torch.searchsorted(self._buffer, bound))
        taken, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return taken


class GapEncoder:
    """Builds a Segment from sorted linear indices that arrive in pieces (e.g. row tiles).

    Pieces must be non-decreasing, within and across calls; each piece is encoded at once,
    so only the compact form is ever held for the whole matrix.
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self._escape_dtype = _escape_dtype(self.shape)
        self._last = -1
        self._gaps: list[torch.Tensor] = []
        self._escapes: list[torch.Tensor] = []

    def append(self, linear: torch.Tensor) -> None:
        """Encode the next piece: int64 [m] sorted linear indices, all ≥ the previous ones."""
        if linear.numel() == 0:
            return
        linear = linear.to(device="cpu", dtype=torch.int64)
        first = int(linear[0])
        if first < self._last:
            raise ValueError(f"linear indices must be sorted; got {first} after {self._last}")
        gaps = torch.empty_like(linear)
        gaps[0] = first - self._last
        torch.sub(linear[1:], linear[:-1], out=gaps[1:])
        if bool((gaps[1:] < 0).any()):
            raise ValueError("linear indices must be sorted in non-decreasing order")
        big = gaps >= ESCAPE
        self._escapes.append(gaps[big].to(self._escape_dtype))
        gaps.clamp_(max=ESCAPE)
        self._gaps.append(gaps.to(torch.uint8))
        self._last = int(linear[-1])

    def finish(self) -> Segment:
        """The encoded segment (empty if nothing was appended)."""
        gaps = torch.cat(self._gaps) if self._gaps else torch.empty(0, dtype=torch.uint8)
        escapes = (
            torch.cat(self._escapes) if self._escapes else torch.empty(0, dtype=self._escape_dtype)
        )
        return Segment(gaps=gaps, escapes=escapes)


def encode_sorted_linear(linear: torch.Tensor, shape: tuple[int, int]) -> Segment:
    """Encode non-decreasing int64 row-major linear indices of a k×d matrix as one Segment."""
    encoder = GapEncoder(shape)
    encoder.append(linear)
    return encoder.finish()


class KeyElements:
    """The key positions of one k×d matrix, possibly merged over several tasks.

    len(ke) is the number of positions with multiplicity (the penalty's denominator);
    `.indices()` gives them as int64 (row, col) pairs; `.nbytes` is the compact storage;
    `.plan(device)` is the PositionPlan the fast penalty backends evaluate (the CPU plan is
    cached; a plan for another device is built, moved and handed over, not kept here).
    """

    def __init__(self, shape: tuple[int, int], segments: Sequence[Segment] = ()) -> None:
        k, d = (int(s) for s in shape)
        if k <= 0 or d <= 0:
            raise ValueError(f"KeyElements shape must be positive, got {tuple(shape)}")
        self._shape = (k, d)
        self._segments = tuple(segments)
        self._plans: dict[str, PositionPlan] = {}

    # --- construction -------------------------------------------------------------------
    @classmethod
    def empty(cls, shape: tuple[int, int]) -> KeyElements:
        """No positions at all (a penalty over it is exactly 0)."""
        return cls(shape, ())

    @classmethod
    def from_linear(cls, linear: torch.Tensor, shape: tuple[int, int]) -> KeyElements:
        """One segment from row-major linear indices in any order (duplicates kept)."""
        k, d = int(shape[0]), int(shape[1])
        linear = torch.as_tensor(linear).reshape(-1).to(device="cpu", dtype=torch.int64)
        if linear.numel() and (int(linear.min()) < 0 or int(linear.max()) >= k * d):
            raise ValueError(f"linear indices fall outside the matrix shape {(k, d)}")
        linear = torch.sort(linear).values
        return cls((k, d), (encode_sorted_linear(linear, (k, d)),))

    @classmethod
    def from_indices(cls, indices: torch.Tensor, shape: tuple[int, int]) -> KeyElements:
        """One segment from [n, 2] (row, col) positions in any order (duplicates kept)."""
        k, d = int(shape[0]), int(shape[1])
        indices = torch.as_tensor(indices)
        if indices.ndim != 2 or indices.shape[1] != 2:
            raise ValueError(f"indices must have shape [n, 2], got {tuple(indices.shape)}")
        indices = indices.to(device="cpu", dtype=torch.int64)
        if indices.numel() and (
            int(indices[:, 0].min()) < 0
            or int(indices[:, 0].max()) >= k
            or int(indices[:, 1].min()) < 0
            or int(indices[:, 1].max()) >= d
        ):
            raise ValueError(f"indices fall outside the matrix shape {(k, d)}")
        return cls.from_linear(indices[:, 0] * d + indices[:, 1], (k, d))

    # --- inspection ---------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """(k, d): the shape of ΔW = B·A the positions index."""
        return self._shape

    @property
    def segments(self) -> tuple[Segment, ...]:
        """The per-task segments, in merge order."""
        return self._segments

    @property
    def num_segments(self) -> int:
        """How many task selections were merged into this object."""
        return len(self._segments)

    def __len__(self) -> int:
        return sum(len(s) for s in self._segments)

    @property
    def nbytes(self) -> int:
        """Bytes of the compact storage (all segments)."""
        return sum(s.nbytes for s in self._segments)

    def __repr__(self) -> str:
        n = len(self)
        per = f"{self.nbytes / n:.3f}" if n else "-"
        return (
            f"KeyElements(shape={self._shape}, n={n}, segments={self.num_segments}, "
            f"nbytes={self.nbytes}, bytes/entry={per})"
        )

    def linear(self) -> torch.Tensor:
        """Row-major linear indices, int64 [n], segment after segment (duplicates kept)."""
        if not self._segments:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat([s.linear() for s in self._segments])

    def indices(self) -> torch.Tensor:
        """(row, col) positions, int64 [n, 2], with multiplicity, segment after segment."""
        linear = self.linear()
        d = self._shape[1]
        rows = torch.div(linear, d, rounding_mode="floor")
        return torch.stack([rows, linear - rows * d], dim=1)

    def unique_row_blocks(
        self, block_entries: int = BLOCK_ENTRIES
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(linear, counts) for each block of max(1, block_entries // d) rows, in row order:
        the distinct positions of those rows as sorted int64 row-major linear indices, and
        how often each was chosen (int64). Segments are decoded chunk by chunk, so memory is
        O(block + DECODE_CHUNK), not O(n). Empty blocks are yielded too."""
        k, d = self._shape
        rows_per_block = max(1, int(block_entries) // d)
        readers = [_SegmentReader(s) for s in self._segments if len(s)]
        for row0 in range(0, k, rows_per_block):
            bound = min(row0 + rows_per_block, k) * d
            parts = [reader.take_below(bound) for reader in readers]
            parts = [part for part in parts if part.numel()]
            if not parts:
                empty = torch.empty(0, dtype=torch.int64)
                yield empty, empty
                continue
            linear = parts[0] if len(parts) == 1 else torch.sort(torch.cat(parts)).values
            unique, counts = torch.unique_consecutive(linear, return_counts=True)
            yield unique, counts

    def plan(self, device: torch.device | str | None = None) -> PositionPlan:
        """The PositionPlan of the merged positions on `device`. The CPU plan is built once
        and cached (the torch backend's copy); for another device a plan is built, moved
        and returned without keeping any copy here (the caller holds the device copy)."""
        key = str(torch.device(device)) if device is not None else "cpu"
        if key != "cpu":
            cpu = self._plans.get("cpu") or self._build_plan()
            return cpu.to(key)
        plan = self._plans.get("cpu")
        if plan is None:
            plan = self._build_plan()
            self._plans["cpu"] = plan
        return plan

    def _build_plan(self) -> PositionPlan:
        """A new CPU plan, streamed row block by row block (see `unique_row_blocks`)."""
        return plan_from_blocks(self._shape, self.unique_row_blocks, len(self))


def merge_key_elements(items: Iterable[KeyElements]) -> KeyElements:
    """Concatenate the positions of several tasks (official semantics: duplicates kept).

    A position chosen by two tasks is counted twice in the merged penalty's mean.
    """
    items = list(items)
    if not items:
        raise ValueError("merge_key_elements needs at least one KeyElements")
    shape = items[0].shape
    segments: list[Segment] = []
    for i, item in enumerate(items):
        if not isinstance(item, KeyElements):
            raise TypeError(f"item {i} is a {type(item).__name__}, not KeyElements")
        if item.shape != shape:
            raise ValueError(
                f"cannot merge key elements of different shapes: item 0 is {shape}, "
                f"item {i} is {item.shape}"
            )
        segments.extend(item.segments)
    return KeyElements(shape, segments)
