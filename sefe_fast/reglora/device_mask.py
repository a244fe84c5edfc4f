"""DeviceMask: the merged key positions of one matrix as the GPU kernels read them.

For ΔW = B·A (k×d) and merged positions with multiplicities c(i, j) (n = Σ c, duplicates
counted, docs/reference.md §2) a DeviceMask splits every count into a packed plane part and
a list part:

    c(i, j) = c_plane(i, j) + c_extra(i, j),
    c_plane(i, j) = (plane[i, j // E] >> (bits · (j % E))) & (2^bits − 1),   E = 32 // bits,

for a binary plane, and for the trit plane (code TRIT_PLANE = 3: counts 0–2, E = 20)

    c_plane(i, j) = ⌊byte / 3^(s mod 5)⌋ mod 3,  byte = (plane[i, j // 20] >> 8·⌊s / 5⌋) & 255,
    s = j mod 20,

with `plane` int32 [k, ceil(d / E)] (columns ≥ d of the last word are 0; masks are applied
after the shift, so the sign of the int32 word does not matter) and `extra` an ordinary
`PositionPlan` whose counts are c − c_plane > 0 (its own n_total is *not* the mean's
denominator; `DeviceMask.n_total` is). The penalty keeps the official semantics exactly:

    penalty = (1/n) · [Σ_{i,j} c_plane(i, j)·|ΔW(i, j)| + Σ_{u ∈ extra} c_u·|ΔW_u|].

Three representations (bits):
- 0: no plane, `extra` is the whole plan — the gather kernels' input (9 B per distinct
  position), cheapest at low density;
- 1: a union bit plane (k·d/8 bytes) plus, in `extra`, the positions chosen by more than one
  task with count − 1;
- 2: a count plane (k·d/4 bytes, counts up to 3) plus, in `extra`, anything above 3 —
  between the two in memory, and its list stays short while few positions were chosen by
  more than three tasks;
- 3 (the trit plane): counts 0–2 in base 3, five per byte (3⁵ = 243 ≤ 256), k·d/5 bytes
  (1.6 bits per entry), plus, in `extra`, anything above 2 — 20 % smaller than the 2-bit
  plane, and its list (positions chosen by three or more tasks) stays short much longer
  than the 1-bit plane's (chosen by two or more);
- 4: a count plane (k·d/2 bytes, counts up to 15) plus, in `extra`, anything above 15.

Why (LLaVA-7B, 224 matrices, 6.48·10⁹ entries, while training task 8 = 7 earlier masks of
2 %): the official int64 pairs take 14.5 GB; a uint8 count plane 6.5 GB; the 4-bit plane
3.24 GB; per-task bit planes 0.81 GB per task (5.7 GB); the union bit plane 0.81 GB plus a
list of the positions chosen more than once — with independent tasks 1 − 0.98⁷ − 7·0.02·0.98⁶
= 0.79 % of the entries, 9 B each = 0.46 GB — about 1.3 GB; the trit plane 1.30 GB plus
the positions chosen three times or more (0.026 %, 15 MB) — about the same bytes, but a list
the gather kernels get through 30× faster (sefe_fast.roofline). The list grows with the overlap
between tasks, so `choose_bits` takes the 4-bit plane for a matrix whose list would cost more
than the 4-bit plane's extra half byte per entry: the total never exceeds 3.24 GB plus the
offsets, whatever the overlap, and is never more than the official masks (16 B per chosen
entry ≥ 0.32 B per matrix entry from the first task on, against ≤ 0.5 B). Whether a matrix
gets a plane at all (tile kernels) or only the plan (gather kernels) is the roofline model's
call (`sefe_fast.roofline.preferred_kernel`), from its density.

Everything is built by streaming the KeyElements row block by row block
(`KeyElements.unique_row_blocks`): one pass for the statistics, one per part; the plane is
filled in place (disjoint bit fields add without carries, so an int32 index_add is an OR),
the list written slot by slot (`plan_from_blocks`). `pack_counts` / `unpack_counts` are the
plain dense encoder and decoder, the reference the streamed build is tested against.

(Slightly past 450 lines: the format, its reference codec, its builders and its grouped
form `DeviceMaskGroup` are one contract with the kernels and are kept together.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sefe_fast.plane_format import (
    PLANE_BITS,
    PLANE_CAPS,
    TRIT_PLANE,
    TRITS_PER_BYTE,
    check_plane_bits,
    entries_per_word,
    plane_label,
    plane_width,
)
from sefe_fast.position_plan import (
    MaskStats,
    PositionPlan,
    RowBlocks,
    count_dtype,
    index_dtype,
    mask_stats,
    plan_from_blocks,
)
from sefe_fast.reglora.key_elements import KeyElements
from sefe_fast.roofline import preferred_kernel

KERNELS = ("auto", "tile", "gather")
STAT_THRESHOLDS = (0, *sorted(PLANE_CAPS.values()))
_PACK_ROWS = 256  # rows packed / unpacked at once by the dense reference helpers


def plane_nbytes(shape: tuple[int, int], bits: int) -> int:
    """Bytes of an int32 [k, ceil(d / E)] plane (0 for bits = 0)."""
    return 0 if bits == 0 else 4 * int(shape[0]) * plane_width(shape[1], bits)


def plan_nbytes_for(shape: tuple[int, int], num_unique: int, max_count: int) -> int:
    """Bytes a PositionPlan of `num_unique` positions of a k×d matrix will take (0 if none:
    an empty list is not built): rows, cols, counts, col_order per position, plus offsets."""
    if num_unique == 0:
        return 0
    k, d = int(shape[0]), int(shape[1])
    per_position = (
        index_dtype(k).itemsize + index_dtype(d).itemsize + count_dtype(max_count).itemsize + 4
    )
    return num_unique * per_position + 4 * (k + 1) + 4 * (d + 1)


def _field_weights(bits: int, device: torch.device) -> torch.Tensor:
    """int64 [E]: what a count of 1 at slot t of a word adds to the word — 2^(bits·t) for a
    binary plane, 3^(t mod 5) · 2^(8·(t div 5)) for the trit plane. Slots never carry into
    each other (a count below the cap keeps its field, or its byte, in range), so a word is
    the plain sum Σ_t count_t · weight_t."""
    slots = torch.arange(entries_per_word(bits), dtype=torch.int64, device=device)
    if bits == TRIT_PLANE:
        return 3 ** (slots % TRITS_PER_BYTE) << (8 * (slots // TRITS_PER_BYTE))
    return torch.ones_like(slots) << (bits * slots)


def _as_int32_pattern(values: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) as int32 with the same bit pattern (bit 31 set → negative)."""
    return torch.where(values >= 1 << 31, values - (1 << 32), values).to(torch.int32)


def _decode_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., E] fields of int32 words [...] (the reference decoder of one word)."""
    slots = torch.arange(entries_per_word(bits), dtype=torch.int32, device=words.device)
    if bits == TRIT_PLANE:
        # mask after the shift: the int32 word's sign does not matter
        byte = (words.unsqueeze(-1) >> (8 * (slots // TRITS_PER_BYTE))) & 255
        return torch.div(byte, 3 ** (slots % TRITS_PER_BYTE), rounding_mode="floor") % 3
    return (words.unsqueeze(-1) >> (bits * slots)) & ((1 << bits) - 1)


def pack_counts(counts: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a dense uint8 [k, d] count matrix into an int32 [k, ceil(d / E)] plane (reference).

    Entry (i, j) is slot j % E of word (i, j // E): bits [bits·s, bits·(s + 1)) of a binary
    plane, base-3 digit s % 5 of byte s // 5 for the trit plane (`_field_weights`); every
    count must be ≤ the plane's cap (PLANE_CAPS). Plain torch, row block by row block.
    """
    check_plane_bits(bits)
    if counts.ndim != 2 or counts.dtype != torch.uint8:
        raise ValueError(
            f"pack_counts needs a 2-D uint8 count matrix, got {counts.dtype} {tuple(counts.shape)}"
        )
    k, d = counts.shape
    if counts.numel() and int(counts.max()) > PLANE_CAPS[bits]:
        raise ValueError(
            f"a count of {int(counts.max())} does not fit a {plane_label(bits)} plane "
            f"(at most {PLANE_CAPS[bits]})"
        )
    per_word, width = entries_per_word(bits), plane_width(d, bits)
    weights = _field_weights(bits, counts.device)
    plane = torch.empty(k, width, dtype=torch.int32, device=counts.device)
    for row0 in range(0, k, _PACK_ROWS):
        block = counts[row0 : row0 + _PACK_ROWS].to(torch.int64)
        padded = torch.nn.functional.pad(block, (0, width * per_word - d))
        words = (padded.reshape(block.shape[0], width, per_word) * weights).sum(dim=2)
        plane[row0 : row0 + _PACK_ROWS] = _as_int32_pattern(words)
    return plane


def unpack_counts(plane: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """Decode an int32 [k, ceil(d / E)] plane into uint8 [k, d] counts (reference decoder)."""
    check_plane_bits(bits)
    width = plane_width(d, bits)
    if plane.ndim != 2 or plane.dtype != torch.int32 or plane.shape[1] != width:
        raise ValueError(
            f"a {plane_label(bits)} plane of width {d} must be int32 [k, {width}], "
            f"got {plane.dtype} {tuple(plane.shape)}"
        )
    k = plane.shape[0]
    counts = torch.empty(k, d, dtype=torch.uint8, device=plane.device)
    for row0 in range(0, k, _PACK_ROWS):
        words = plane[row0 : row0 + _PACK_ROWS]
        fields = _decode_words(words, bits)
        counts[row0 : row0 + _PACK_ROWS] = fields.reshape(words.shape[0], -1)[:, :d].to(torch.uint8)
    return counts


@dataclass(frozen=True)
class DeviceMask:
    """One matrix's merged key positions as a packed plane plus a PositionPlan list.

    shape: (k, d) of ΔW = B·A; n_total: all merged positions, duplicates counted (the
    mean's denominator); bits: 0 (no plane, gather only), 1, 2, 3 (trit) or 4; plane: int32
    [k, ceil(d / E)] or None; extra: the positions whose count exceeds the plane's value,
    with the excess as count, or None when there are none. See the module docstring.
    """

    shape: tuple[int, int]
    n_total: int
    bits: int
    plane: torch.Tensor | None
    extra: PositionPlan | None

    def __post_init__(self) -> None:
        k, d = self.shape
        if self.bits == 0:
            if self.plane is not None:
                raise ValueError("a DeviceMask with bits = 0 has no plane")
        else:
            check_plane_bits(self.bits)
            width = plane_width(d, self.bits)
            plane = self.plane
            if plane is None or plane.dtype != torch.int32 or tuple(plane.shape) != (k, width):
                got = "None" if plane is None else f"{plane.dtype} {tuple(plane.shape)}"
                raise ValueError(
                    f"a {self.bits}-bit DeviceMask of shape {self.shape} needs an int32 "
                    f"[{k}, {width}] plane, got {got}"
                )
        if self.extra is not None and tuple(self.extra.shape) != tuple(self.shape):
            raise ValueError(f"extra plan has shape {self.extra.shape}, mask {self.shape}")

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors this mask holds (plane plus the extra plan's arrays)."""
        plane = 0 if self.plane is None else self.plane.numel() * self.plane.element_size()
        return plane + (0 if self.extra is None else self.extra.nbytes)

    @property
    def inv_n_total(self) -> float:
        """1 / n_total (1 for an empty mask, whose sums are 0 anyway)."""
        return 1.0 / max(self.n_total, 1)

    @property
    def kernel(self) -> str:
        """'tile' when the mask has a plane, else 'gather'."""
        return "gather" if self.bits == 0 else "tile"

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the mask holds (for memory accounting)."""
        held = [] if self.plane is None else [self.plane]
        if self.extra is not None:
            held += [
                self.extra.rows,
                self.extra.cols,
                self.extra.counts,
                self.extra.row_ptr,
                self.extra.col_order,
                self.extra.col_ptr,
            ]
        return held

    def to(self, device: torch.device | str) -> DeviceMask:
        """A copy with every tensor on `device`."""
        return DeviceMask(
            shape=self.shape,
            n_total=self.n_total,
            bits=self.bits,
            plane=None if self.plane is None else self.plane.to(device),
            extra=None if self.extra is None else self.extra.to(device),
        )

    def dense_counts(self) -> torch.Tensor:
        """int32 [k, d]: c(i, j) = plane part + extra part (reference decoding, dense)."""
        k, d = self.shape
        device = self.plane.device if self.plane is not None else "cpu"
        if self.plane is None:
            counts = torch.zeros(k, d, dtype=torch.int32, device=device)
        else:
            counts = unpack_counts(self.plane, self.bits, d).to(torch.int32)
        if self.extra is not None and self.extra.num_unique:
            extra = self.extra.to(counts.device)
            counts.index_put_(
                (extra.rows.long(), extra.cols.long()),
                extra.counts.to(torch.int32),
                accumulate=True,
            )
        return counts


def reference_mask_penalty(
    lora_B: torch.Tensor, lora_A: torch.Tensor, mask: DeviceMask
) -> torch.Tensor:
    """(1/n)·Σ c(i, j)·|ΔW(i, j)| with ΔW = B·A in fp32 and the mask decoded densely — the
    plain torch reference for a DeviceMask (equal to the official mean over positions)."""
    delta = lora_B.float() @ lora_A.float()
    counts = mask.dense_counts().to(delta.device, torch.float32)
    return (counts * delta.abs()).sum() * mask.inv_n_total


def mask_statistics(key_elements: KeyElements) -> MaskStats:
    """One streamed pass: totals and per-threshold counts (0, 1, 3, 15) that every
    representation's size follows from."""
    return mask_stats(key_elements.shape, key_elements.unique_row_blocks, STAT_THRESHOLDS)


def representation_nbytes(stats: MaskStats, bits: int) -> int:
    """Bytes a DeviceMask with `bits` would hold for a mask with these statistics."""
    if bits == 0:
        return plan_nbytes_for(stats.shape, stats.num_unique, stats.max_count)
    cap = PLANE_CAPS[bits]
    listed = stats.above[cap]
    return plane_nbytes(stats.shape, bits) + plan_nbytes_for(
        stats.shape, listed, max(stats.max_count - cap, 0)
    )


def choose_bits(stats: MaskStats, kernel: str) -> int:
    """The smallest plane for a tile-kernel mask (bytes of plane plus list; ties go to the
    lower code: the union bit plane first); 0 for `kernel="gather"`. Time is weighed
    against bytes by `RegLoRA.choose_planes` under a budget, not here."""
    if kernel not in ("tile", "gather"):
        raise ValueError(f"choose_bits needs kernel 'tile' or 'gather', got {kernel!r}")
    if kernel == "gather":
        return 0
    return min(PLANE_BITS, key=lambda bits: (representation_nbytes(stats, bits), bits))


def resolve_kernel(
    stats: MaskStats,
    kernel: str,
    rank: int,
    factor_dtype: torch.dtype,
    gpu: str | None = None,
) -> str:
    """'tile' or 'gather' for this mask: forced, or ("auto") the roofline model's faster
    choice at the mask's distinct-position density (`sefe_fast.roofline.preferred_kernel`)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown DeviceMask kernel {kernel!r}; choose one of {KERNELS}")
    if kernel != "auto":
        return kernel
    k, d = stats.shape
    density = stats.num_unique / (k * d)
    return preferred_kernel(k, d, rank, density, factor_dtype, gpu)


def build_device_mask(
    key_elements: KeyElements,
    kernel: str = "auto",
    rank: int = 128,
    factor_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    gpu: str | None = None,
    stats: MaskStats | None = None,
    bits: int | None = None,
) -> DeviceMask:
    """The DeviceMask of `key_elements` on `device`, built by streaming on the host.

    kernel: "tile" (a plane, bits from `choose_bits`), "gather" (bits 0: the whole plan) or
    "auto" (the roofline model's choice for `rank`, `factor_dtype` and `gpu`, a name from
    `sefe_fast.roofline.GPUS`; None: the model's default GPU). `stats`: a previous
    `mask_statistics(key_elements)`, to skip that pass. `bits`: force a representation
    (0, 1, 2, 3 = trit, or 4) instead of choosing one. Each part goes to `device` as soon as it is built,
    so the host holds at most one part at a time. The extra plan's own n_total is set to
    the mask's n_total, so the gather kernels' 1/n on it alone is already the mask's.
    """
    if not isinstance(key_elements, KeyElements):
        raise TypeError(f"expected KeyElements, got {type(key_elements).__name__}")
    shape = key_elements.shape
    stats = mask_statistics(key_elements) if stats is None else stats
    if stats.shape != shape:
        raise ValueError(f"statistics are for a {stats.shape} matrix, key elements {shape}")
    if bits is None and stats.n_total == 0:
        bits = 0  # nothing to hold: no plane, no list
    if bits is None:
        bits = choose_bits(stats, resolve_kernel(stats, kernel, rank, factor_dtype, gpu))
    elif bits != 0:
        check_plane_bits(bits)
    blocks = key_elements.unique_row_blocks
    plane = None if bits == 0 else build_plane(shape, blocks, bits, device)
    threshold = 0 if bits == 0 else PLANE_CAPS[bits]
    extra = None
    if stats.above[threshold]:
        extra = plan_from_blocks(shape, blocks, stats.n_total, threshold, stats).to(device)
    return DeviceMask(shape=shape, n_total=stats.n_total, bits=bits, plane=plane, extra=extra)


def build_plane(
    shape: tuple[int, int], blocks: RowBlocks, bits: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """int32 [k, ceil(d / E)]: min(count, cap) of every position, packed, streamed from row
    blocks of (linear, counts). Positions are distinct, so each slot is written once and an
    int32 index_add of the weighted counts (`_field_weights`) is the packed word: slots
    never carry into each other."""
    check_plane_bits(bits)
    k, d = int(shape[0]), int(shape[1])
    per_word, width = entries_per_word(bits), plane_width(d, bits)
    cap = PLANE_CAPS[bits]
    weights = _field_weights(bits, torch.device("cpu"))
    plane = torch.zeros(k * width, dtype=torch.int32)
    for linear, counts in blocks():
        if linear.numel() == 0:
            continue
        rows = torch.div(linear, d, rounding_mode="floor")
        cols = linear - rows * d
        fields = _as_int32_pattern(counts.clamp(max=cap).to(torch.int64) * weights[cols % per_word])
        plane.index_add_(0, rows * width + torch.div(cols, per_word, rounding_mode="floor"), fields)
    return plane.reshape(k, width).to(device)


@dataclass(frozen=True)
class DeviceMaskGroup:
    """The DeviceMasks of M same-shape matrices with one `bits`, as the grouped kernels read
    them — the only device copy (nothing is kept per matrix besides this).

    planes: M int32 planes (empty for bits = 0); inv_n: fp32 [M], 1/n_total of each whole
    mask; n_total: per matrix; extra: one GroupedPositionPlan (kernels/reglora_penalty.py)
    over the matrices `extra_members` (indices into the M) that have listed positions, its
    offsets shifted per matrix and its inv_n the masks' 1/n_total; None when none has any.
    """

    shape: tuple[int, int]
    bits: int
    n_total: tuple[int, ...]
    planes: tuple[torch.Tensor, ...]
    inv_n: torch.Tensor
    extra: object | None
    extra_members: tuple[int, ...]

    @property
    def num_matrices(self) -> int:
        """M, the matrices of the group."""
        return len(self.n_total)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the group holds (planes, inv_n, the grouped extra plan's arrays)."""
        held = [*self.planes, self.inv_n]
        if self.extra is not None:
            e = self.extra
            held += [e.rows, e.cols, e.counts, e.row_ptr, e.col_order, e.col_ptr, e.inv_n]
        return held

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the group holds."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


def build_device_mask_group(
    key_elements: list[KeyElements],
    bits: int,
    device: torch.device | str,
    stats: list[MaskStats] | None = None,
) -> DeviceMaskGroup:
    """Build the masks of same-shape matrices with `bits` straight into their grouped device
    form: each plane streamed and moved, each extra list streamed on the host (one matrix's
    list at a time) and copied into preallocated grouped device arrays."""
    from sefe_fast_kernels.reglora_penalty import GroupedPositionPlan

    if not key_elements:
        raise ValueError("build_device_mask_group needs at least one KeyElements")
    shape = key_elements[0].shape
    for index, ke in enumerate(key_elements):
        if ke.shape != shape:
            raise ValueError(f"matrix {index} has shape {ke.shape}, matrix 0 has {shape}")
    stats = [mask_statistics(ke) for ke in key_elements] if stats is None else list(stats)
    threshold = 0 if bits == 0 else PLANE_CAPS[bits]
    n_total = tuple(s.n_total for s in stats)
    inv_n = torch.tensor([1.0 / max(n, 1) for n in n_total], dtype=torch.float32)
    planes = (
        tuple(build_plane(shape, ke.unique_row_blocks, bits, device) for ke in key_elements)
        if bits
        else ()
    )
    members = tuple(i for i, s in enumerate(stats) if s.above[threshold])
    extra = None
    if members:
        k, d = shape
        sizes = [stats[i].above[threshold] for i in members]
        starts = [0]
        for size in sizes[:-1]:
            starts.append(starts[-1] + size)
        total = starts[-1] + sizes[-1]
        if total >= 2**31:
            raise ValueError(f"{total} listed positions in one group overflow int32 offsets")
        largest = max(stats[i].max_count for i in members) - threshold
        rows = torch.empty(total, dtype=index_dtype(k), device=device)
        cols = torch.empty(total, dtype=index_dtype(d), device=device)
        counts = torch.empty(total, dtype=count_dtype(largest), device=device)
        col_order = torch.empty(total, dtype=torch.int32, device=device)
        row_ptr = torch.empty(len(members), k + 1, dtype=torch.int32, device=device)
        col_ptr = torch.empty(len(members), d + 1, dtype=torch.int32, device=device)
        for slot, (i, start, size) in enumerate(zip(members, starts, sizes)):
            plan = plan_from_blocks(
                shape, key_elements[i].unique_row_blocks, n_total[i], threshold, stats[i]
            )
            rows[start : start + size] = plan.rows.to(device)
            cols[start : start + size] = plan.cols.to(device)
            counts[start : start + size] = plan.counts.to(device=device, dtype=counts.dtype)
            col_order[start : start + size] = (plan.col_order + start).to(device)
            row_ptr[slot] = (plan.row_ptr + start).to(device)
            col_ptr[slot] = (plan.col_ptr + start).to(device)
            del plan
        extra = GroupedPositionPlan(
            shape=(k, d),
            rows=rows,
            cols=cols,
            counts=counts,
            row_ptr=row_ptr,
            col_order=col_order,
            col_ptr=col_ptr,
            inv_n=inv_n[list(members)].to(device),
            num_unique=tuple(sizes),
            n_total=tuple(n_total[i] for i in members),
        )
    return DeviceMaskGroup(
        shape=shape,
        bits=bits,
        n_total=n_total,
        planes=planes,
        inv_n=inv_n.to(device),
        extra=extra,
        extra_members=members,
    )
