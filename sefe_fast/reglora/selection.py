"""Key-element selection: the top `ratio` fraction of |ΔW| = |B·A| (fp32), per matrix.

The official code runs `torch.topk` over the dense fp32 product (docs/reference.md §2); that is
`select_key_elements_dense`, kept as the reference. `select_key_elements` gives the same set
without ever holding ΔW: it streams row tiles of ΔW three times.

For non-negative floats the IEEE-754 bit pattern, read as an int32, orders like the value
(and NaN, as in `torch.topk`, lands above +inf). So the m-th largest |ΔW| is found exactly
by a two-level radix select over those bit patterns:

1. histogram of the high 16 bits over all entries -> the bin holding the m-th largest;
2. histogram of the low 16 bits of the entries in that bin -> the exact threshold t, the
   number of entries strictly above it, hence how many entries equal to t must be taken;
3. collection: every entry > t, and entries == t in row-major order until the count is
   reached (ties are broken by the lowest linear index), encoded straight into the
   compact KeyElements form tile by tile.

Extra memory is a few tile-sized buffers (2 MiB tiles by default) plus the compact
result, instead of the k×d product, its |·| and topk's workspace.

`backend="triton"` runs the same radix select as Triton kernels
(`sefe_fast_kernels.key_element_selection`): ΔW tiles recomputed in registers with
`tl.dot`, three histogram levels, then per-(row, column block) counts, an exclusive scan
and a compaction pass — no host synchronisation until the sorted positions are copied out
once. Same tie rule; on a GPU its fp32 rounding of ΔW may differ from this path's in the
last bit (see that module's rounding contract). `"auto"` picks it for CUDA tensors.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import torch

from sefe_fast.paper_defaults import MASK_RATIO
from sefe_fast.reglora.key_elements import GapEncoder, KeyElements, encode_sorted_linear
from sefe_fast.reglora.validation import check_factors

# Entries of ΔW computed at once (2 MiB of fp32): large enough that the per-op overhead (and
# thread synchronisation on a loaded machine) stays small, small against k×d.
DEFAULT_TILE_ELEMENTS = 1 << 19
_HI_BINS = 1 << 15  # high 16 bits of a non-negative float (sign bit clear)
_LO_BINS = 1 << 16

SELECTION_BACKENDS = ("auto", "torch", "triton")
TRITON_SELECTION_MODULE = "sefe_fast_kernels.key_element_selection"


def num_selected(shape: tuple[int, int], ratio: float) -> int:
    """How many entries a selection keeps: int(ratio·k·d), as the official code."""
    if not isinstance(ratio, int | float) or not (0.0 < float(ratio) <= 1.0):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    return int(float(ratio) * shape[0] * shape[1])


def select_key_elements_dense(
    lora_B: torch.Tensor, lora_A: torch.Tensor, ratio: float = MASK_RATIO
) -> KeyElements:
    """Official selection: `torch.topk` over the dense fp32 |B·A| (k×d in memory)."""
    k, _, d = check_factors(lora_B, lora_A)
    m = num_selected((k, d), ratio)
    if m == 0:
        return KeyElements.empty((k, d))
    delta = lora_B.float() @ lora_A.float()
    top = torch.topk(delta.abs().flatten(), m, sorted=False).indices
    return KeyElements.from_linear(top.cpu(), (k, d))


def _abs_bit_tiles(
    lora_B: torch.Tensor, lora_A32: torch.Tensor, tile_rows: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first row, int32 bit patterns of |ΔW| for a row tile, flattened)."""
    k = lora_B.shape[0]
    for r0 in range(0, k, tile_rows):
        tile = lora_B[r0 : r0 + tile_rows].float() @ lora_A32
        yield r0, tile.abs_().view(torch.int32).view(-1)


def resolve_selection_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' elsewhere; other names are checked and returned."""
    if backend not in SELECTION_BACKENDS:
        raise ValueError(
            f"unknown selection backend {backend!r}; choose one of {SELECTION_BACKENDS}"
        )
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


@torch.no_grad()
def select_key_elements(
    lora_B: torch.Tensor,
    lora_A: torch.Tensor,
    ratio: float = MASK_RATIO,
    *,
    tile_elements: int = DEFAULT_TILE_ELEMENTS,
    backend: str = "auto",
) -> KeyElements:
    """Positions of the int(ratio·k·d) largest |B·A| (fp32), never holding B·A.

    lora_B: k×r, lora_A: r×d, any float dtype, any (common) device. backend: "torch"
    (row tiles of `tile_elements` entries, this module), "triton" (the Triton kernels; CUDA,
    or CPU under TRITON_INTERPRET=1) or "auto" (triton on CUDA, torch elsewhere). The
    result equals the `torch.topk` set of `select_key_elements_dense` up to swaps of
    entries tied at the threshold (here broken by the lowest row-major index) or within
    rounding of it (tiles may round differently from one large matmul). Deterministic for
    a given input and backend.
    """
    k, _, d = check_factors(lora_B, lora_A)
    backend = resolve_selection_backend(backend, lora_B.device)
    m = num_selected((k, d), ratio)
    if m == 0:
        return KeyElements.empty((k, d))
    if backend == "triton":
        return _select_triton(lora_B, lora_A, m)
    lora_A32 = lora_A.float()
    tile_rows = max(1, int(tile_elements) // d)
    device = lora_B.device

    # Pass 1: histogram of the high 16 bits -> bin `hi` holding the m-th largest.
    hist_hi = torch.zeros(_HI_BINS, dtype=torch.int64, device=device)
    for _, bits in _abs_bit_tiles(lora_B, lora_A32, tile_rows):
        hist_hi += torch.bincount(bits >> 16, minlength=_HI_BINS)
    from_top = torch.cumsum(hist_hi.flip(0), 0)
    hi = _HI_BINS - 1 - int(torch.searchsorted(from_top, m))
    above_hi = int(from_top[_HI_BINS - 1 - hi]) - int(hist_hi[hi])  # entries in higher bins

    # Pass 2: histogram of the low 16 bits inside bin `hi` -> exact threshold bit pattern.
    hist_lo = torch.zeros(_LO_BINS, dtype=torch.int64, device=device)
    for _, bits in _abs_bit_tiles(lora_B, lora_A32, tile_rows):
        in_bin = bits[(bits >> 16) == hi]
        if in_bin.numel():
            hist_lo += torch.bincount(in_bin & 0xFFFF, minlength=_LO_BINS)
    from_top_lo = torch.cumsum(hist_lo.flip(0), 0)
    lo = _LO_BINS - 1 - int(torch.searchsorted(from_top_lo, m - above_hi))
    threshold = (hi << 16) | lo
    above = above_hi + int(from_top_lo[_LO_BINS - 1 - lo]) - int(hist_lo[lo])
    ties_left = m - above  # how many entries equal to the threshold to take, first ones first

    # Pass 3: collect, in row-major order, straight into the compact form.
    encoder = GapEncoder((k, d))
    for r0, bits in _abs_bit_tiles(lora_B, lora_A32, tile_rows):
        chosen = bits > threshold
        if ties_left > 0:
            tied = torch.nonzero(bits == threshold).view(-1)[:ties_left]
            chosen[tied] = True
            ties_left -= int(tied.numel())
        encoder.append(torch.nonzero(chosen).view(-1) + r0 * d)
    result = KeyElements((k, d), (encoder.finish(),))
    if len(result) != m:  # cannot happen unless the tiles changed between passes
        raise RuntimeError(f"streaming selection collected {len(result)} entries, expected {m}")
    return result


def _select_triton(lora_B: torch.Tensor, lora_A: torch.Tensor, m: int) -> KeyElements:
    """The Triton radix select; one copy of the m sorted positions to the host."""
    try:
        kernels = importlib.import_module(TRITON_SELECTION_MODULE)
    except ImportError as exc:
        raise RuntimeError(
            f"selection backend 'triton' needs {TRITON_SELECTION_MODULE}, which could not be "
            f"imported: {exc}. Use backend='torch' instead."
        ) from exc
    shape = (int(lora_B.shape[0]), int(lora_A.shape[1]))
    linear, placed = kernels.top_linear_indices(lora_B, lora_A, m)
    if int(placed) != m:  # cannot happen unless ΔW's tiles rounded differently between passes
        raise RuntimeError(f"Triton selection placed {int(placed)} entries, expected {m}")
    linear = linear.cpu()
    return KeyElements(shape, (encode_sorted_linear(linear, shape),))
