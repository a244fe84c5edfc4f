"""Side-by-side comparison of several runs, in the paper's table layout.

`python -m sefe_fast.compare RUN_DIR [RUN_DIR ...] [--out DIR]` writes `comparison.md`
(one row per method, from each run's results.json `method`; runs of one method with
different seeds shown as mean ± sample std, a single run without ±) and `comparison.png`
(grouped bars of MFT/MFN/MAA/BWT per method) to `--out` (default: the current
directory), and prints the table. All runs must share one task list and be completed to
the same stage; two runs of one method with the same seed are refused (double counting).

Two more sections follow the table:
- paired differences against a baseline method (`--baseline`, default `lora` when it is
  among the runs): each other method's MFN, BWT, MFT and MAA minus the baseline's on every
  seed both ran, with the mean, sample std and 95 % t-interval (sefe_fast.paired);
- the paper's numbers (LLaVA-1.5-7B on real CoIN, sefe_fast.paper_table) next to the runs'
  means for every method the paper's table has, with `paper_comparison.png` (`--no-paper`
  leaves both out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sefe_fast.io_utils import atomic_write_text
from sefe_fast.paired import paired_differences, paired_markdown
from sefe_fast.paper_table import PAPER_METHOD_LABELS, PAPER_ROWS
from sefe_fast.plots import plot_against_paper, plot_method_comparison
from sefe_fast.run_results import (
    METRIC_KEYS,
    MISSING,
    PAPER_COLUMNS,
    format_number,
    load_results,
    markdown_table,
    paper_row_values,
    run_dirs_cli,
)


@dataclass(frozen=True)
class RunSummary:
    """One run's paper-table values (percent) and identity."""

    run_dir: Path
    method: str
    seed: int | None
    tasks: tuple[str, ...]
    tasks_completed: int
    values: dict[str, float | None]


@dataclass(frozen=True)
class MethodSummary:
    """Mean and sample std (None with one run, or where a value is missing) per paper column."""

    method: str
    seeds: tuple[int | None, ...]
    mean: dict[str, float | None]
    std: dict[str, float | None]


def load_run(run_dir: str | Path) -> RunSummary:
    """Read one run's results.json into a RunSummary (errors name the run dir)."""
    results = load_results(run_dir)
    return RunSummary(
        run_dir=Path(run_dir),
        method=results["method"],
        seed=results.get("seed"),
        tasks=tuple(results["tasks"]),
        tasks_completed=results["metrics_recomputed"]["tasks_completed"],
        values=paper_row_values(results),
    )


def check_comparable(runs: Sequence[RunSummary]) -> None:
    """ValueError unless all runs share the task list and completed stages, and (method, seed) is unique."""
    if not runs:
        raise ValueError("no runs to compare")
    first = runs[0]
    for run in runs[1:]:
        if run.tasks != first.tasks:
            raise ValueError(
                f"runs have different task lists: {first.run_dir} has {list(first.tasks)}, "
                f"{run.run_dir} has {list(run.tasks)}"
            )
        if run.tasks_completed != first.tasks_completed:
            raise ValueError(
                f"runs completed different numbers of tasks: {first.run_dir} "
                f"{first.tasks_completed}, {run.run_dir} {run.tasks_completed}"
            )
    seen: dict[tuple[str, int | None], Path] = {}
    for run in runs:
        key = (run.method, run.seed)
        if key in seen:
            raise ValueError(
                f"runs {seen[key]} and {run.run_dir} are both method {run.method!r} with seed "
                f"{run.seed}: they would be counted twice"
            )
        seen[key] = run.run_dir


def aggregate(runs: Sequence[RunSummary]) -> list[MethodSummary]:
    """Group runs by method (first-seen order): mean and sample std of every paper column."""
    check_comparable(runs)
    by_method: dict[str, list[RunSummary]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    summaries = []
    for method, group in by_method.items():
        mean: dict[str, float | None] = {}
        std: dict[str, float | None] = {}
        for column in PAPER_COLUMNS:
            values = [run.values[column] for run in group]
            if any(v is None for v in values):
                mean[column] = std[column] = None
                continue
            mean[column] = statistics.fmean(values)  # type: ignore[arg-type]
            std[column] = statistics.stdev(values) if len(values) > 1 else None  # type: ignore[arg-type]
        summaries.append(MethodSummary(method, tuple(run.seed for run in group), mean, std))
    return summaries


def _cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return MISSING
    return format_number(mean) if std is None else f"{format_number(mean)} ± {format_number(std)}"


def comparison_markdown(summaries: Sequence[MethodSummary]) -> str:
    """The Markdown table (paper columns) plus a line per method saying which seeds it averages."""
    rows = [[s.method, *(_cell(s.mean[c], s.std[c]) for c in PAPER_COLUMNS)] for s in summaries]
    lines = [
        "# Run comparison",
        "",
        "Final accuracy per task, then MFT, MFN, MAA, BWT (percent); mean ± sample std over seeds.",
        "",
        markdown_table(("method", *PAPER_COLUMNS), rows),
        "",
    ]
    for s in summaries:
        seeds = ", ".join(str(seed) for seed in s.seeds)
        lines.append(f"- {s.method}: {len(s.seeds)} run(s), seeds {seeds}")
    lines += ["", "![Continual metrics per method](comparison.png)"]
    return "\n".join(lines) + "\n"


def paired_section(runs: Sequence[RunSummary], baseline: str) -> str:
    """Markdown: every other method minus `baseline` on their shared seeds (percentage points)."""
    by_method: dict[str, dict[int, dict[str, float | None]]] = {}
    for run in runs:
        if run.seed is not None:
            by_method.setdefault(run.method, {})[run.seed] = run.values
    differences = paired_differences(by_method, baseline)
    lines = [
        f"## Paired differences against {baseline}",
        "",
        "Same seed, same benchmark: each difference cancels the seed's own luck. Mean, sample",
        "std and 95 % t-interval of the mean over the shared seeds (none with one seed).",
        "",
    ]
    if not differences:
        return "\n".join([*lines, f"No other method shares a seed with {baseline}.", ""])
    return "\n".join(lines) + "\n" + paired_markdown(differences)


PAPER_SECTION_METRICS: tuple[str, ...] = ("MFT", "MFN", "BWT")


def in_paper(summaries: Sequence[MethodSummary]) -> list[MethodSummary]:
    """The summaries of the methods the paper's table has, in the runs' order."""
    return [s for s in summaries if s.method in PAPER_ROWS]


def paper_section(summaries: Sequence[MethodSummary]) -> str:
    """Markdown: the runs' means beside the paper's row for every method the paper reports."""
    known = in_paper(summaries)
    lora = next((s for s in summaries if s.method == "lora"), None)
    header = ["method", *(f"{m} {who}" for m in PAPER_SECTION_METRICS for who in ("here", "paper"))]
    if lora is not None:
        header += ["MFN − LoRA here", "MFN − LoRA paper"]
    rows = []
    for s in known:
        paper = PAPER_ROWS[s.method]
        row = [f"{s.method} / {PAPER_METHOD_LABELS[s.method]}"]
        for metric in PAPER_SECTION_METRICS:
            row += [format_number(s.mean[metric]), format_number(paper[metric])]
        if lora is not None:
            here = (
                None
                if s.mean["MFN"] is None or lora.mean["MFN"] is None
                else s.mean["MFN"] - lora.mean["MFN"]
            )
            row += [format_number(here), format_number(paper["MFN"] - PAPER_ROWS["lora"]["MFN"])]
        rows.append(row)
    lines = [
        "## Next to the paper's numbers",
        "",
        "The paper: LLaVA-1.5-7B on real CoIN (docs/reference.md §5). Here: the runs above",
        "(means over seeds). Different models and data, so compare the methods' order and gaps,",
        "not the values.",
        "",
    ]
    if not rows:
        return "\n".join([*lines, "None of these methods is in the paper's table.", ""])
    lines += [markdown_table(header, rows), "", "![Here against the paper](paper_comparison.png)"]
    return "\n".join(lines) + "\n"


def write_comparison(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    baseline: str | None = None,
    paper: bool = True,
) -> tuple[Path, Path]:
    """Write comparison.md and comparison.png for the runs into `out_dir`; return both paths.

    `baseline`: the method the paired differences subtract (default: lora when present, else
    no paired section); `paper`: add the paper's numbers and paper_comparison.png.
    """
    runs = [load_run(run_dir) for run_dir in run_dirs]
    summaries = aggregate(runs)
    methods = [s.method for s in summaries]
    if baseline is not None and baseline not in methods:
        raise ValueError(f"--baseline {baseline!r} is not among the runs' methods {methods}")
    if baseline is None and "lora" in methods:
        baseline = "lora"
    sections = [comparison_markdown(summaries)]
    if baseline is not None:
        sections.append(paired_section(runs, baseline))
    out_dir = Path(out_dir)
    if paper:
        sections.append(paper_section(summaries))
        known = in_paper(summaries)
        if known:
            plot_against_paper(
                [s.method for s in known],
                {m: [s.mean[m] for s in known] for m in PAPER_SECTION_METRICS},
                {m: [PAPER_ROWS[s.method][m] for s in known] for m in PAPER_SECTION_METRICS},
                out_dir / "paper_comparison.png",
            )
    markdown_path = out_dir / "comparison.md"
    atomic_write_text(markdown_path, "\n".join(sections))
    means = {key: [s.mean[key] for s in summaries] for key in METRIC_KEYS}
    stds = {key: [s.std[key] for s in summaries] for key in METRIC_KEYS}
    plot_path = plot_method_comparison(methods, means, stds, out_dir / "comparison.png")
    return markdown_path, plot_path


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--baseline",
        default=None,
        help="method the paired differences subtract (default: lora when among the runs)",
    )
    parser.add_argument(
        "--no-paper",
        dest="paper",
        action="store_false",
        help="leave out the paper's numbers and paper_comparison.png",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: see the module docstring."""
    return run_dirs_cli(
        argv,
        prog="python -m sefe_fast.compare",
        description="Compare runs side by side (mean ± std over seeds per method).",
        write=write_comparison,
        add_options=_add_options,
    )


if __name__ == "__main__":
    sys.exit(main())
