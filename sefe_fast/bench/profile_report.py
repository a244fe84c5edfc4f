"""`python -m sefe_fast.profile_memory`: the RegLoRA memory profile's command line, tables and plot.

    python -m sefe_fast.profile_memory [--spec llava-7b|llava-13b|tiny | --layout L]
        [--rank 128] [--ratio 0.02] [--tasks 8] [--dtype bf16|fp32] [--threads 1]
        [--gpu H100-SXM5|A100-SXM4] [--json] [--plot FILE.png] [--cache-dir DIR | --no-cache]

What each number is and how it is measured: `sefe_fast.bench.profile_memory`, which this
module only runs and formats (bytes shown in kB, MB or GB, whichever suits the largest
value of a table; ratios are vanilla / sefe_fast).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sefe_fast.bench.lora_shapes import SPECS, ModelSpec, parse_layout
from sefe_fast.bench.profile_memory import DTYPES, ShapeMeasurement, profile
from sefe_fast.bench.workloads import default_cache_dir
from sefe_fast.io_utils import atomic_path
from sefe_fast.reglora.regularizer import DEFAULT_GPU_BUDGET_GB
from sefe_fast.roofline import DEFAULT_GPU, GPUS


def _unit(values: list[int]) -> tuple[str, float]:
    """The unit (name, bytes) that suits the largest of `values`: GB, MB or kB."""
    top = max(values, default=0)
    if top >= 1e9:
        return "GB", 1e9
    return ("MB", 1e6) if top >= 1e6 else ("kB", 1e3)


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.1f}×" if b else "-"


def format_tables(
    spec: ModelSpec,
    rank: int,
    ratio: float,
    rows: list[dict],
    details: list[ShapeMeasurement],
    dtype_name: str = "fp32",
) -> str:
    """The readable report: settings, per-shape measurements, model totals with ratios."""
    layout = ", ".join(f"{g.names} {g.k}×{g.d} ×{g.count}" for g in spec.groups)
    shape_values = [
        v
        for m in details
        for v in (m.sefe_fast_plan_bytes, m.vanilla.peak_bytes, m.sefe_fast.peak_bytes)
    ]
    unit, div = _unit(shape_values)

    def u(n: int) -> str:
        return f"{n / div:,.2f}"

    lines = [
        f"RegLoRA memory profile: spec {spec.name} ({spec.num_matrices} matrices: {layout}), "
        f"r = {rank}, M = {ratio:g}, {dtype_name} factors, torch {torch.__version__}",
        "",
        f"Measured per matrix, once per distinct shape ({unit}; peak = forward+backward, "
        "tensor bytes from the profiler's memory events):",
        "| shape | ×count | prior tasks | positions | unique | sefe_fast mask | plan "
        "| GPU resident (representation) | vanilla peak | vanilla saved | sefe_fast peak "
        "| sefe_fast saved |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in details:
        lines.append(
            f"| {m.k}×{m.d} | {m.count} | {m.prior_tasks} | {m.positions:,} | "
            f"{m.unique_positions:,} | {u(m.sefe_fast_mask_bytes)} | "
            f"{u(m.sefe_fast_plan_bytes)} | {u(m.gpu_resident_bytes)} "
            f"({m.gpu_representation}) | {u(m.vanilla.peak_bytes)} | "
            f"{u(m.vanilla.saved_bytes)} | {u(m.sefe_fast.peak_bytes)} | "
            f"{u(m.sefe_fast.saved_bytes)} |"
        )
    unit, div = _unit([r["vanilla_mask_bytes"] for r in rows])
    lines += [
        "",
        f"Whole model ({unit}). Masks: vanilla = 16 B × entries (computed), sefe_fast = real "
        "KeyElements.nbytes × matrices per shape. Plan: real PositionPlan nbytes × matrices. "
        "GPU resident: real DeviceMaskGroup tensors of the triton backend × matrices. "
        "Peak and saved: measured per shape, aggregated (modelled) as "
        "Σ saved + max(peak − saved) over the matrices.",
        "| prior tasks | vanilla masks | sefe_fast masks | ratio | sefe_fast plan "
        "| GPU resident | ratio | vanilla peak | sefe_fast peak | ratio | vanilla saved "
        "| sefe_fast saved |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prior_tasks']} | {u(r['vanilla_mask_bytes'])} | "
            f"{u(r['sefe_fast_mask_bytes'])} | "
            f"{_ratio(r['vanilla_mask_bytes'], r['sefe_fast_mask_bytes'])} | "
            f"{u(r['sefe_fast_plan_bytes'])} | {u(r['gpu_resident_bytes'])} | "
            f"{_ratio(r['vanilla_mask_bytes'], r['gpu_resident_bytes'])} | "
            f"{u(r['vanilla_peak_bytes'])} | "
            f"{u(r['sefe_fast_peak_bytes'])} | "
            f"{_ratio(r['vanilla_peak_bytes'], r['sefe_fast_peak_bytes'])} | "
            f"{u(r['vanilla_saved_bytes'])} | {u(r['sefe_fast_saved_bytes'])} |"
        )
    lines.append("prior tasks = 0 is the first task: no regularizer, nothing held.")
    return "\n".join(lines)


def plot_profile(rows: list[dict], path: Path, title: str) -> Path:
    """Memory (GB, log scale) against prior tasks for both sides; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["prior_tasks"] for r in rows if r["prior_tasks"] > 0]
    series = [
        ("vanilla masks (int64 pairs)", "vanilla_mask_bytes", "tab:red", "-"),
        ("vanilla regularizer peak", "vanilla_peak_bytes", "tab:red", "--"),
        ("sefe_fast masks (compact)", "sefe_fast_mask_bytes", "tab:blue", "-"),
        ("sefe_fast plan (torch backend)", "sefe_fast_plan_bytes", "tab:blue", ":"),
        ("sefe_fast GPU resident (triton)", "gpu_resident_bytes", "tab:green", "-"),
        ("sefe_fast regularizer peak", "sefe_fast_peak_bytes", "tab:blue", "--"),
    ]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for label, key, color, style in series:
        ys = [r[key] / 1e9 for r in rows if r["prior_tasks"] > 0]
        ax.plot(xs, ys, style, color=color, marker="o", markersize=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("prior tasks (masks merged)")
    ax.set_ylabel("GB")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sefe_fast.profile_memory",
        description="RegLoRA memory profile over a continual run: vanilla vs sefe_fast.",
    )
    parser.add_argument("--spec", choices=sorted(SPECS), default="llava-7b")
    parser.add_argument(
        "--layout",
        default=None,
        help='custom matrices instead of --spec: "KxD:COUNT,..." (e.g. "4096x4096:128")',
    )
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank r")
    parser.add_argument("--ratio", type=float, default=0.02, help="M, fraction kept per task")
    parser.add_argument("--tasks", type=int, default=8, help="tasks in the run (rows 0…T-1)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bf16",
        help="LoRA factors' dtype in training (bf16: LLaVA/CoIN under DeepSpeed bf16)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: torch's default). Bytes do not depend on it; one "
        "thread keeps the run quick and steady on a shared machine",
    )
    parser.add_argument(
        "--gpu",
        choices=[g.name for g in GPUS],
        default=DEFAULT_GPU,
        help="the roofline model's GPU whose tile/gather choice gpu_resident_bytes follows",
    )
    parser.add_argument(
        "--gpu-budget-gb",
        type=float,
        default=DEFAULT_GPU_BUDGET_GB,
        help="RegLoRA's resident budget for the device masks (GB, 10⁹ B; RunConfig "
        "reg_gpu_budget_gb) whose per-matrix plane choice gpu_resident_bytes follows",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON only")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    parser.add_argument("--cache-dir", type=Path, default=None, help="selection cache folder")
    parser.add_argument("--no-cache", action="store_true", help="recompute every selection")
    args = parser.parse_args(argv)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    if args.threads < 0:
        parser.error(f"--threads must be ≥ 0, got {args.threads}")
    previous_threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        spec = parse_layout(args.layout) if args.layout else SPECS[args.spec]
        rows, details = profile(
            spec,
            args.rank,
            args.ratio,
            args.tasks,
            cache_dir,
            dtype=DTYPES[args.dtype],
            gpu=args.gpu,
            gpu_budget_gb=args.gpu_budget_gb,
        )
    except ValueError as exc:
        parser.error(str(exc))
    finally:
        torch.set_num_threads(previous_threads)  # main() may run inside another program
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_tables(spec, args.rank, args.ratio, rows, details, args.dtype))
    if args.plot is not None:
        title = f"RegLoRA memory, {spec.name}, r={args.rank}, M={args.ratio:g}, {args.dtype}"
        plot_profile(rows, args.plot, title)
        if not args.json:
            print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["format_tables", "main", "plot_profile"]
