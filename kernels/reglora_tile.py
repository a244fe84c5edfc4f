"""Dense-tile fused Triton kernels for the RegLoRA penalty on a packed count plane.

For one LoRA pair (B: k×r, A: r×d), ΔW = B·A, and a count plane packed into int32 words
(`DeviceMask.plane` of sefe_fast/reglora/device_mask.py; semantics: docs/reference.md §2)

    c(i, j) = (plane[i, j // E] >> (bits · (j mod E))) & (2^bits − 1),   E = 32 / bits,

(bits 1, 2 or 4), or for the trit plane (code 3: counts 0–2, five base-3 digits per byte,
E = 20; 1.6 bits per entry) c(i, j) = ⌊byte / 3^(s mod 5)⌋ mod 3 with s = j mod E and
byte = (plane[i, j // E] >> 8·⌊s / 5⌋) & 255,

the kernels compute, with inv_n = 1/n_total of the matrix's whole mask (the plane is one
part of it; the positions of `DeviceMask.extra` go through the gather kernels with the
same inv_n) and g the upstream gradient:

    value   = inv_n · Σ_{i,j} c(i,j) · |ΔW(i,j)|
    S(i, j) = g · inv_n · c(i,j) · sign(ΔW(i,j))        (sign(0) = 0, as torch.abs's gradient)
    ∂/∂B    = S · Aᵀ   (k×r)          ∂/∂A = Bᵀ · S   (r×d)

ΔW is never stored. Every kernel forms its BLOCK_M × BLOCK_N tile of ΔW on tensor cores with
`tl.dot` in fp32 accumulation, decodes the tile's counts from one contiguous load of the
plane words it covers by shifts (the trit plane: a word per count, a shift and two integer
multiplies), uses the tile and drops it. Three kernels:

- `_tile_fwd_kernel` (value only: no gradient will be needed), grid (row blocks, column
  blocks, matrices): one fp32 partial Σ c·|ΔW| per program, ΔW in rank steps of BLOCK_K
  (the rank padded by masked zero loads to a multiple of BLOCK_K ≥ 16, the K tl.dot needs).
- `_tile_fwd_grad_b_kernel` (training forward), grid (row blocks, rank chunks, matrices):
  the row owner. It loads its B row block (all ranks) once, then for each column block
  streams A[:, block] once and uses it twice: ΔW = B_blk · A_blk, then, from the same tile,
  the value partial Σ c·|ΔW| and acc_dB += S₁ · A_blkᵀ with S₁ = c·sign(ΔW). It writes the
  row block's partial (rank chunk 0) and the unscaled dB block in fp32.
- `_tile_grad_a_kernel` (backward), grid (column blocks, rank chunks, matrices): the
  column owner. It loads its A column block once, streams B[block, :] once per row block:
  ΔW = B_blk · A_blk, acc_dA += B_blkᵀ · S₁; stores g·inv_n · acc_dA in the factors' dtype.
  The backward scales the saved dB by g·inv_n (one elementwise op) and runs nothing else.

Saved between forward and backward (training path): the factors (by reference) and the
unscaled dB, fp32 [M, k, r] — exactly the size of the fp32 gradient of B (LLaVA-7B, 224
matrices, r = 128: 0.70 GB, freed by the backward). Ranks above 128 (BLOCK_R = 128 output
chunks, `block_r_for`): the owners cannot keep all ranks resident, so each chunk's program
re-forms ΔW from rank steps of both factors (`_delta_tile`) and only chunk 0 reports the
value. Under no_grad or with frozen B, the forward runs the value-only kernel instead and
saves nothing but the factors.

Work per matrix and step (r ≤ 128): 4kdr FLOP in each owner (ΔW, then the gradient GEMM),
8kdr in all (the former three-kernel design, ΔW formed three times: 10kdr). L2 traffic per
owner: its own factor once, the other factor once per owner block, the plane once.

Each output block has exactly one owner and a fixed loop order, the value partials are
summed by torch in a fixed order: bitwise deterministic run to run, no atomics.

(The file runs past 450 lines on purpose: the three kernels share their @triton.jit
helpers, launch constants and offset tables, which must stay in one module.)

Grouped launch: the M same-shape matrices of a group are addressed through int64
element-offset tables relative to matrix 0 (B, A and plane of matrix m start at
`ptr_0 + offset[m]`), so neither the factors nor the planes are stacked or copied; the
tables (3·M int64) are cached per set of addresses, because PEFT's parameters and the
masks' planes stay where they are from step to step.

Input precision (fp32 factors, what PEFT keeps under bf16 autocast): the launcher's
`input_precision` is passed to every tl.dot. Default "tf32": a TF32 operand keeps 10
mantissa bits, so each ΔW entry is within about 2⁻¹⁰ · Σ_j |B_ij·A_jl| of the exact value
(a relative error of a few 10⁻⁴ against the float64 formula for the penalty, and signs
differ only at entries smaller than that bound, which then carry a negligible weight in
the value); it is the only fp32 choice that is modelled to keep the tile kernels well
ahead of the official fp32 formula on an A100 (sefe_fast/roofline.py; the tf32 tensor-core
rate is 8× the fp32 FMA rate, "tf32x3" costs three tf32 MMAs per product, "ieee" runs on
the FMA units). Use "tf32x3" for fp32-level accuracy. Contract, tested on CUDA against float64 on the same factors
(value: relative error; gradients: ‖g − g_ref‖_F / ‖g_ref‖_F):
fp32 "ieee" and "tf32x3" ≤ 1e-5 / 1e-4, fp32 "tf32" ≤ 2e-3 / 1e-2, bf16 factors (products
exact in fp32, gradients rounded to bf16) ≤ 1e-3 / 1e-2. Under TRITON_INTERPRET=1 tl.dot is
a float32 numpy matmul whatever the precision ("ieee"): ≤ 1e-5 / 1e-4 (max-error relative
to the largest entry), tested on the CPU. S is exact in every input dtype (integer
counts ≤ 15 times ±1), so the backward's GEMMs only round the factor operand.

(Past 450 lines because this is one fused op family, kept in one file by the project's rule:
the value-only, row-owner and column-owner kernels with their shared @triton.jit helpers,
their launchers, the autograd.Function and the ahead-of-time launch list of the compile
report.)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sefe_fast.plane_format import PLANE_BITS, TRIT_PLANE, plane_width
from sefe_fast_kernels.reglora_penalty import AotLaunch, block_r_for

INTERPRET = bool(triton.knobs.runtime.interpret)

TRIT_MAGIC = (65536, 21846, 7282, 2428, 810)  # ⌈2¹⁶ / 3^s⌉, s = 0…4 (the kernel's constants)
INPUT_PRECISIONS = ("tf32", "tf32x3", "ieee")
DEFAULT_INPUT_PRECISION = "tf32"

# Autotune lists for CUDA (kwargs, num_warps, num_stages). Every entry compiles for sm_80
# and sm_90 at r = 128, fp32 and bf16 factors, with 0 spills and within the shared memory
# of an A100 (python -m sefe_fast.kernel_report); the owner kernels' entries also at
# r = 256 (two rank chunks, RESIDENT off; checked with kernel_report.compile_kernel).
FWD_CONFIGS_CUDA: list[tuple[dict[str, int], int, int]] = [
    ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3),
    ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3),
    ({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 3),
]
# Owner kernels (training step): the row owner computes the value and dB, the column owner
# dA. The owner's own factor block stays in registers across its loop and only the other
# factor streams from L2, once per owner block: larger owner blocks re-read less.
ROW_OWNER_CONFIGS_CUDA: list[tuple[dict[str, int], int, int]] = [
    # BLOCK_M = 128 (half the re-reads of A) spills on sm_80 with fp32 factors: the
    # resident B block and the dB accumulator are 128×128 fp32 each.
    ({"BLOCK_M": 64, "BLOCK_N": 64}, 8, 1),
    ({"BLOCK_M": 64, "BLOCK_N": 32}, 8, 2),
]
# The trit plane's per-count word loads add registers: with fp32 factors on sm_90 the
# 64×64 row owner (255 registers with the binary decodes) spills 152 bytes, so the trit
# plane with fp32 factors runs the row owner without it (`row_owner_configs`).
ROW_OWNER_TRIT_FP32_EXCLUDED = (({"BLOCK_M": 64, "BLOCK_N": 64}, 8, 1),)
COL_OWNER_CONFIGS_CUDA: list[tuple[dict[str, int], int, int]] = [
    # BLOCK_N = 128 (BLOCK_M 32, 8 warps, 2 stages) was dropped: with bf16 factors on sm_80
    # it sits at 255 registers and spills 12 bytes with the 1- and 2-bit decodes (the
    # 4-bit one just fits); other warp/stage counts spill more.
    ({"BLOCK_M": 64, "BLOCK_N": 64}, 8, 2),
    ({"BLOCK_M": 32, "BLOCK_N": 64}, 4, 3),
]
# Under TRITON_INTERPRET=1 each program costs about 1 ms of Python plus its numpy work:
# few, large programs; multi-config autotune needs a GPU, so exactly one config.
FWD_CONFIG_INTERPRET = ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 1)
ROW_OWNER_CONFIG_INTERPRET = ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 1)
COL_OWNER_CONFIG_INTERPRET = ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 1)


def _configs(
    cuda: list[tuple[dict[str, int], int, int]], interpret: tuple[dict[str, int], int, int]
) -> list[triton.Config]:
    """The autotune list: one config under the interpreter, the CUDA list otherwise."""
    chosen = [interpret] if INTERPRET else cuda
    return [
        triton.Config(dict(kwargs), num_warps=warps, num_stages=stages)
        for kwargs, warps, stages in chosen
    ]


def row_owner_configs(
    bits: int, factor_dtype: torch.dtype
) -> list[tuple[dict[str, int], int, int]]:
    """The row owner's CUDA configs for a plane code and factor dtype: all of
    ROW_OWNER_CONFIGS_CUDA but those that spill with the trit decode and fp32 factors."""
    if bits == TRIT_PLANE and factor_dtype == torch.float32:
        return [c for c in ROW_OWNER_CONFIGS_CUDA if c not in ROW_OWNER_TRIT_FP32_EXCLUDED]
    return list(ROW_OWNER_CONFIGS_CUDA)


def _config_key(kwargs: dict[str, int], warps: int, stages: int) -> tuple:
    return tuple(sorted(kwargs.items())), warps, stages


def _prune_row_owner_configs(configs, named_args, **kwargs):
    """Autotune pruning: keep the configs `row_owner_configs` allows for this launch's plane
    code (BITS) and factor dtype (B's)."""
    if INTERPRET:  # one config, no spills to avoid
        return configs
    bits = kwargs.get("BITS", named_args.get("BITS"))
    allowed = {_config_key(*c) for c in row_owner_configs(bits, named_args["b_ptr"].dtype)}
    return [c for c in configs if _config_key(c.kwargs, c.num_warps, c.num_stages) in allowed]


_FWD_ACTIVE = [FWD_CONFIG_INTERPRET] if INTERPRET else FWD_CONFIGS_CUDA
_ROW_OWNER_ACTIVE = [ROW_OWNER_CONFIG_INTERPRET] if INTERPRET else ROW_OWNER_CONFIGS_CUDA
# The smallest tiles: the partial-sum buffers have one slot per tile (forward) or per row
# block (row owner) of the smallest configured size.
_MIN_FWD_BLOCK_M = min(kwargs["BLOCK_M"] for kwargs, _, _ in _FWD_ACTIVE)
_MIN_FWD_BLOCK_N = min(kwargs["BLOCK_N"] for kwargs, _, _ in _FWD_ACTIVE)
_MIN_ROW_OWNER_BLOCK_M = min(kwargs["BLOCK_M"] for kwargs, _, _ in _ROW_OWNER_ACTIVE)


@triton.jit
def _delta_tile(
    b_base,
    a_base,
    rows,
    cols,
    K,
    D,
    R,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_N] tile of B·A at (rows, cols), rank steps of BLOCK_K in order."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_K):
        ranks = r0 + tl.arange(0, BLOCK_K)
        b = tl.load(
            b_base + rows[:, None] * R + ranks[None, :],
            mask=(rows < K)[:, None] & (ranks < R)[None, :],
            other=0.0,
        )
        a = tl.load(
            a_base + ranks[:, None] * D + cols[None, :],
            mask=(ranks < R)[:, None] & (cols < D)[None, :],
            other=0.0,
        )
        acc = tl.dot(b, a, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _decode_counts(
    plane_base, rows, col0, K, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr
):
    """fp32 [BLOCK_M, BLOCK_N] counts of the packed plane at (rows, col0 + 0..BLOCK_N).

    Binary planes (BITS 1, 2, 4): loads the tile's BLOCK_N / E words per row once
    (contiguous, not one load per count) and expands each to its E fields by shifts.
    The trit plane (BITS == TRIT_PLANE, 20 counts per word): 20 does not divide a tile, so
    each count loads its own word (adjacent columns share words: a warp's loads coalesce
    into one or two 32-byte sectors), shifts its byte out, and takes base-3 digit
    s = j mod 5 of it as ⌊byte · m_s / 2¹⁶⌋ mod 3 with m_s = ⌈2¹⁶ / 3^s⌉ — exact for every
    byte (tests/test_kernels_reglora_tile.py checks all 256 × 5), two integer multiplies
    instead of a division. Columns ≥ d of the tile decode whatever the last word holds
    there (0 by the DeviceMask contract); ΔW is 0 there anyway (A's loads are masked), so
    they add nothing to the value or the gradients.
    """
    if BITS == 3:  # TRIT_PLANE (a jit function reads literals, not module constants)
        cols = col0 + tl.arange(0, BLOCK_N)
        word_cols = cols // 20
        words = tl.load(
            plane_base + rows[:, None] * W + word_cols[None, :],
            mask=(rows < K)[:, None] & (word_cols < W)[None, :],
            other=0,
        )
        # Mask after the shift: the sign of the int32 word (arithmetic shift) does not matter.
        byte = (words >> ((cols % 20) // 5 * 8)[None, :]) & 255
        digit = cols % 5
        magic = tl.where(
            digit == 0,
            65536,
            tl.where(
                digit == 1, 21846, tl.where(digit == 2, 7282, tl.where(digit == 3, 2428, 810))
            ),
        )
        shifted = (byte * magic[None, :]) >> 16  # ⌊byte / 3^s⌋
        return (shifted - 3 * ((shifted * 21846) >> 16)).to(tl.float32)  # mod 3
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        WORDS: tl.constexpr = BLOCK_N // PER_WORD
        tl.static_assert(BLOCK_N % PER_WORD == 0, "BLOCK_N must hold whole plane words")
        word_cols = col0 // PER_WORD + tl.arange(0, WORDS)
        words = tl.load(
            plane_base + rows[:, None] * W + word_cols[None, :],
            mask=(rows < K)[:, None] & (word_cols < W)[None, :],
            other=0,
        )
        fields = tl.reshape(
            tl.broadcast_to(words[:, :, None], [BLOCK_M, WORDS, PER_WORD]), [BLOCK_M, BLOCK_N]
        )
        shift = (tl.arange(0, BLOCK_N) % PER_WORD) * BITS
        # Mask after the shift: the sign of the int32 word (arithmetic shift) does not matter.
        return ((fields >> shift[None, :]) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _matrix_bases(b_ptr, a_ptr, plane_ptr, offsets_ptr, m, FACTOR_ALIGN: tl.constexpr):
    """Base pointers of matrix m's B, A and plane (element offsets relative to matrix 0)."""
    b_off = tl.multiple_of(tl.load(offsets_ptr + 3 * m), FACTOR_ALIGN)
    a_off = tl.multiple_of(tl.load(offsets_ptr + 3 * m + 1), FACTOR_ALIGN)
    plane_off = tl.load(offsets_ptr + 3 * m + 2)
    return b_ptr + b_off, a_ptr + a_off, plane_ptr + plane_off


@triton.autotune(
    configs=_configs(FWD_CONFIGS_CUDA, FWD_CONFIG_INTERPRET),
    key=["K", "D", "R", "BITS", "INPUT_PRECISION"],
    # Configs differ in their tile, hence in how many partial slots they fill: zero the
    # buffer before each benchmarked config and before the real run.
    reset_to_zero=["partial_ptr"],
)
@triton.jit
def _tile_fwd_kernel(
    b_ptr,  # matrix 0's B [K, R] contiguous, factors' dtype
    a_ptr,  # matrix 0's A [R, D] contiguous
    plane_ptr,  # matrix 0's plane, int32 [K, W]
    offsets_ptr,  # int64 [M, 3]: element offsets of each matrix's B, A, plane
    partial_ptr,  # fp32 [M, n_slots], output: per-program Σ c·|ΔW|
    n_slots,
    K,
    D,
    R,
    W,
    BITS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    FACTOR_ALIGN: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    b_base, a_base, plane_base = _matrix_bases(
        b_ptr, a_ptr, plane_ptr, offsets_ptr, m, FACTOR_ALIGN
    )
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    delta = _delta_tile(
        b_base, a_base, rows, cols, K, D, R, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION
    )
    counts = _decode_counts(plane_base, rows, pid_n * BLOCK_N, K, W, BLOCK_M, BLOCK_N, BITS)
    partial = tl.sum(tl.sum(counts * tl.abs(delta), axis=1), axis=0)
    tl.store(partial_ptr + m * n_slots + pid_m * tl.num_programs(1) + pid_n, partial)


@triton.jit
def _signed_counts(delta, counts):
    """c · sign(ΔW), fp32, with sign(0) = 0."""
    return tl.where(delta > 0, counts, 0.0) - tl.where(delta < 0, counts, 0.0)


@triton.jit
def _delta_with(
    own,
    b_base,
    a_base,
    rows,
    cols,
    streamed,
    K,
    D,
    R,
    OWN_IS_B: tl.constexpr,
    RESIDENT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """The fp32 ΔW tile at (rows, cols) for an owner program.

    RESIDENT (the rank fits one chunk): one tl.dot of the owner's resident factor block
    (`own`, loaded once before the loop) with the streamed block of the other factor that
    the gradient GEMM uses anyway — no second load. Otherwise (rank > 128, several rank
    chunks): the rank-stepped `_delta_tile`, whose factor rows come through L2.
    """
    if RESIDENT:
        if OWN_IS_B:
            delta = tl.dot(own, streamed, input_precision=INPUT_PRECISION)
        else:
            delta = tl.dot(streamed, own, input_precision=INPUT_PRECISION)
    else:
        delta = _delta_tile(
            b_base, a_base, rows, cols, K, D, R, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION
        )
    return delta


@triton.autotune(
    configs=_configs(ROW_OWNER_CONFIGS_CUDA, ROW_OWNER_CONFIG_INTERPRET),
    key=["K", "D", "R", "BITS", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_row_owner_configs},
    # Configs differ in BLOCK_M, hence in how many partial slots they fill.
    reset_to_zero=["partial_ptr"],
)
@triton.jit
def _tile_fwd_grad_b_kernel(
    b_ptr,  # matrix 0's B [K, R]
    a_ptr,  # matrix 0's A [R, D]
    plane_ptr,  # matrix 0's plane, int32 [K, W]
    offsets_ptr,  # int64 [M, 3]
    partial_ptr,  # fp32 [M, n_slots], output: per-row-block Σ c·|ΔW|
    grad_b_ptr,  # fp32 [M, K, R], output: Σ_j c·sign(ΔW)·Aᵀ, not yet × g·inv_n
    n_slots,
    K,
    D,
    R,
    W,
    BITS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    FACTOR_ALIGN: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    RESIDENT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Row owner: dB[row block, rank chunk] and (chunk 0) the row block's value partial.
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    b_base, a_base, plane_base = _matrix_bases(
        b_ptr, a_ptr, plane_ptr, offsets_ptr, m, FACTOR_ALIGN
    )
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out_ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    # The owner's B block, every rank, read once (used only when RESIDENT).
    own_b = tl.load(
        b_base + rows[:, None] * R + out_ranks[None, :],
        mask=(rows < K)[:, None] & (out_ranks < R)[None, :],
        other=0.0,
    )
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        a_out = tl.load(
            a_base + out_ranks[:, None] * D + cols[None, :],
            mask=(out_ranks < R)[:, None] & (cols < D)[None, :],
            other=0.0,
        )
        delta = _delta_with(
            own_b, b_base, a_base, rows, cols, a_out, K, D, R,
            True, RESIDENT, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION,
        )  # fmt: skip
        counts = _decode_counts(plane_base, rows, n0, K, W, BLOCK_M, BLOCK_N, BITS)
        total += tl.sum(counts * tl.abs(delta), axis=1)
        s = _signed_counts(delta, counts)
        acc = tl.dot(s.to(a_out.dtype), tl.trans(a_out), acc, input_precision=INPUT_PRECISION)
    # Every rank chunk computed the same value; chunk 0 reports it.
    tl.store(partial_ptr + m * n_slots + pid_m, tl.sum(total, axis=0), mask=pid_r == 0)
    tl.store(
        grad_b_ptr + m * K * R + rows[:, None] * R + out_ranks[None, :],
        acc,
        mask=(rows < K)[:, None] & (out_ranks < R)[None, :],
    )


@triton.autotune(
    configs=_configs(COL_OWNER_CONFIGS_CUDA, COL_OWNER_CONFIG_INTERPRET),
    key=["K", "D", "R", "BITS", "INPUT_PRECISION"],
)
@triton.jit
def _tile_grad_a_kernel(
    b_ptr,  # matrix 0's B [K, R]
    a_ptr,  # matrix 0's A [R, D]
    plane_ptr,  # matrix 0's plane, int32 [K, W]
    offsets_ptr,  # int64 [M, 3]
    scale_ptr,  # fp32 [M]: upstream gradient × inv_n of each matrix
    grad_a_ptr,  # [M, R, D] contiguous, output in the factors' dtype
    K,
    D,
    R,
    W,
    BITS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    FACTOR_ALIGN: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    RESIDENT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Column owner: dA[rank chunk, column block].
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    b_base, a_base, plane_base = _matrix_bases(
        b_ptr, a_ptr, plane_ptr, offsets_ptr, m, FACTOR_ALIGN
    )
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    # The owner's A block, every rank, read once (used only when RESIDENT).
    own_a = tl.load(
        a_base + out_ranks[:, None] * D + cols[None, :],
        mask=(out_ranks < R)[:, None] & (cols < D)[None, :],
        other=0.0,
    )
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for m0 in range(0, K, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        b_out = tl.load(
            b_base + rows[:, None] * R + out_ranks[None, :],
            mask=(rows < K)[:, None] & (out_ranks < R)[None, :],
            other=0.0,
        )
        delta = _delta_with(
            own_a, b_base, a_base, rows, cols, b_out, K, D, R,
            False, RESIDENT, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION,
        )  # fmt: skip
        counts = _decode_counts(plane_base, rows, pid_n * BLOCK_N, K, W, BLOCK_M, BLOCK_N, BITS)
        s = _signed_counts(delta, counts)
        acc = tl.dot(tl.trans(b_out), s.to(b_out.dtype), acc, input_precision=INPUT_PRECISION)
    acc = acc * tl.load(scale_ptr + m)
    tl.store(
        grad_a_ptr + m * R * D + out_ranks[:, None] * D + cols[None, :],
        acc.to(grad_a_ptr.dtype.element_ty),
        mask=(out_ranks < R)[:, None] & (cols < D)[None, :],
    )


FACTOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Factors must start on 16 bytes (vector loads); the launcher copies one that does not.
_FACTOR_ALIGN_BYTES = 16
# Rank step of the ΔW dot by factor element size: a 128-wide fp32 operand tile would sit
# in registers whole and spill.
_RANK_STEP_CUDA = {4: 32, 2: 64}
_RANK_STEP_INTERPRET = 128


def words_per_row(d: int, bits: int) -> int:
    """int32 words per plane row: ceil(d / E), E = 32 / bits (20 for the trit plane)."""
    return plane_width(d, bits)


@dataclass(frozen=True)
class _TileGroup:
    """What the autograd Function needs besides the factors: planes, tables, constants."""

    planes: tuple[torch.Tensor, ...]
    bits: int
    inv_n: torch.Tensor
    input_precision: str


# (device, dtype, addresses) -> int64 offset table on the device. Factors and planes keep
# their addresses for a whole task, so the host-to-device copy of the table happens once.
_OFFSET_TABLES: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_MAX_OFFSET_TABLES = 64


def _offset_table(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], planes: Sequence[torch.Tensor]
) -> torch.Tensor:
    """int64 [M, 3]: element offsets of each matrix's B, A, plane from matrix 0's."""
    device = bs[0].device
    addresses = tuple(
        (b.data_ptr(), a.data_ptr(), p.data_ptr()) for b, a, p in zip(bs, as_, planes)
    )
    key = (str(device), bs[0].dtype, addresses)
    table = _OFFSET_TABLES.get(key)
    if table is not None:
        _OFFSET_TABLES.move_to_end(key)
        return table
    factor_size = bs[0].element_size()
    base_b, base_a, base_p = addresses[0]
    offsets = [
        [(b - base_b) // factor_size, (a - base_a) // factor_size, (p - base_p) // 4]
        for b, a, p in addresses
    ]
    table = torch.tensor(offsets, dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    _OFFSET_TABLES[key] = table
    while len(_OFFSET_TABLES) > _MAX_OFFSET_TABLES:
        _OFFSET_TABLES.popitem(last=False)
    return table


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself if contiguous and 16-byte aligned, else an aligned copy."""
    if tensor.is_contiguous() and tensor.data_ptr() % _FACTOR_ALIGN_BYTES == 0:
        return tensor
    return tensor.contiguous().clone()


def rank_step(rank: int, element_size: int) -> int:
    """Rank step BLOCK_K of the ΔW tile's tl.dot: ≤ the rank chunk, 32 (fp32) / 64 (16-bit)
    on CUDA so that the operand fragments fit in registers, one step under the interpreter."""
    step = _RANK_STEP_INTERPRET if INTERPRET else _RANK_STEP_CUDA[element_size]
    return min(block_r_for(rank), step)


def _launch_constants(b: torch.Tensor, group: _TileGroup, owner: bool) -> dict[str, object]:
    """Constexprs of a launch: plane bits, dot precision, alignment, rank step; the owner
    kernels also get the rank chunk and whether the owner's factor block stays resident
    (the whole rank in one chunk)."""
    precision = group.input_precision if b.dtype == torch.float32 else DEFAULT_INPUT_PRECISION
    constants: dict[str, object] = {
        "BITS": group.bits,
        "INPUT_PRECISION": precision,
        "FACTOR_ALIGN": _FACTOR_ALIGN_BYTES // b.element_size(),
        "BLOCK_K": rank_step(b.shape[1], b.element_size()),
    }
    if owner:
        constants["BLOCK_R"] = block_r_for(b.shape[1])
        constants["RESIDENT"] = b.shape[1] <= constants["BLOCK_R"]
    return constants


def _shape_args(bs, as_, group: _TileGroup) -> tuple[int, int, int, int]:
    """(K, D, R, W) of a group."""
    (k, rank), d = bs[0].shape, as_[0].shape[1]
    return k, d, rank, words_per_row(d, group.bits)


def _forward_value(bs, as_, group: _TileGroup, offsets: torch.Tensor) -> torch.Tensor:
    """Per-matrix penalties of the plane part, fp32 [M], already × inv_n (no gradient
    work: the value-only kernel, one program per tile)."""
    num_m = len(bs)
    k, d, rank, words = _shape_args(bs, as_, group)
    n_slots = triton.cdiv(k, _MIN_FWD_BLOCK_M) * triton.cdiv(d, _MIN_FWD_BLOCK_N)
    partial = torch.zeros(num_m, n_slots, dtype=torch.float32, device=bs[0].device)

    def grid(meta):
        return (triton.cdiv(k, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_N"]), num_m)

    _tile_fwd_kernel[grid](
        bs[0], as_[0], group.planes[0], offsets, partial, n_slots, k, d, rank, words,
        **_launch_constants(bs[0], group, owner=False),
    )  # fmt: skip
    return partial.sum(dim=1) * group.inv_n


def _forward_value_and_grad_b(
    bs, as_, group: _TileGroup, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-matrix penalties fp32 [M] × inv_n, unscaled dB fp32 [M, K, R]) from one pass
    of the row-owner kernel; dB still lacks the factor g · inv_n."""
    num_m = len(bs)
    k, d, rank, words = _shape_args(bs, as_, group)
    constants = _launch_constants(bs[0], group, owner=True)
    n_slots = triton.cdiv(k, _MIN_ROW_OWNER_BLOCK_M)
    partial = torch.zeros(num_m, n_slots, dtype=torch.float32, device=bs[0].device)
    grad_b = torch.empty(num_m, k, rank, dtype=torch.float32, device=bs[0].device)

    def grid(meta):
        return (triton.cdiv(k, meta["BLOCK_M"]), triton.cdiv(rank, meta["BLOCK_R"]), num_m)

    _tile_fwd_grad_b_kernel[grid](
        bs[0], as_[0], group.planes[0], offsets, partial, grad_b, n_slots, k, d, rank, words,
        **constants,
    )  # fmt: skip
    return partial.sum(dim=1) * group.inv_n, grad_b


def _grad_a(bs, as_, group: _TileGroup, offsets, scale) -> torch.Tensor:
    """Gradients w.r.t. every A, stacked: [M, R, D] in the factors' dtype, × scale[m]."""
    num_m = len(bs)
    k, d, rank, words = _shape_args(bs, as_, group)
    constants = _launch_constants(bs[0], group, owner=True)
    grad_a = torch.empty(num_m, rank, d, dtype=bs[0].dtype, device=bs[0].device)

    def grid(meta):
        return (triton.cdiv(d, meta["BLOCK_N"]), triton.cdiv(rank, meta["BLOCK_R"]), num_m)

    _tile_grad_a_kernel[grid](
        bs[0], as_[0], group.planes[0], offsets, scale, grad_a, k, d, rank, words, **constants
    )  # fmt: skip
    return grad_a


class TilePenaltyFunction(torch.autograd.Function):
    """Plane-part penalties (fp32 [M]) of M same-shape pairs:
    apply(group, fuse_grad_b, *Bs, *As).

    fuse_grad_b (some B needs a gradient): the forward runs the row-owner kernel and saves
    the unscaled dB, fp32 [M, K, R] — exactly the size of B's fp32 gradient, held from the
    forward to the backward — besides the factors (by reference, no copy); the backward
    scales it and runs only the column-owner dA kernel. Otherwise the value-only kernel,
    and dA (if needed) in the backward.
    """

    @staticmethod
    def forward(ctx, group: _TileGroup, fuse_grad_b: bool, *factors: torch.Tensor):
        num_m = len(factors) // 2
        bs = [_aligned(b) for b in factors[:num_m]]
        as_ = [_aligned(a) for a in factors[num_m:]]
        offsets = _offset_table(bs, as_, group.planes)
        ctx.group, ctx.offsets, ctx.num_m = group, offsets, num_m
        if fuse_grad_b:
            values, grad_b_unscaled = _forward_value_and_grad_b(bs, as_, group, offsets)
        else:
            values, grad_b_unscaled = _forward_value(bs, as_, group, offsets), None
        ctx.save_for_backward(grad_b_unscaled, *bs, *as_)
        return values

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor):
        grad_b_unscaled, *saved = ctx.saved_tensors
        bs, as_ = saved[: ctx.num_m], saved[ctx.num_m :]
        group: _TileGroup = ctx.group
        scale = (grad_values.to(torch.float32) * group.inv_n).contiguous()
        grad_bs = grad_as = (None,) * ctx.num_m
        if any(ctx.needs_input_grad[2 : 2 + ctx.num_m]):
            if grad_b_unscaled is None:
                raise RuntimeError(
                    "tile penalty: a gradient w.r.t. B was requested, but the forward ran "
                    "without B requiring grad (or with grad disabled), so dB was not formed"
                )
            grad_b = grad_b_unscaled * scale[:, None, None]
            grad_bs = grad_b.to(bs[0].dtype).unbind(0)
        if any(ctx.needs_input_grad[2 + ctx.num_m :]):
            grad_as = _grad_a(bs, as_, group, ctx.offsets, scale).unbind(0)
        return (None, None, *grad_bs, *grad_as)


def _check_group(bs, as_, planes, bits: int, inv_n: torch.Tensor, input_precision: str) -> None:
    if not (len(bs) == len(as_) == len(planes) == inv_n.numel()) or not bs:
        raise ValueError(
            f"{len(bs)} B factors, {len(as_)} A factors, {len(planes)} planes and "
            f"{inv_n.numel()} inv_n values: the four must match and be non-empty"
        )
    if bits not in PLANE_BITS:
        raise ValueError(f"plane bits must be one of {PLANE_BITS} (3: trit plane), got {bits}")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(
            f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}"
        )
    if inv_n.dtype != torch.float32 or inv_n.ndim != 1:
        raise ValueError(f"inv_n must be a 1-D fp32 tensor, got {inv_n.dtype} {tuple(inv_n.shape)}")
    (k, rank), d = bs[0].shape, as_[0].shape[-1]
    device, dtype = bs[0].device, bs[0].dtype
    if dtype not in FACTOR_DTYPES:
        raise ValueError(f"unsupported factor dtype {dtype}; use one of {FACTOR_DTYPES}")
    words = words_per_row(d, bits)
    for index, (b, a, plane) in enumerate(zip(bs, as_, planes)):
        if b.shape != (k, rank) or a.shape != (rank, d):
            raise ValueError(
                f"matrix {index}: B {tuple(b.shape)} and A {tuple(a.shape)} do not match "
                f"matrix 0's B {(k, rank)} and A {(rank, d)}"
            )
        if b.dtype != dtype or a.dtype != dtype:
            raise ValueError(f"matrix {index}: dtypes {b.dtype}/{a.dtype} differ from {dtype}")
        if plane.dtype != torch.int32 or plane.shape != (k, words) or not plane.is_contiguous():
            raise ValueError(
                f"matrix {index}: the plane must be a contiguous int32 [{k}, {words}] tensor "
                f"({'trit' if bits == TRIT_PLANE else f'{bits}-bit'} counts of {d} columns), "
                f"got {plane.dtype} {tuple(plane.shape)}"
            )
        if b.device != device or a.device != device or plane.device != device:
            raise ValueError(
                f"matrix {index}: B on {b.device}, A on {a.device}, plane on {plane.device}; "
                f"matrix 0's B is on {device}"
            )
    if inv_n.device != device:
        raise ValueError(f"inv_n is on {inv_n.device}, the factors on {device}")
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"the factors are on {device}: the Triton RegLoRA kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before triton is imported, for CPU tests)"
        )


def penalty_tile_grouped(
    lora_bs: Sequence[torch.Tensor],
    lora_as: Sequence[torch.Tensor],
    planes: Sequence[torch.Tensor],
    bits: int,
    inv_n: torch.Tensor,
    input_precision: str = DEFAULT_INPUT_PRECISION,
) -> torch.Tensor:
    """Plane-part penalties of M same-shape LoRA pairs, fp32 [M], one launch each way.

    lora_bs[m]: k×r, lora_as[m]: r×d (fp32/bf16/fp16, all one dtype, CUDA; fp32 on the CPU
    under TRITON_INTERPRET=1); planes[m]: int32 [k, ceil(d / (32 / bits))] packed counts;
    bits: 1, 2 or 4; inv_n: fp32 [M], 1/n_total of each matrix's whole mask. Entry m is
    inv_n[m] · Σ c_m(i,j) · |(B_m·A_m)(i,j)|; differentiable in every factor (gradients in
    the factors' dtype). input_precision: tl.dot's for fp32 factors (module docstring).
    """
    _check_group(lora_bs, lora_as, planes, bits, inv_n, input_precision)
    group = _TileGroup(tuple(planes), int(bits), inv_n, input_precision)
    # Inside Function.forward grad mode is off: decide here whether the backward will need
    # dB, and only then let the forward form it.
    fuse_grad_b = torch.is_grad_enabled() and any(b.requires_grad for b in lora_bs)
    return TilePenaltyFunction.apply(group, fuse_grad_b, *lora_bs, *lora_as)


def aot_launches(
    k: int = 4096,
    d: int = 4096,
    rank: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    bits: int = 4,
) -> list[AotLaunch]:
    """Representative launches of every kernel in this file (default: a LLaVA-7B q/k/v/o
    matrix, r = 128, bf16; 4-bit planes — the 1- and 2-bit decodes differ only in
    constants, and tests/test_kernel_report.py compiles the 2-bit ones too)."""
    if bits not in PLANE_BITS:
        raise ValueError(f"plane bits must be one of {PLANE_BITS}, got {bits}")

    def tensor(tensor_dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(16, dtype=tensor_dtype)

    factor, f32 = tensor(dtype), tensor(torch.float32)
    i32, i64 = tensor(torch.int32), tensor(torch.int64)
    element_size = torch.empty(0, dtype=dtype).element_size()
    fwd_constexprs = {
        "BITS": bits,
        "INPUT_PRECISION": DEFAULT_INPUT_PRECISION,
        "FACTOR_ALIGN": _FACTOR_ALIGN_BYTES // element_size,
        "BLOCK_K": min(block_r_for(rank), _RANK_STEP_CUDA[element_size]),
    }
    # r = 128 is one rank chunk: the owners keep their factor block resident.
    owner_constexprs = {**fwd_constexprs, "BLOCK_R": block_r_for(rank), "RESIDENT": True}
    shape_args = {"K": k, "D": d, "R": rank, "W": words_per_row(d, bits)}
    common = {"b_ptr": factor, "a_ptr": factor, "plane_ptr": i32, "offsets_ptr": i64}
    n_slots = triton.cdiv(k, 64) * triton.cdiv(d, 64)
    return [
        AotLaunch(
            kernel=_tile_fwd_kernel,
            args={**common, "partial_ptr": f32, "n_slots": n_slots, **shape_args},
            constexprs=fwd_constexprs,
            configs=FWD_CONFIGS_CUDA,
        ),
        AotLaunch(
            kernel=_tile_fwd_grad_b_kernel,
            args={
                **common,
                "partial_ptr": f32,
                "grad_b_ptr": f32,
                "n_slots": triton.cdiv(k, 64),
                **shape_args,
            },
            constexprs=owner_constexprs,
            configs=row_owner_configs(bits, dtype),
        ),
        AotLaunch(
            kernel=_tile_grad_a_kernel,
            args={**common, "scale_ptr": f32, "grad_a_ptr": factor, **shape_args},
            constexprs=owner_constexprs,
            configs=COL_OWNER_CONFIGS_CUDA,
        ),
    ]
