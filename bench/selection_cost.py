"""Key-element selection cost for one task of LLaVA-7B (224 matrices): measured on this CPU,
modelled on GPUs.

    OMP_NUM_THREADS=1 python bench/selection_cost.py [--per-shape 4] [--json out.json]

Measured (this machine, one intra-op thread): the torch streaming path
(`select_key_elements(..., backend="torch")`) on `--per-shape` distinct seeded random LoRAs
(r = 128) of each LLaVA-7B shape, scaled by the number of matrices of that shape; and the
host side of the Triton path (gap-encoding m sorted positions into KeyElements). Wall and
process CPU time are both reported, with the load average: on a shared machine CPU time is
the steadier of the two.

Modelled (no GPU here), per task, whole model, from datasheet rates
(`sefe_fast.roofline.GPUS`) and the stated per-launch and per-sync costs:
- Triton: 5 passes (3 histogram levels, count, compaction), each recomputing ΔW with an
  "ieee" fp32 `tl.dot` on the CUDA cores (2·k·d·r FLOP per pass); factor bytes per pass;
  ~15 small torch ops per matrix between the passes; one device-to-host copy of the
  int64 positions (8 B each) per matrix.
- torch streaming on CUDA: 3 passes over 2 MiB row tiles: a cuBLAS fp32 GEMM per tile
  (TF32 off, PyTorch's default), ~6 elementwise passes over each tile, and per tile
  ~23 kernel launches and ~6 host synchronisations (bincount, boolean indexing, nonzero,
  the copy of each tile's positions to the host).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __name__ == "__main__":  # run as `python bench/selection_cost.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from sefe_fast.bench.workloads import random_lora
from sefe_fast.io_utils import atomic_write_json
from sefe_fast.reglora.key_elements import encode_sorted_linear
from sefe_fast.reglora.selection import DEFAULT_TILE_ELEMENTS, num_selected, select_key_elements
from sefe_fast.roofline import GPUS, LLAVA_7B_SHAPES

RANK, RATIO = 128, 0.02
TRITON_PASSES = 5
TRITON_TORCH_OPS_PER_MATRIX = 15
TORCH_PASSES = 3
TORCH_LAUNCHES_PER_TILE = 23  # over the three passes
TORCH_SYNCS_PER_TILE = 6
TORCH_TILE_BYTE_PASSES = 6  # elementwise reads+writes of a 4-byte tile entry per pass
LAUNCH_S = 5e-6  # assumed cost of one kernel launch when the GPU waits for it
SYNC_S = 20e-6  # assumed cost of one host synchronisation (round trip, drained pipeline)
PCIE_BYTES_PER_S = 25e9  # assumed sustained device-to-host copy rate


def measure(per_shape: int) -> dict:
    """CPU seconds of the torch path and of the Triton path's host encoding, scaled."""
    rows, total_wall, total_cpu, total_encode = [], 0.0, 0.0, 0.0
    for k, d, count in LLAVA_7B_SHAPES:
        walls, cpus, encodes = [], [], []
        for index in range(per_shape):
            lora_b, lora_a = random_lora(k, d, RANK, seed=2000 + index)
            wall, cpu = time.perf_counter(), time.process_time()
            key_elements = select_key_elements(lora_b, lora_a, RATIO, backend="torch")
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            linear = key_elements.linear()
            start = time.process_time()
            encode_sorted_linear(linear, (k, d))
            encodes.append(time.process_time() - start)
        row = {
            "shape": f"{k}x{d}",
            "matrices": count,
            "measured": per_shape,
            "wall_s_mean": sum(walls) / per_shape,
            "cpu_s_mean": sum(cpus) / per_shape,
            "encode_cpu_s_mean": sum(encodes) / per_shape,
        }
        total_wall += row["wall_s_mean"] * count
        total_cpu += row["cpu_s_mean"] * count
        total_encode += row["encode_cpu_s_mean"] * count
        rows.append(row)
    return {
        "rows": rows,
        "model_wall_s_scaled": total_wall,
        "model_cpu_s_scaled": total_cpu,
        "model_encode_cpu_s_scaled": total_encode,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def model() -> list[dict]:
    """Modelled GPU seconds per task, whole model, for both paths (lower bounds + overheads)."""
    flop = sum(2 * k * d * RANK * count for k, d, count in LLAVA_7B_SHAPES)  # one ΔW pass
    factor_bytes = sum((k + d) * RANK * 4 * count for k, d, count in LLAVA_7B_SHAPES)
    entries = sum(k * d * count for k, d, count in LLAVA_7B_SHAPES)
    matrices = sum(count for _, _, count in LLAVA_7B_SHAPES)
    selected = sum(num_selected((k, d), RATIO) * count for k, d, count in LLAVA_7B_SHAPES)
    tiles = sum(
        -(-k // max(1, DEFAULT_TILE_ELEMENTS // d)) * count for k, d, count in LLAVA_7B_SHAPES
    )
    copy_s = selected * 8 / PCIE_BYTES_PER_S
    rows = []
    for gpu in GPUS:
        pass_s = max(flop / gpu.fp32_flops, factor_bytes / gpu.hbm_bytes_per_s)
        triton_overhead = matrices * (TRITON_PASSES + TRITON_TORCH_OPS_PER_MATRIX) * LAUNCH_S
        tile_bytes = entries * 4 * TORCH_TILE_BYTE_PASSES
        torch_pass_s = max(flop / gpu.fp32_flops, tile_bytes / gpu.hbm_bytes_per_s)
        torch_overhead = tiles * (
            TORCH_LAUNCHES_PER_TILE * LAUNCH_S + TORCH_SYNCS_PER_TILE * SYNC_S
        )
        rows.append(
            {
                "gpu": gpu.name,
                "flop_per_pass": flop,
                "triton_compute_s": TRITON_PASSES * pass_s,
                "triton_overhead_s": triton_overhead,
                "triton_copy_s": copy_s,
                "triton_total_s": TRITON_PASSES * pass_s + triton_overhead + copy_s,
                "torch_tiles": tiles,
                "torch_compute_s": TORCH_PASSES * torch_pass_s,
                "torch_overhead_s": torch_overhead,
                "torch_total_s": TORCH_PASSES * torch_pass_s + torch_overhead + copy_s,
                "host_syncs_triton": 2 * matrices,
                "host_syncs_torch": tiles * TORCH_SYNCS_PER_TILE,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-shape", type=int, default=4, help="matrices measured per shape")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.per_shape < 1:
        parser.error("--per-shape must be at least 1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    result = {"measured_cpu": measure(args.per_shape), "modelled_gpu": model()}
    print(json.dumps(result, indent=2))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
