"""PNG plots for the run report and the run comparison (matplotlib, Agg canvas, atomic writes).

Figures are built with `matplotlib.figure.Figure` on an explicit Agg canvas, so no global
pyplot state or display backend is touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sefe_fast.io_utils import atomic_path


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def plot_accuracy_matrix(
    tasks: Sequence[str], accuracy: Sequence[Sequence[float | None]], path: Path
) -> Path:
    """Heatmap of accuracy[stage][task] (percent); empty cells for entries not evaluated."""
    n = len(tasks)
    values = np.array(
        [[np.nan if v is None else float(v) for v in row] for row in accuracy], dtype=float
    )
    figure = _new_figure(1.2 + 0.9 * n, 1.0 + 0.7 * n)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(values), vmin=0, vmax=100, cmap="viridis")
    for t in range(n):
        for i in range(n):
            if not np.isnan(values[t, i]):
                colour = "white" if values[t, i] < 60 else "black"
                axes.text(
                    i, t, f"{values[t, i]:.1f}", ha="center", va="center", color=colour, fontsize=8
                )
    axes.set_xticks(range(n), tasks, rotation=45, ha="right")
    axes.set_yticks(range(n), [f"{t + 1}. {task}" for t, task in enumerate(tasks)])
    axes.set_xlabel("evaluated task")
    axes.set_ylabel("after training stage")
    axes.set_title("Accuracy matrix (%)")
    figure.colorbar(image, ax=axes, label="accuracy (%)")
    return _save(figure, path)


def plot_accuracy_by_stage(
    tasks: Sequence[str], accuracy: Sequence[Sequence[float | None]], path: Path
) -> Path:
    """One line per task: its accuracy (percent) at every stage from the one that trained it."""
    figure = _new_figure(7, 4)
    axes = figure.add_subplot()
    for i, task in enumerate(tasks):
        points = [
            (t + 1, float(accuracy[t][i]))
            for t in range(i, len(tasks))
            if accuracy[t][i] is not None
        ]
        if points:
            xs, ys = zip(*points)
            axes.plot(xs, ys, marker="o", label=task)
    axes.set_xticks(
        range(1, len(tasks) + 1), [f"{t + 1}\n{task}" for t, task in enumerate(tasks)], fontsize=7
    )
    axes.set_xlabel("after training stage")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title("Per-task accuracy across stages")
    axes.legend(fontsize=7, loc="best")
    axes.grid(alpha=0.3)
    return _save(figure, path)


BREAKDOWN_SEGMENTS = (
    ("forgotten_superficial", "forgotten, superficial", "#d62728"),
    ("forgotten_essential", "forgotten, essential", "#1f77b4"),
    ("never_superficial", "wrong when learned too, superficial", "#ff9896"),
    ("never_essential", "wrong when learned too, essential", "#aec7e8"),
)


def breakdown_segments(counts: Mapping[str, int]) -> dict[str, int]:
    """Split a task's final errors into the four stacked segments (numbers of records)."""
    return {
        "forgotten_superficial": counts["forgotten_superficial"],
        "forgotten_essential": counts["forgotten_essential"],
        "never_superficial": counts["wrong_final_superficial"] - counts["forgotten_superficial"],
        "never_essential": counts["wrong_final_essential"] - counts["forgotten_essential"],
    }


def plot_forgetting_breakdown(breakdown: Mapping[str, Any], path: Path) -> Path:
    """Stacked bars per task (and overall): final errors as percent of the task's records."""
    names = [*breakdown["per_task"], "overall"]
    all_counts = [*breakdown["per_task"].values(), breakdown["overall"]]
    figure = _new_figure(1.5 + 0.9 * len(names), 4)
    axes = figure.add_subplot()
    bottom = np.zeros(len(names))
    for key, label, colour in BREAKDOWN_SEGMENTS:
        heights = np.array(
            [100.0 * breakdown_segments(c)[key] / c["n"] if c["n"] else 0.0 for c in all_counts]
        )
        axes.bar(names, heights, bottom=bottom, label=label, color=colour)
        bottom += heights
    axes.set_ylabel("% of the task's test records wrong at the end")
    axes.set_title(f"Errors after stage {breakdown['final_stage']} ({breakdown['final_task']})")
    axes.tick_params(axis="x", rotation=45)
    axes.legend(fontsize=7)
    return _save(figure, path)


def plot_method_comparison(
    methods: Sequence[str],
    means: Mapping[str, Sequence[float | None]],
    stds: Mapping[str, Sequence[float | None]],
    path: Path,
) -> Path:
    """Grouped bars: one group per metric (keys of `means`), one bar per method, std error bars."""
    metrics = list(means)
    figure = _new_figure(2 + 1.6 * len(metrics), 4)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(metrics))
    for j, method in enumerate(methods):
        heights = [means[m][j] if means[m][j] is not None else np.nan for m in metrics]
        errors = [stds[m][j] if stds[m][j] is not None else 0.0 for m in metrics]
        axes.bar(
            x + (j - (len(methods) - 1) / 2) * width,
            heights,
            width,
            yerr=errors,
            capsize=3,
            label=method,
        )
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xticks(x, metrics)
    axes.set_ylabel("percent")
    axes.set_title("Continual metrics per method (mean ± sample std over seeds)")
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_against_paper(
    methods: Sequence[str],
    here: Mapping[str, Sequence[float | None]],
    paper: Mapping[str, Sequence[float]],
    path: Path,
) -> Path:
    """One panel per metric (keys of `here`): per method, this project's mean beside the paper's."""
    metrics = list(here)
    figure = _new_figure(1.5 + 2.4 * len(metrics), 4)
    x = np.arange(len(methods))
    for k, metric in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), k + 1)
        ours = [v if v is not None else np.nan for v in here[metric]]
        axes.bar(x - 0.2, ours, 0.4, label="here (mean over seeds)")
        axes.bar(x + 0.2, paper[metric], 0.4, label="paper (LLaVA-1.5-7B, CoIN)", alpha=0.6)
        axes.axhline(0, color="black", linewidth=0.8)
        axes.set_xticks(x, methods, rotation=45, ha="right", fontsize=8)
        axes.set_title(metric)
        if k == 0:
            axes.set_ylabel("percent")
            axes.legend(fontsize=7)
    return _save(figure, path)


def plot_stability_plasticity(
    labels: Sequence[str], mft: Sequence[float], mfn: Sequence[float], path: Path
) -> Path:
    """Scatter of MFN (stability) against MFT (plasticity), one labelled point per run."""
    figure = _new_figure(5.5, 4.5)
    axes = figure.add_subplot()
    axes.scatter(mft, mfn, color="tab:blue")
    for label, x, y in zip(labels, mft, mfn):
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("MFT (percent): accuracy right after learning a task")
    axes.set_ylabel("MFN (percent): accuracy after the last task")
    axes.set_title("Stability–plasticity of the sweep")
    return _save(figure, path)
