"""The GPU headline tables of BENCHMARKS.md and docs/kernels.md, from one command.

    python -m sefe_fast.profile_memory --json --dtype fp32 --gpu H100-SXM5 > fp32.json
    python -m sefe_fast.profile_memory --json --dtype bf16 --gpu H100-SXM5 > bf16.json
    python -m sefe_fast.bench.gpu_headline fp32.json bf16.json [--tasks 1 3 7]

Times are MODELLED (`sefe_fast.roofline`: LLaVA-7B, r = 128, M = 2 %, independent tasks);
the GPU-resident bytes of the gather and budget rows are MEASURED (the real tensors the
triton backend builds, from the two profile_memory runs); the forced single-plane rows'
bytes are modelled (`roofline.modelled_mask_nbytes`); the official format's bytes are its
exact size (16 B per position), computed. Speed-ups are against the official formula at
its real precision (fp32 GEMMs, TF32 off: PyTorch's default).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sefe_fast import roofline
from sefe_fast.run_results import markdown_table

ROW_NAMES = {
    "official fp32": "official formula, fp32 (PyTorch default, TF32 off)",
    "official tf32": "official formula, TF32 on",
    "gather": "gather kernels (whole plan)",
    "tile 1-bit": "tile kernels: 1-bit plane + list of counts > 1 (independent tasks)",
    "tile 1-bit no overlap": "tile kernels: 1-bit plane, empty list (overlap of the real run)",
    "tile 2-bit": "tile kernels: 2-bit plane + list of counts > 3",
    "tile trit": "tile kernels: trit plane + list of counts > 2",
    "tile 4-bit": "tile kernels: 4-bit plane + list of counts > 15",
    "budget": '**`backend="triton"`, `reg_gpu_budget_gb = 1.5`** (the plane the budget picks)',
}


def _modelled_rows(dtype: torch.dtype, tasks: tuple[int, ...]) -> dict[tuple[int, str], dict]:
    """(p, GPU name) -> roofline.summary row."""
    return {(r["prior_tasks"], r["gpu"]): r for r in roofline.summary(dtype, tasks=tasks)}


def _tile_row_bytes(label: str, p: int) -> float:
    """Modelled whole-model bytes of a forced single-plane row at p earlier tasks."""
    bits = roofline.TILE_ROW_BITS[label]
    fractions = roofline.mask_fractions(0.02, p)
    listed = 0.0 if label.endswith("no overlap") else fractions[roofline.LISTED_FRACTION[bits]]
    return sum(
        count * roofline.modelled_mask_nbytes(k, d, bits, listed)
        for k, d, count in roofline.LLAVA_7B_SHAPES
    )


def headline_table(measured: dict[str, list[dict]], tasks: tuple[int, ...]) -> str:
    """Markdown: per p and variant, modelled ms (A100, H100; fp32 and bf16 factors), the
    speed-up over the official fp32 formula and the GPU-resident GB."""
    fp32, bf16 = _modelled_rows(torch.float32, tasks), _modelled_rows(torch.bfloat16, tasks)
    a100, h100 = (gpu.name for gpu in roofline.GPUS)
    by_p = {dtype: {r["prior_tasks"]: r for r in rows} for dtype, rows in measured.items()}
    header = ["p", "kernels", "A100 ms", "H100 ms", "official fp32 ÷ this, A100 / H100"]
    header += ["bf16 factors: A100 / H100 ms", "GPU-resident GB"]
    table = []
    for p in tasks:
        vanilla_gb = by_p["fp32"][p]["vanilla_mask_bytes"] / 1e9
        for label, name in ROW_NAMES.items():
            key = f"{label} ms"
            a, h = fp32[(p, a100)][key], fp32[(p, h100)][key]
            base_a, base_h = (
                fp32[(p, a100)]["official fp32 ms"],
                fp32[(p, h100)]["official fp32 ms"],
            )
            if label.startswith("official"):
                gb = f"{vanilla_gb:.2f} (int64 pairs, computed)"
            elif label == "gather":
                gb = f"{by_p['fp32'][p]['gpu_resident_gather_bytes'] / 1e9:.3f}"
            elif label == "budget":
                gb = (
                    f"**{by_p['fp32'][p]['gpu_resident_bytes'] / 1e9:.3f}** measured, fp32 H100 "
                    f"picks; bf16 {by_p['bf16'][p]['gpu_resident_bytes'] / 1e9:.3f}"
                )
            else:
                gb = f"{_tile_row_bytes(label, p) / 1e9:.3f} (modelled)"
            table.append(
                [
                    str(p),
                    name,
                    f"{a:,.1f}",
                    f"{h:,.1f}",
                    f"{base_a / a:.1f}× / {base_h / h:.1f}×",
                    f"{bf16[(p, a100)][key]:,.1f} / {bf16[(p, h100)][key]:,.1f}",
                    gb,
                ]
            )
    return markdown_table(header, table)


def picks_table(measured: dict[str, list[dict]], tasks: tuple[int, ...]) -> str:
    """Markdown: per p, the budget rows' modelled ms and speed-up (fp32 and bf16 factors,
    both GPUs), the measured GPU-resident GB and the measured run's picks."""
    fp32, bf16 = _modelled_rows(torch.float32, tasks), _modelled_rows(torch.bfloat16, tasks)
    a100, h100 = (gpu.name for gpu in roofline.GPUS)
    by_p = {dtype: {r["prior_tasks"]: r for r in rows} for dtype, rows in measured.items()}
    header = ["p", "A100 fp32 ms (×)", "H100 fp32 ms (×)", "A100 bf16 ms (×)"]
    header += ["H100 bf16 ms (×)", "measured GPU-resident GB fp32 / bf16"]
    header += ["picks (fp32, H100 model; measured run)"]
    table = []
    for p in tasks:
        cells = [str(p)]
        for rows in (fp32, bf16):
            for gpu in (a100, h100):
                r = rows[(p, gpu)]
                cells.append(
                    f"{r['budget ms']:,.1f} ({r['official fp32 ms'] / r['budget ms']:.1f}×)"
                )
        cells.append(
            f"{by_p['fp32'][p]['gpu_resident_bytes'] / 1e9:.3f} / "
            f"{by_p['bf16'][p]['gpu_resident_bytes'] / 1e9:.3f}"
        )
        cells.append(by_p["fp32"][p]["gpu_representation"])
        table.append(cells)
    return markdown_table(header, table)


def main(argv: list[str] | None = None) -> int:
    """CLI: print both tables from two profile_memory --json files."""
    parser = argparse.ArgumentParser(
        prog="python -m sefe_fast.bench.gpu_headline", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("fp32_json", type=Path, help="profile_memory --json --dtype fp32 output")
    parser.add_argument("bf16_json", type=Path, help="profile_memory --json --dtype bf16 output")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 3, 7])
    args = parser.parse_args(argv)
    measured = {}
    for dtype, path in (("fp32", args.fp32_json), ("bf16", args.bf16_json)):
        try:
            measured[dtype] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"{path}: not a profile_memory --json output ({error})") from None
    print(headline_table(measured, tuple(args.tasks)))
    print()
    print(picks_table(measured, tuple(range(1, 8))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
