"""Key-element selection in Triton: the m largest |ΔW| = |B·A| (fp32) of one LoRA pair,
as sorted row-major linear indices, without ever writing ΔW.

Same set as `sefe_fast.reglora.selection` (the torch streaming radix select) and the
official dense `torch.topk` (docs/reference.md §2), with the same tie rule: entries equal
to the threshold are taken by lowest linear index.

Order: for non-negative floats the IEEE-754 bit pattern read as an int32 orders like the
value (NaN, whose |·| has the sign bit clear, lands above +inf, as in `torch.topk`). So
the threshold t (the bit pattern of the m-th largest |ΔW|) is found exactly by a radix
select over the 31 significant bits, in three levels of 11, 10 and 10 bits (the torch
path's two 16-bit levels would need 2¹⁶-bin histograms per program, too large for
registers and shared memory; 2¹¹ int32 bins are 8 KB, at the cost of one more pass):

    level ℓ: hist_ℓ[b] = #{ entries e : bits(e) >> (s_ℓ + w_ℓ) == prefix_ℓ,
                                         (bits(e) >> s_ℓ) & (2^w_ℓ − 1) == b }
    bin_ℓ    = the bin holding the `need_ℓ`-th largest of those entries (counted from the top)
    need_ℓ₊₁ = need_ℓ − #{ entries of the prefix in bins above bin_ℓ }
    prefix_ℓ₊₁ = prefix_ℓ · 2^w_ℓ + bin_ℓ                  (need_0 = m, prefix_0 = 0)

after which t = prefix_3 and `ties = need_3` entries equal to t are to be taken. Then:

    count:   gt[i, c], eq[i, c] = #{ e in row i, column block c : bits > t, bits == t }
    scan:    eq_before = exclusive cumsum of eq in row-major (i, c) order — linear order —
             take_eq = clamp(ties − eq_before, 0, eq), selected = gt + take_eq,
             offset = exclusive cumsum of selected
    write:   each (i, c) segment writes its entries > t and its first take_eq entries == t,
             in column order, at offset[i, c] onwards: the output is sorted.

Kernels (every one recomputes its ΔW tile in registers with `tl.dot` in "ieee" fp32, so
that it rounds like torch's fp32 matmul as closely as possible; bf16/fp16 factors are
widened to fp32 first, as the torch path's `.float()`):

- `_radix_histogram_kernel`: grid (⌈k/BLOCK_K⌉, ⌈d/BLOCK_D⌉); a per-program histogram of
  2^w bins (`tl.histogram`, registers/shared memory) added into a global int32 histogram
  with integer atomics — integer addition is associative, so the result is the same
  whatever the order programs run in; only non-empty bins are added.
- `_tile_count_kernel`: same grid; writes gt and eq per (row, column block).
- `_compact_kernel`: same grid; writes the chosen linear indices at their offsets.

Between the kernels the bin choice, the scans and the offsets are small torch ops on the
device (searchsorted and cumsum over ≤ 2048 bins and k·⌈d/BLOCK_D⌉ counts): there is no
host synchronisation until the launcher returns (the caller copies the result out once).
Device memory besides the result (8 B per selected entry): the int32 per-segment arrays,
about 24–32 B per segment (k·⌈d/64⌉ segments on CUDA: ≈ 0.4–0.5 B per ΔW entry, an
eighth of one fp32 ΔW), and the histograms — never a k×d tensor.

Rounding contract: the set equals the torch paths' wherever no two entries lie within
fp32 rounding of the threshold. On a GPU the per-tile FMA order of `tl.dot` may round ΔW
differently from cuBLAS (or MKL) in the last bit, which can swap entries whose |ΔW| differ
from t by about one ulp; exact ties (equal fp32 values in every path, e.g. B = 0) are
broken identically.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sefe_fast_kernels.reglora_penalty import AotLaunch

INTERPRET = bool(triton.knobs.runtime.interpret)

# (shift, width) of the three radix levels over the 31 bits of a non-negative float.
RADIX_LEVELS: tuple[tuple[int, int], ...] = ((20, 11), (10, 10), (0, 10))

# Tile sizes. Not autotuned: the count and write passes must use the same column blocks,
# and one config keeps the interpreter working. CUDA: 64×64 tiles (4096 entries per
# histogram), rank chunks of 32; compiled for sm_80/sm_90 with 0 spills
# (python -m sefe_fast.kernel_report). Interpreter: few, large programs (~1 ms each).
CUDA_CONFIG = {"BLOCK_K": 64, "BLOCK_D": 64, "BLOCK_R": 32, "num_warps": 4}
INTERPRET_CONFIG = {"BLOCK_K": 128, "BLOCK_D": 128, "BLOCK_R": 256, "num_warps": 4}


def launch_config() -> dict[str, int]:
    """The tile config the launcher uses in this process (interpreter or CUDA)."""
    return dict(INTERPRET_CONFIG if INTERPRET else CUDA_CONFIG)


@triton.jit
def _abs_delta_bits(
    b_ptr,
    a_ptr,
    K,
    D,
    R,
    stride_bk,
    stride_br,
    stride_ar,
    stride_ad,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """|ΔW| of this program's tile as int32 bit patterns, with its rows, cols and validity."""
    rows = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < K
    col_ok = cols < D
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        b = tl.load(
            b_ptr + rows[:, None].to(tl.int64) * stride_bk + ranks[None, :] * stride_br,
            mask=row_ok[:, None] & rank_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        a = tl.load(
            a_ptr + ranks[:, None] * stride_ar + cols[None, :].to(tl.int64) * stride_ad,
            mask=rank_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(b, a, acc, input_precision="ieee")
    bits = tl.abs(acc).to(tl.int32, bitcast=True)
    valid = row_ok[:, None] & col_ok[None, :]
    return bits, valid, rows, cols


@triton.jit
def _radix_histogram_kernel(
    b_ptr,  # [K, R], factors' dtype, any strides
    a_ptr,  # [R, D]
    prefix_ptr,  # int32 [1]: the bits above this level that an entry must have
    hist_ptr,  # int32 [NUM_BINS], accumulated (zeroed by the launcher)
    K,
    D,
    R,
    stride_bk,
    stride_br,
    stride_ar,
    stride_ad,
    SHIFT: tl.constexpr,
    NUM_BINS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    bits, valid, _, _ = _abs_delta_bits(
        b_ptr, a_ptr, K, D, R, stride_bk, stride_br, stride_ar, stride_ad,
        BLOCK_K, BLOCK_D, BLOCK_R,
    )  # fmt: skip
    prefix = tl.load(prefix_ptr)
    in_prefix = valid & ((bits >> SHIFT) // NUM_BINS == prefix)
    digit = (bits >> SHIFT) & (NUM_BINS - 1)
    local = tl.histogram(
        tl.reshape(digit, [BLOCK_K * BLOCK_D]),
        NUM_BINS,
        mask=tl.reshape(in_prefix, [BLOCK_K * BLOCK_D]),
    )
    bins = tl.arange(0, NUM_BINS)
    tl.atomic_add(hist_ptr + bins, local, mask=local > 0, sem="relaxed")


@triton.jit
def _tile_count_kernel(
    b_ptr,
    a_ptr,
    threshold_ptr,  # int32 [1]: bit pattern of the m-th largest |ΔW|
    gt_ptr,  # int32 [K, n_col_blocks]: entries > threshold per (row, column block)
    eq_ptr,  # int32 [K, n_col_blocks]: entries == threshold
    K,
    D,
    R,
    stride_bk,
    stride_br,
    stride_ar,
    stride_ad,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    bits, valid, rows, _ = _abs_delta_bits(
        b_ptr, a_ptr, K, D, R, stride_bk, stride_br, stride_ar, stride_ad,
        BLOCK_K, BLOCK_D, BLOCK_R,
    )  # fmt: skip
    threshold = tl.load(threshold_ptr)
    gt = tl.sum((valid & (bits > threshold)).to(tl.int32), axis=1)
    eq = tl.sum((valid & (bits == threshold)).to(tl.int32), axis=1)
    n_col_blocks = tl.num_programs(1)
    slot = rows.to(tl.int64) * n_col_blocks + tl.program_id(1)
    tl.store(gt_ptr + slot, gt, mask=rows < K)
    tl.store(eq_ptr + slot, eq, mask=rows < K)


@triton.jit
def _compact_kernel(
    b_ptr,
    a_ptr,
    threshold_ptr,  # int32 [1]
    take_eq_ptr,  # int32 [K, n_col_blocks]: how many entries == threshold this segment takes
    offset_ptr,  # int32 [K, n_col_blocks]: where this segment's first entry goes
    out_ptr,  # int64 [m]: sorted linear indices (output)
    m,
    K,
    D,
    R,
    stride_bk,
    stride_br,
    stride_ar,
    stride_ad,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    bits, valid, rows, cols = _abs_delta_bits(
        b_ptr, a_ptr, K, D, R, stride_bk, stride_br, stride_ar, stride_ad,
        BLOCK_K, BLOCK_D, BLOCK_R,
    )  # fmt: skip
    threshold = tl.load(threshold_ptr)
    n_col_blocks = tl.num_programs(1)
    slot = rows.to(tl.int64) * n_col_blocks + tl.program_id(1)
    take_eq = tl.load(take_eq_ptr + slot, mask=rows < K, other=0)
    offset = tl.load(offset_ptr + slot, mask=rows < K, other=0)
    tied = valid & (bits == threshold)
    # Rank of each tied entry within its row segment (1-based), in column order.
    tie_rank = tl.cumsum(tied.to(tl.int32), axis=1)
    chosen = (valid & (bits > threshold)) | (tied & (tie_rank <= take_eq[:, None]))
    position = offset[:, None] + tl.cumsum(chosen.to(tl.int32), axis=1).to(tl.int64) - 1
    linear = rows[:, None].to(tl.int64) * D + cols[None, :]
    tl.store(out_ptr + position, linear, mask=chosen & (position < m))


def _check_runnable(tensor: torch.Tensor) -> None:
    if tensor.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"lora_B is on {tensor.device}: Triton key-element selection needs CUDA tensors "
            "(or TRITON_INTERPRET=1 set before triton is imported, for CPU tests)"
        )


def _pick_bin(
    hist: torch.Tensor, need: torch.Tensor, prefix: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """On the device: the bin holding the need-th largest entry; the next (need, prefix).

    need, prefix: 1-element tensors (indexing with them stays on the device: no sync).
    """
    from_top = torch.cumsum(hist.flip(0), 0, dtype=torch.int64)
    index = torch.searchsorted(from_top, need)  # first from_top ≥ need, [1]
    in_bin = hist.flip(0).index_select(0, index).long()
    above = from_top.index_select(0, index) - in_bin  # entries in bins above the chosen one
    chosen_bin = (hist.numel() - 1) - index
    return need - above, ((prefix.long() << width) | chosen_bin).to(torch.int32)


def top_linear_indices(
    lora_B: torch.Tensor, lora_A: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted row-major linear indices (int64 [m], on the factors' device) of the m largest
    |B·A| (fp32), ties at the threshold taken by lowest linear index; and the number of
    entries the compaction placed (int64 0-dim, on the device; equals m unless the passes
    disagreed, which the caller checks).

    lora_B: k×r, lora_A: r×d (fp32/bf16/fp16, any strides, same CUDA device — or CPU under
    TRITON_INTERPRET=1), 1 ≤ m ≤ k·d < 2³¹. No host synchronisation inside: the caller's
    copy of the result is the first.
    """
    k, rank = lora_B.shape
    d = lora_A.shape[1]
    if not 1 <= m <= k * d:
        raise ValueError(f"m must be in [1, k·d = {k * d}], got {m}")
    if k * d >= 2**31:
        raise ValueError(f"a {k}×{d} ΔW overflows the int32 histograms (k·d ≥ 2³¹)")
    _check_runnable(lora_B)
    config = launch_config()
    block_k, block_d, num_warps = config["BLOCK_K"], config["BLOCK_D"], config["num_warps"]
    block_r = max(16, min(config["BLOCK_R"], triton.next_power_of_2(rank)))
    grid = (triton.cdiv(k, block_k), triton.cdiv(d, block_d))
    device = lora_B.device
    common = (
        k,
        d,
        rank,
        lora_B.stride(0),
        lora_B.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
    )
    blocks = {"BLOCK_K": block_k, "BLOCK_D": block_d, "BLOCK_R": block_r, "num_warps": num_warps}

    need = torch.full((1,), m, dtype=torch.int64, device=device)
    prefix = torch.zeros(1, dtype=torch.int32, device=device)
    for shift, width in RADIX_LEVELS:
        hist = torch.zeros(1 << width, dtype=torch.int32, device=device)
        _radix_histogram_kernel[grid](
            lora_B, lora_A, prefix, hist, *common, SHIFT=shift, NUM_BINS=1 << width, **blocks
        )
        need, prefix = _pick_bin(hist, need, prefix, width)
    threshold, ties = prefix, need

    gt = torch.empty(k, grid[1], dtype=torch.int32, device=device)
    eq = torch.empty(k, grid[1], dtype=torch.int32, device=device)
    _tile_count_kernel[grid](lora_B, lora_A, threshold, gt, eq, *common, **blocks)
    # Counts, scans and offsets fit in int32: every one is at most k·d < 2³¹.
    eq_flat = eq.view(-1)
    eq_before = torch.cumsum(eq_flat, 0, dtype=torch.int32) - eq_flat  # row-major = linear
    take_eq = torch.minimum((ties.to(torch.int32) - eq_before).clamp_(min=0), eq_flat)
    selected = gt.view(-1) + take_eq
    offset = torch.cumsum(selected, 0, dtype=torch.int32) - selected

    out = torch.empty(m, dtype=torch.int64, device=device)
    _compact_kernel[grid](lora_B, lora_A, threshold, take_eq, offset, out, m, *common, **blocks)
    return out, selected.sum(dtype=torch.int64)


def aot_launches(
    k: int = 4096, d: int = 4096, rank: int = 128, dtype: torch.dtype = torch.bfloat16
) -> list[AotLaunch]:
    """Representative launches of every kernel in this file (default: a LLaVA-7B q/k/v/o
    matrix, r = 128, contiguous factors of `dtype`), from tiny placeholder tensors."""

    def tensor(tensor_dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(16, dtype=tensor_dtype)

    factor, i32, i64 = tensor(dtype), tensor(torch.int32), tensor(torch.int64)
    shape_args = {
        "K": k,
        "D": d,
        "R": rank,
        "stride_bk": rank,
        "stride_br": 1,
        "stride_ar": d,
        "stride_ad": 1,
    }
    blocks = {
        "BLOCK_K": CUDA_CONFIG["BLOCK_K"],
        "BLOCK_D": CUDA_CONFIG["BLOCK_D"],
        "BLOCK_R": max(16, min(CUDA_CONFIG["BLOCK_R"], triton.next_power_of_2(rank))),
    }
    configs = [({}, CUDA_CONFIG["num_warps"])]
    launches = [
        AotLaunch(
            kernel=_radix_histogram_kernel,
            args={"b_ptr": factor, "a_ptr": factor, "prefix_ptr": i32, "hist_ptr": i32}
            | shape_args,
            constexprs={"SHIFT": shift, "NUM_BINS": 1 << width} | blocks,
            configs=configs,
        )
        for shift, width in RADIX_LEVELS[:2]  # the 10-bit levels compile alike
    ]
    launches.append(
        AotLaunch(
            kernel=_tile_count_kernel,
            args={
                "b_ptr": factor,
                "a_ptr": factor,
                "threshold_ptr": i32,
                "gt_ptr": i32,
                "eq_ptr": i32,
            }
            | shape_args,
            constexprs=blocks,
            configs=configs,
        )
    )
    launches.append(
        AotLaunch(
            kernel=_compact_kernel,
            args={
                "b_ptr": factor,
                "a_ptr": factor,
                "threshold_ptr": i32,
                "take_eq_ptr": i32,
                "offset_ptr": i32,
                "out_ptr": i64,
                "m": int(0.02 * k * d),
            }
            | shape_args,
            constexprs=blocks,
            configs=configs,
        )
    )
    return launches
