"""Modelled roofline of the RegLoRA penalty on A100 and H100 — a model, never a measurement.

    python -m sefe_fast.roofline [--json] [--factor-dtype fp32|bf16] [--tasks 1 3 7]
    python -m sefe_fast.kernel_report --roofline          (the same tables)

What it models, per training step, for the LLaVA-7B LoRA targets (224 matrices: 4096×4096
×128, 11008×4096 ×64, 4096×11008 ×32; docs/reference.md §2-3), r = 128, M = 2 %, while
training task p + 1 (p = 1…7 earlier masks, tasks assumed to pick independently):

- "official": the official formula, ΔW = B.float() @ A.float() built in the forward and
  again in the gradient-checkpointing recompute, two backward GEMMs (8·k·d·r FLOP), ΔW and
  its gradient dense in fp32, int64 (row, col) pairs gathered twice and scattered once. Its
  GEMMs run at the fp32 FMA rate (PyTorch's default, TF32 off: "official fp32") or at the
  TF32 tensor-core rate ("official tf32", `torch.backends.cuda.matmul.allow_tf32 = True`);
  bf16 factors are cast to fp32 first (a read and a write of each factor).
- "gather": the three gather kernels (kernels/reglora_penalty.py) on a PositionPlan of u
  distinct positions: each position pulls one factor row (r · factor bytes) through L2 per
  kernel; grad_A reads rows/counts/signs indirectly (three 32-byte sectors).
- "tile": the dense-tile owner kernels (kernels/reglora_tile.py) on a packed plane (1, 2
  or 4 bits per entry, or the trit plane's 1.6: sefe_fast/plane_format.py), plus the
  gather kernels on the DeviceMask's extra list (counts above the plane's cap). The row
  owner ("fwd+grad_B") forms ΔW and from the same tile the value and dB (saved unscaled in
  fp32, k·r·4 bytes written); the column owner ("grad_A") forms ΔW again and dA, and the
  saved dB is scaled (read fp32, write the factors' dtype). 4·k·d·r FLOP each, 8·k·d·r per
  step on tensor cores at the input precision (bf16 factors: bf16 rate; fp32 factors:
  "tf32" one TF32 MMA, "tf32x3" three, "ieee" the fp32 FMA rate). L2 re-reads: each owner
  reads its own factor block once (resident) and streams the other factor once per owner
  block — k·r·fb + d·r·fb·⌈k/BLOCK_M⌉ for the row owner, d·r·fb + k·r·fb·⌈d/BLOCK_N⌉ for
  the column owner, from the configs that re-read least (`tile_blocks()`); ranks above 128
  re-form ΔW per rank chunk from rank steps of both factors. The plane is read once per
  pass from HBM, and the mask decode (shift, mask, convert, multiply, abs/sign) is
  DECODE_OPS CUDA-core instructions per entry and pass (DECODE_OPS_TRIT for the trit
  plane's base-3 digits), a bound of its own.

Every kernel's time is the largest of its bounds (tensor or FMA FLOPs, CUDA-core
instructions, HBM bytes, L2→SM bytes): a lower bound on the real time. Peak rates are the
datasheet numbers (dense, no sparsity); the sustained L2 rate is an *assumption*.
`preferred_kernel` / `crossover_density` turn the model into the tile-or-gather choice that
`build_device_mask(kernel="auto")` makes.

(The module runs past 450 lines on purpose: every term of the model and the tables that
report it stay in one file, so each printed number traces to one formula here.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

import torch

from sefe_fast.memory_budget import (
    DEFAULT_BUDGET_GB,
    Option,
    budget_bytes,
    choose_under_budget,
    guarded_options,
)
from sefe_fast.plane_format import TRIT_PLANE, plane_label, plane_width

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
FACTOR_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
INPUT_PRECISIONS = ("tf32", "tf32x3", "ieee")
# CUDA-core instructions per ΔW entry and pass to decode a count and use it. Binary planes:
# shift, mask, convert (the tile's words are loaded once per BLOCK_N / E entries), then
# multiply by |ΔW|, add, and the sign selects — 6. The trit plane: a 64-bit address and a
# word load per entry, shift, mask, two multiply-shift pairs and a multiply-add for the
# base-3 digit, convert — 12 — plus the same 3 uses: 15. (The per-entry loads also take
# the load/store units: 2 passes × 6.5·10⁹ entries at 32 lanes per clock per SM is about
# 1.7 ms on an H100, below every tile kernel's binding bound; not a bound of its own here.)
DECODE_OPS = 6
DECODE_OPS_TRIT = 15
TILE_MODULE = "sefe_fast_kernels.reglora_tile"


def tile_blocks() -> dict[str, tuple[int, int]]:
    """(BLOCK_M, BLOCK_N) per tile kernel from its CUDA autotune list
    (kernels/reglora_tile.py), the config that re-reads the factors least: for the
    value-only forward the largest tile (it re-reads B once per column block and A once
    per row block); for the row owner ("fwd+grad_B", B resident, A streamed once per row
    block) the largest BLOCK_M; for the column owner ("grad_A", A resident, B streamed once
    per column block) the largest BLOCK_N."""
    import importlib

    try:
        tile = importlib.import_module(TILE_MODULE)
    except ImportError as exc:  # the triton backends cannot run either: say what to use
        raise RuntimeError(
            f"the tile kernels' model reads their tile sizes from {TILE_MODULE}, which could "
            f"not be imported: {exc}. Use backend='torch' instead."
        ) from exc

    def largest(configs, key) -> tuple[int, int]:
        sizes = [(c[0]["BLOCK_M"], c[0]["BLOCK_N"]) for c in configs]
        return max(sizes, key=key)

    return {
        "fwd": largest(tile.FWD_CONFIGS_CUDA, lambda mn: (mn[0] * mn[1], mn)),
        "fwd+grad_B": largest(tile.ROW_OWNER_CONFIGS_CUDA, lambda mn: (mn[0], mn[1])),
        "grad_A": largest(tile.COL_OWNER_CONFIGS_CUDA, lambda mn: (mn[1], mn[0])),
    }


SECTOR = 32  # bytes: the smallest L2 transaction


@dataclass(frozen=True)
class Gpu:
    """Peak rates (datasheet, dense) and an assumed sustained L2→SM rate, per second."""

    name: str
    hbm_bytes_per_s: float
    l2_bytes_per_s: float  # assumption: sustained L2→SM bandwidth for scattered rows
    fp32_flops: float  # CUDA-core FMA rate (2 FLOP per FMA); instructions/s = fp32_flops / 2
    tf32_tensor_flops: float
    bf16_tensor_flops: float


GPUS = (
    Gpu("A100-SXM4", 2.039e12, 4.5e12, 19.5e12, 156e12, 312e12),
    Gpu("H100-SXM5", 3.35e12, 7.5e12, 67e12, 494.7e12, 989.4e12),
)
DEFAULT_GPU = "H100-SXM5"

# LLaVA-7B LoRA targets as (k, d, count): ΔW is k×d, B is k×r, A is r×d.
LLAVA_7B_SHAPES = ((4096, 4096, 128), (11008, 4096, 64), (4096, 11008, 32))


def gpu_named(name: str | None) -> Gpu:
    """The Gpu called `name` (None: DEFAULT_GPU); ValueError naming the known ones."""
    name = DEFAULT_GPU if name is None else name
    for gpu in GPUS:
        if gpu.name == name:
            return gpu
    raise ValueError(f"unknown GPU {name!r}; the model knows {[g.name for g in GPUS]}")


@dataclass(frozen=True)
class Cost:
    """Work of one kernel over `count` matrices of one shape, one training step.

    flops run at `rate` ("fp32" FMA, "tf32" or "bf16" tensor cores); alu_ops are other
    CUDA-core instructions (mask decode); hbm_bytes / l2_bytes move from HBM / from L2 to
    the SMs (l2 ≥ hbm: everything passes through L2).
    """

    kernel: str
    shape: str
    flops: float
    rate: str
    alu_ops: float
    hbm_bytes: float
    l2_bytes: float

    def bounds(self, gpu: Gpu) -> dict[str, float]:
        """Seconds per bound on `gpu`."""
        rate = {
            "fp32": gpu.fp32_flops,
            "tf32": gpu.tf32_tensor_flops,
            "bf16": gpu.bf16_tensor_flops,
        }[self.rate]
        return {
            "compute": self.flops / rate,
            "alu": self.alu_ops / (gpu.fp32_flops / 2),
            "HBM": self.hbm_bytes / gpu.hbm_bytes_per_s,
            "L2": self.l2_bytes / gpu.l2_bytes_per_s,
        }

    def time(self, gpu: Gpu) -> tuple[str, float]:
        """(binding bound, seconds): the largest bound, a lower bound on the time."""
        bounds = self.bounds(gpu)
        bound = max(bounds, key=bounds.get)
        return bound, bounds[bound]


def mask_fractions(ratio: float, prior_tasks: int) -> dict[str, float]:
    """Fractions of a matrix's entries, for `prior_tasks` independent masks of `ratio`:
    n (positions with multiplicity), unique (chosen at least once), multi (at least twice),
    above2 / above3 / above15 (more than 2 / 3 / 15 times)."""
    p, q = int(prior_tasks), 1.0 - ratio
    at_most = [math.comb(p, c) * ratio**c * q ** (p - c) for c in range(min(p, 15) + 1)]
    return {
        "n": p * ratio,
        "unique": 1.0 - q**p,
        "multi": max(1.0 - sum(at_most[:2]), 0.0) if p > 1 else 0.0,
        "above3": max(1.0 - sum(at_most[:4]), 0.0) if p > 3 else 0.0,
        "above15": max(1.0 - sum(at_most), 0.0) if p > 15 else 0.0,
        "above2": max(1.0 - sum(at_most[:3]), 0.0) if p > 2 else 0.0,
    }


# The fraction of mask_fractions listed beside each plane (counts above its cap), in plane
# code order; the 4-bit plane, whose list is shortest, last (budget_step's guard).
LISTED_FRACTION = {1: "multi", 2: "above3", TRIT_PLANE: "above2", 4: "above15"}
# Bytes per listed position (int16 row and column, uint8 count, int32 column order; LLaVA-7B
# dimensions < 2^15) as the DeviceMask lists hold them.
LIST_POSITION_BYTES = 9


def _shape(k: int, d: int, count: int) -> str:
    return f"{k}×{d} ×{count}"


def gather_costs(
    k: int, d: int, count: int, rank: int, positions: float, factor_bytes: int, label="gather"
) -> list[Cost]:
    """The three gather kernels on `positions` distinct positions per matrix (a float: a
    fraction of k·d times k·d)."""
    shape = _shape(k, d, count)
    u = positions * count
    row = rank * factor_bytes  # one gathered factor row
    factors = (k + d) * rank * factor_bytes * count
    flops = 2 * u * rank
    # forward: int16 row + int16 col + uint8 count in, int8 sign out per position; stack B
    # and transpose-stack A (read + write each factor once); one Aᵀ row per position from
    # L2 (the B row is shared by a block's row run and comes from L1).
    fwd_hbm = 6 * u + 3 * factors
    # grad B: cols + counts + sign in row order (4 B) and one Aᵀ row per position; writes ∂B.
    gb_hbm = 4 * u + 2 * factors
    # grad A: int32 col_order, then rows/counts/signs indirectly (8 B and three scattered
    # sectors per position) and one B row per position; writes ∂Aᵀ.
    ga_hbm = 8 * u + 2 * factors
    return [
        Cost(f"{label} fwd", shape, flops, "fp32", 0.0, fwd_hbm, fwd_hbm + u * row),
        Cost(f"{label} grad_B", shape, flops, "fp32", 0.0, gb_hbm, gb_hbm + u * row),
        Cost(f"{label} grad_A", shape, flops, "fp32", 0.0, ga_hbm, ga_hbm + u * (row + 3 * SECTOR)),
    ]


def official_cost(
    k: int, d: int, count: int, rank: int, n: float, factor_bytes: int, tf32: bool
) -> Cost:
    """The official formula over one shape group (n: positions per matrix, a fraction)."""
    entries = k * d * count
    positions = n * entries
    flops = 8 * entries * rank
    # ΔW written twice (forward, recompute), int64 pairs + one ΔW sector gathered twice,
    # a zeroed dense gradient, the scatter-add (pairs + a read-modify-write sector), and the
    # dense gradient read by the two backward GEMMs.
    hbm = 2 * 4 * entries + 2 * positions * (16 + SECTOR) + 4 * entries
    hbm += positions * (16 + 2 * SECTOR) + 2 * 4 * entries
    if factor_bytes != 4:  # .float() copies of the factors, forward and recompute
        hbm += 2 * (k + d) * rank * (factor_bytes + 4) * count
    label = "official tf32" if tf32 else "official fp32"
    return Cost(label, _shape(k, d, count), flops, "tf32" if tf32 else "fp32", 0.0, hbm, hbm)


def tile_costs(
    k: int,
    d: int,
    count: int,
    rank: int,
    bits: int,
    factor_bytes: int,
    input_precision: str = "tf32",
) -> list[Cost]:
    """The two owner kernels of a training step on a `bits`-bit plane over one shape group
    (no extra list): "fwd+grad_B" (row owner: value and unscaled dB, saved in fp32) and
    "grad_A" (column owner: dA, plus the scaling of the saved dB)."""
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}")
    shape = _shape(k, d, count)
    entries = k * d * count
    if factor_bytes == 2:
        rate, mult = "bf16", 1
    else:
        rate, mult = {"tf32": ("tf32", 1), "tf32x3": ("tf32", 3), "ieee": ("fp32", 1)}[
            input_precision
        ]
    plane = 4 * k * plane_width(d, bits) * count  # int32 words, the last one padded
    decode_ops = DECODE_OPS_TRIT if bits == TRIT_PLANE else DECODE_OPS
    factors = (k + d) * rank * factor_bytes * count
    b_bytes, a_bytes = k * rank * factor_bytes * count, d * rank * factor_bytes * count
    chunks = math.ceil(rank / 128)  # rank chunks of ≤ 128 (kernels' block_r_for)
    blocks = tile_blocks()
    row_m, row_n = blocks["fwd+grad_B"]
    col_m, col_n = blocks["grad_A"]
    if chunks == 1:
        # The owner's own block is read once and stays resident; the other factor streams
        # once per owner block.
        row_reads = b_bytes + a_bytes * math.ceil(k / row_m)
        col_reads = a_bytes + b_bytes * math.ceil(d / col_n)
    else:
        # Several rank chunks: each chunk's program re-forms ΔW from rank-stepped tiles of
        # both factors (B once per column block, A once per row block).
        row_reads = chunks * (b_bytes * math.ceil(d / row_n) + a_bytes * math.ceil(k / row_m))
        col_reads = chunks * (b_bytes * math.ceil(d / col_n) + a_bytes * math.ceil(k / col_m))
    # ΔW once per rank chunk (2kdr each) plus the gradient GEMM (2kdr) in each owner.
    flops = (2 * chunks + 2) * entries * rank * mult
    grad_b_fp32 = k * rank * 4 * count  # the saved, unscaled dB
    scale_grad_b = grad_b_fp32 + k * rank * factor_bytes * count  # read fp32, write dtype
    grad_a_out = d * rank * factor_bytes * count
    return [
        Cost(
            "tile fwd+grad_B",
            shape,
            flops,
            rate,
            decode_ops * entries,
            plane + factors + grad_b_fp32,
            plane + row_reads + grad_b_fp32,
        ),
        Cost(
            "tile grad_A",
            shape,
            flops,
            rate,
            decode_ops * entries,
            plane + factors + grad_a_out + scale_grad_b,
            plane + col_reads + grad_a_out + scale_grad_b,
        ),
    ]


def step_costs(
    prior_tasks: int,
    kernel: str,
    factor_dtype: torch.dtype = torch.float32,
    rank: int = 128,
    ratio: float = 0.02,
    bits: int = 1,
    input_precision: str = "tf32",
    shapes=LLAVA_7B_SHAPES,
    overlap: float = 1.0,
) -> list[Cost]:
    """Every kernel of one penalty step over all shape groups for `kernel` in
    ("official fp32", "official tf32", "gather", "tile"); tile = plane + its extra list.
    `overlap` scales the list of multiply chosen positions against independent tasks (0: no
    two tasks chose one entry, as measured on a real mini-CoIN run)."""
    fb = DTYPE_BYTES[factor_dtype]
    f = mask_fractions(ratio, prior_tasks)
    costs: list[Cost] = []
    for k, d, count in shapes:
        if kernel in ("official fp32", "official tf32"):
            costs.append(official_cost(k, d, count, rank, f["n"], fb, kernel == "official tf32"))
        elif kernel == "gather":
            costs += gather_costs(k, d, count, rank, f["unique"] * k * d, fb)
        elif kernel == "tile":
            costs += tile_costs(k, d, count, rank, bits, fb, input_precision)
            listed = overlap * f[LISTED_FRACTION[bits]]
            if listed > 0:
                costs += gather_costs(k, d, count, rank, listed * k * d, fb, "tile extra")
        else:
            raise ValueError(f"unknown kernel {kernel!r}")
    return costs


def step_time(costs: list[Cost], gpu: Gpu) -> float:
    """Seconds per step: kernels run one after another."""
    return sum(cost.time(gpu)[1] for cost in costs)


def matrix_step_time(
    kernel: str,
    k: int,
    d: int,
    rank: int,
    density: float,
    listed: float,
    factor_dtype: torch.dtype,
    gpu: Gpu,
    bits: int = 1,
) -> float:
    """Modelled seconds per training step for one k×d matrix: "gather" on `density`
    distinct positions per entry, or "tile" on a `bits`-bit plane plus the gather kernels
    on its list of `listed` positions per entry."""
    fb = DTYPE_BYTES[factor_dtype]
    if kernel == "gather":
        costs = gather_costs(k, d, 1, rank, density * k * d, fb)
    else:
        costs = tile_costs(k, d, 1, rank, bits, fb)
        if listed > 0:
            costs += gather_costs(k, d, 1, rank, listed * k * d, fb, "tile extra")
    return step_time(costs, gpu)


def preferred_kernel(
    k: int,
    d: int,
    rank: int,
    unique_density: float,
    factor_dtype: torch.dtype = torch.float32,
    gpu: str | None = None,
    listed_density: float = 0.0,
) -> str:
    """'tile' or 'gather', whichever the model says is faster for one k×d matrix whose mask
    has `unique_density` distinct positions per entry (`listed_density` of them in the tile
    representation's extra list); ties go to the tile kernels."""
    chosen = gpu_named(gpu)
    gather = matrix_step_time("gather", k, d, rank, unique_density, 0.0, factor_dtype, chosen)
    tile = matrix_step_time(
        "tile", k, d, rank, unique_density, listed_density, factor_dtype, chosen
    )
    return "tile" if tile <= gather else "gather"


def crossover_density(
    k: int, d: int, rank: int, factor_dtype: torch.dtype = torch.float32, gpu: str | None = None
) -> float:
    """The distinct-position density above which the tile kernels are modelled faster than
    the gather kernels (no extra list), found by bisection; 1.0 if they never are."""
    lo, hi = 0.0, 1.0
    if preferred_kernel(k, d, rank, hi, factor_dtype, gpu) == "gather":
        return 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if preferred_kernel(k, d, rank, mid, factor_dtype, gpu) == "tile":
            hi = mid
        else:
            lo = mid
    return hi


KERNEL_ROWS = (
    "official fp32",
    "official tf32",
    "gather",
    "tile 1-bit",
    "tile 1-bit no overlap",
    "tile 2-bit",
    "tile trit",
    "tile 4-bit",
    "auto",
    "budget",
)
# The plane code of each "tile …" row.
TILE_ROW_BITS = {
    "tile 1-bit": 1,
    "tile 1-bit no overlap": 1,
    "tile 2-bit": 2,
    "tile trit": TRIT_PLANE,
    "tile 4-bit": 4,
}


def auto_step_time(
    prior_tasks: int,
    factor_dtype: torch.dtype,
    gpu: Gpu,
    rank: int = 128,
    ratio: float = 0.02,
    shapes=LLAVA_7B_SHAPES,
) -> float:
    """Seconds per step with `backend="triton"`: per shape group the kernels
    `preferred_kernel` picks at the group's densities (tile = 1-bit plane + its list)."""
    f = mask_fractions(ratio, prior_tasks)
    total = 0.0
    for k, d, count in shapes:
        choice = preferred_kernel(k, d, rank, f["unique"], factor_dtype, gpu.name, f["multi"])
        kernel = "gather" if choice == "gather" else "tile"
        total += step_time(
            step_costs(prior_tasks, kernel, factor_dtype, rank, ratio, 1, shapes=((k, d, count),)),
            gpu,
        )
    return total


def modelled_mask_nbytes(k: int, d: int, bits: int, listed: float) -> float:
    """Modelled bytes of one k×d DeviceMask: an int32 plane of code `bits` (none for 0) plus
    a list of `listed` positions per entry with its row and column offsets."""
    plane = 0 if bits == 0 else 4 * k * plane_width(d, bits)
    positions = listed * k * d
    return plane + (positions * LIST_POSITION_BYTES + 4 * (k + d + 2) if positions else 0)


def budget_step(
    prior_tasks: int,
    factor_dtype: torch.dtype,
    gpu: Gpu,
    budget_gb: float = DEFAULT_BUDGET_GB,
    rank: int = 128,
    ratio: float = 0.02,
    shapes=LLAVA_7B_SHAPES,
) -> dict:
    """What `backend="triton"` with a resident budget of `budget_gb` picks for independent
    tasks: per shape group gather or tile (`preferred_kernel`), and for each tile matrix
    the plane `sefe_fast.memory_budget.choose_under_budget` chooses (the regularizer's
    policy, on modelled bytes and times). Returns seconds, modelled bytes and the picks
    ("4096×4096 ×128": {bits: matrices})."""
    f = mask_fractions(ratio, prior_tasks)
    items, owners = [], []
    for k, d, count in shapes:
        choice = preferred_kernel(k, d, rank, f["unique"], factor_dtype, gpu.name, f["multi"])
        if choice == "gather":
            seconds = matrix_step_time("gather", k, d, rank, f["unique"], 0.0, factor_dtype, gpu)
            options = [Option(0, round(modelled_mask_nbytes(k, d, 0, f["unique"])), seconds)]
        else:
            options = []
            for bits, fraction in LISTED_FRACTION.items():
                listed = f[fraction]
                seconds = matrix_step_time("tile", k, d, rank, 0.0, listed, factor_dtype, gpu, bits)
                nbytes = round(modelled_mask_nbytes(k, d, bits, listed))
                options.append(Option(bits, nbytes, seconds))
            vanilla = 16 * f["n"] * k * d
            options = guarded_options(options, min(options[-1].nbytes, vanilla))
        items += [options] * count
        owners += [_shape(k, d, count)] * count
    chosen = choose_under_budget(items, budget_bytes(budget_gb))
    picks: dict[str, dict[int, int]] = {}
    for owner, options, index in zip(owners, items, chosen.chosen):
        bits = options[index].label
        picks.setdefault(owner, {}).setdefault(bits, 0)
        picks[owner][bits] += 1
    return {"seconds": chosen.seconds, "nbytes": chosen.nbytes, "picks": picks}


def format_picks(picks: dict[str, dict[int, int]]) -> str:
    """ "4096×4096: 32×1-bit 96×trit; ..." (matrices per plane; gather: no plane)."""
    return "; ".join(
        f"{shape.split(' ')[0]}: "
        + " ".join(f"{n}×{plane_label(b)}" for b, n in sorted(by_bits.items()))
        for shape, by_bits in picks.items()
    )


def summary(
    factor_dtype: torch.dtype = torch.float32,
    tasks: tuple[int, ...] = tuple(range(1, 8)),
    rank: int = 128,
    ratio: float = 0.02,
    input_precision: str = "tf32",
    budget_gb: float = DEFAULT_BUDGET_GB,
) -> list[dict]:
    """Per prior-task count and GPU: modelled ms per step of every variant (KERNEL_ROWS;
    "auto": backend="triton" with the 1-bit plane everywhere; "budget": backend="triton"
    with the planes chosen under `budget_gb`, its modelled GB and picks too), and their
    speed-up over the official fp32 formula."""
    rows = []
    for p in tasks:
        for gpu in GPUS:
            row: dict = {"prior_tasks": p, "gpu": gpu.name}
            for label in KERNEL_ROWS:
                if label == "auto":
                    row["auto ms"] = auto_step_time(p, factor_dtype, gpu, rank, ratio) * 1e3
                    continue
                if label == "budget":
                    chosen = budget_step(p, factor_dtype, gpu, budget_gb, rank, ratio)
                    row["budget ms"] = chosen["seconds"] * 1e3
                    row["budget GB"] = chosen["nbytes"] / 1e9
                    row["budget picks"] = format_picks(chosen["picks"])
                    continue
                kernel, bits = (
                    ("tile", TILE_ROW_BITS[label]) if label in TILE_ROW_BITS else (label, 1)
                )
                overlap = 0.0 if label.endswith("no overlap") else 1.0
                costs = step_costs(
                    p, kernel, factor_dtype, rank, ratio, bits, input_precision, overlap=overlap
                )
                row[f"{label} ms"] = step_time(costs, gpu) * 1e3
            for label in KERNEL_ROWS[3:]:
                row[f"speedup {label}"] = row["official fp32 ms"] / row[f"{label} ms"]
            rows.append(row)
    return rows


def format_summary(rows: list[dict], factor_dtype_name: str) -> str:
    """Markdown: ms per step per variant, per prior-task count and GPU."""
    header = "| prior tasks | GPU | " + " | ".join(f"{k} ms" for k in KERNEL_ROWS)
    header += " | " + " | ".join(f"official fp32 / {k}" for k in KERNEL_ROWS[3:]) + " |"
    lines = [
        f"Modelled penalty time per training step, all 224 LLaVA-7B matrices, r = 128, "
        f"{factor_dtype_name} factors (MODELLED, not measured). Tile 1-bit: union plane + "
        "list of positions chosen twice or more, as independent tasks would; no overlap: "
        "an empty list (as measured on a real mini-CoIN run):",
        "",
        header,
        "|" + "---|" * (2 * len(KERNEL_ROWS) - 1),
    ]
    for r in rows:
        cells = " | ".join(f"{r[f'{k} ms']:,.1f}" for k in KERNEL_ROWS)
        ratios = " | ".join(f"{r[f'speedup {k}']:.1f}×" for k in KERNEL_ROWS[3:])
        lines.append(f"| {r['prior_tasks']} | {r['gpu']} | {cells} | {ratios} |")
    return "\n".join(lines)


def format_budget(rows: list[dict], factor_dtype_name: str, budget_gb: float) -> str:
    """Markdown: what backend="triton" picks under the resident budget, per task count."""
    lines = [
        f'backend="triton" with reg_gpu_budget_gb = {budget_gb:g} ({factor_dtype_name} '
        "factors, independent tasks; MODELLED time and bytes — measured bytes: "
        "profile_memory). Picks: matrices per plane (gather: the gather kernels only):",
        "",
        "| prior tasks | GPU | ms | official fp32 / budget | modelled GB | picks |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prior_tasks']} | {r['gpu']} | {r['budget ms']:,.1f} | "
            f"{r['speedup budget']:.1f}× | {r['budget GB']:.3f} | {r['budget picks']} |"
        )
    return "\n".join(lines)


def format_kernels(costs: list[Cost]) -> str:
    """Markdown: per kernel and shape group, work and binding bound per GPU."""
    names = [gpu.name for gpu in GPUS]
    header = "| kernel | shape group | GFLOP | rate | HBM GB | L2 GB | "
    header += " | ".join(f"{n} bound | {n} µs" for n in names) + " |"
    lines = [header, "|" + "---|" * (6 + 2 * len(names))]
    for c in costs:
        cells = []
        for gpu in GPUS:
            bound, seconds = c.time(gpu)
            cells.append(f"{bound} | {seconds * 1e6:,.0f}")
        lines.append(
            f"| {c.kernel} | {c.shape} | {c.flops / 1e9:,.1f} | {c.rate} | "
            f"{c.hbm_bytes / 1e9:,.2f} | {c.l2_bytes / 1e9:,.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def report(
    factor_dtype_name: str = "fp32", detail_tasks: int = 7, budget_gb: float = DEFAULT_BUDGET_GB
) -> str:
    """The full text: the summary over tasks 1–7, what the budget policy picks, then the
    per-kernel table at one count."""
    dtype = FACTOR_DTYPES[factor_dtype_name]
    rows = summary(dtype, budget_gb=budget_gb)
    costs = []
    for kernel, bits in (("official fp32", 1), ("official tf32", 1), ("gather", 1)):
        costs += step_costs(detail_tasks, kernel, dtype, bits=bits)
    costs += step_costs(detail_tasks, "tile", dtype, bits=1)
    costs += step_costs(detail_tasks, "tile", dtype, bits=TRIT_PLANE)
    crossover = ", ".join(
        f"{gpu.name} {crossover_density(k, d, 128, dtype, gpu.name) * 100:.2f} %"
        for gpu in GPUS
        for k, d, _ in LLAVA_7B_SHAPES[:1]
    )
    return "\n".join(
        [
            format_summary(rows, factor_dtype_name),
            "",
            format_budget(rows, factor_dtype_name, budget_gb),
            "",
            f"Per kernel at {detail_tasks} prior tasks (MODELLED; tile rows: 1-bit plane with "
            "its extra list, then the trit plane with its list):",
            "",
            format_kernels(costs),
            "",
            f"Tile/gather crossover (distinct-position density, 4096×4096): {crossover}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the modelled tables (or JSON rows)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factor-dtype", choices=sorted(FACTOR_DTYPES), default="fp32")
    parser.add_argument("--json", action="store_true", help="print the summary rows as JSON")
    parser.add_argument(
        "--budget-gb",
        type=float,
        default=DEFAULT_BUDGET_GB,
        help="resident-memory budget of the device masks for the 'budget' rows (GB, 10⁹ B)",
    )
    args = parser.parse_args(argv)
    if args.json:
        rows = summary(FACTOR_DTYPES[args.factor_dtype], budget_gb=args.budget_gb)
        print(json.dumps(rows, indent=1))
    else:
        print(report(args.factor_dtype, budget_gb=args.budget_gb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
