"""Turn a pytest-benchmark JSON file into a Markdown table of ratios and plots.

    python -m pytest bench/ --benchmark-only --benchmark-json out.json
    python -m bench.summarize out.json --out docs/bench

Writes DIR/benchmarks.md (speed and memory, vanilla / sefe_fast, per case) and, per kind of
case found, DIR/bench_<kind>.png (speed-up and memory ratios, log scale). Times are the
minimum over a case's rounds (the least disturbed by other load on the machine); the
median is in the table too. A group where one side is missing (skipped) is listed with "-".
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from sefe_fast.io_utils import atomic_path, atomic_write_text

SIDES = ("vanilla", "sefe_fast")
REQUIRED_INFO = ("kind", "side", "device", "k", "d", "rank", "peak_extra_bytes", "mask_bytes")


class BenchJsonError(ValueError):
    """The benchmark JSON is unreadable or a case lacks what the summary needs."""


@dataclass(frozen=True)
class Case:
    """One benchmark: its group, side and the numbers the summary uses."""

    group: str
    name: str
    side: str
    kind: str
    device: str
    label: str
    min_s: float
    median_s: float
    rounds: int
    peak_bytes: int
    mask_bytes: int
    info: dict


def load_cases(path: Path) -> tuple[list[Case], dict]:
    """Read the cases of a pytest-benchmark JSON file (and its machine_info)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchJsonError(f"{path}: cannot read benchmark JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise BenchJsonError(f"{path}: no 'benchmarks' list (is it pytest-benchmark JSON?)")
    cases = []
    for i, bench in enumerate(data["benchmarks"]):
        name = bench.get("fullname") or bench.get("name") or f"#{i}"
        info = bench.get("extra_info") or {}
        missing = [key for key in REQUIRED_INFO if key not in info]
        if missing:
            raise BenchJsonError(f"{path}: benchmark {name} lacks extra_info {missing}")
        if info["side"] not in SIDES:
            raise BenchJsonError(f"{path}: benchmark {name} has unknown side {info['side']!r}")
        stats = bench.get("stats") or {}
        label = f"{info['k']}×{info['d']} r={info['rank']}"
        if "prior_tasks" in info:
            label += f" t={info['prior_tasks']}"
        cases.append(
            Case(
                group=bench.get("group") or name,
                name=name,
                side=info["side"],
                kind=info["kind"],
                device=info["device"],
                label=label,
                min_s=float(stats["min"]),
                median_s=float(stats["median"]),
                rounds=int(stats["rounds"]),
                peak_bytes=int(info["peak_extra_bytes"]),
                mask_bytes=int(info["mask_bytes"]),
                info=info,
            )
        )
    return cases, data.get("machine_info") or {}


def pair_cases(cases: list[Case]) -> list[tuple[str, dict[str, Case]]]:
    """(group, {side: case}) in first-seen order; one case per side and group."""
    groups: dict[str, dict[str, Case]] = {}
    for case in cases:
        sides = groups.setdefault(case.group, {})
        if case.side in sides:
            raise BenchJsonError(f"group {case.group!r} has two {case.side} cases")
        sides[case.side] = case
    return list(groups.items())


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


def _fmt_s(case: Case | None) -> str:
    return "-" if case is None else f"{case.min_s:.4f} ({case.median_s:.4f})"


def _fmt_mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.1f}"


def ratios(pair: dict[str, Case]) -> dict[str, float | None]:
    """Speed-up (vanilla min time / sefe_fast min time), peak and mask ratios of a group."""
    van, fast = pair.get("vanilla"), pair.get("sefe_fast")

    def get(case: Case | None, attr: str):
        return None if case is None else getattr(case, attr)

    return {
        "speedup": ratio(get(van, "min_s"), get(fast, "min_s")),
        "peak_ratio": ratio(get(van, "peak_bytes"), get(fast, "peak_bytes")),
        "mask_ratio": ratio(get(van, "mask_bytes"), get(fast, "mask_bytes")),
    }


def markdown(pairs: list[tuple[str, dict[str, Case]]], machine: dict) -> str:
    """Tables per kind and device: times, peaks, masks and the vanilla / sefe_fast ratios."""
    cpu = machine.get("cpu") or {}
    threads = sorted(
        {
            str(c.info["torch_threads"])
            for _, p in pairs
            for c in p.values()
            if "torch_threads" in c.info
        }
    )
    lines = [
        f"Machine: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} logical CPUs, "
        f"python {machine.get('python_version', '?')}, torch intra-op threads: "
        f"{', '.join(threads) or '?'}.",
        "Times: min over the rounds in seconds (median in brackets). Memory in MB: peak = "
        "peak extra bytes of one call, mask = stored key positions (vanilla: 16 B × n int64 "
        "pairs; sefe_fast: KeyElements.nbytes). Ratios are vanilla / sefe_fast (> 1: "
        "sefe_fast is faster / smaller).",
        "",
    ]
    by_section: dict[tuple[str, str], list[tuple[str, dict[str, Case]]]] = {}
    for group, pair in pairs:
        any_case = next(iter(pair.values()))
        by_section.setdefault((any_case.kind, any_case.device), []).append((group, pair))
    for (kind, device), section in by_section.items():
        lines += [
            f"### {kind} ({device})",
            "",
            "| case | vanilla s | sefe_fast s | speed-up | vanilla peak | sefe_fast peak "
            "| peak ratio | vanilla mask | sefe_fast mask | mask ratio |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for _, pair in section:
            van, fast = pair.get("vanilla"), pair.get("sefe_fast")
            r = ratios(pair)
            label = next(iter(pair.values())).label
            lines.append(
                f"| {label} | {_fmt_s(van)} | {_fmt_s(fast)} | {_fmt_ratio(r['speedup'])} | "
                f"{_fmt_mb(van and van.peak_bytes)} | {_fmt_mb(fast and fast.peak_bytes)} | "
                f"{_fmt_ratio(r['peak_ratio'])} | {_fmt_mb(van and van.mask_bytes)} | "
                f"{_fmt_mb(fast and fast.mask_bytes)} | {_fmt_ratio(r['mask_ratio'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_kind(pairs: list[tuple[str, dict[str, Case]]], kind: str, path: Path) -> Path | None:
    """Horizontal bars of speed-up and peak-memory ratio per case of `kind` (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = []
    for _, pair in pairs:
        case = next(iter(pair.values()))
        if case.kind != kind:
            continue
        r = ratios(pair)
        rows.append((f"{case.label} {case.device}", r["speedup"], r["peak_ratio"]))
    if not rows:
        return None
    labels = [row[0] for row in rows]
    fig, axes = plt.subplots(
        1, 2, figsize=(10, 0.32 * len(rows) + 1.5), dpi=100, sharey=True, squeeze=True
    )
    titles = ("speed-up (vanilla / sefe_fast time)", "peak memory ratio (vanilla / sefe_fast)")
    for ax, column, title in zip(axes, (1, 2), titles):
        values = [row[column] for row in rows]
        shown = [v if v is not None and v > 0 else 1.0 for v in values]
        colors = ["tab:green" if v >= 1 else "tab:red" for v in shown]
        # bars grow from 1× (no difference) to the ratio, left for < 1, right for > 1
        ax.barh(range(len(rows)), [v - 1.0 for v in shown], left=1.0, color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(min(min(shown), 1.0) / 1.6, max(max(shown), 1.0) * 1.6)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}×"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="x", which="major", alpha=0.3)
        for y, (v, raw) in enumerate(zip(shown, values)):
            text = "n/a" if raw is None else f"{raw:.2f}×"
            ax.text(v, y, f" {text} ", va="center", ha="left" if v >= 1 else "right", fontsize=7)
    axes[0].set_yticks(range(len(rows)), labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle(f"RegLoRA {kind}: vanilla vs sefe_fast (> 1: sefe_fast better)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def summarize(bench_json: Path, out_dir: Path) -> list[Path]:
    """Write the Markdown summary and the plots; return the written paths."""
    cases, machine = load_cases(bench_json)
    if not cases:
        raise BenchJsonError(f"{bench_json}: no benchmark cases (all skipped?)")
    pairs = pair_cases(cases)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "benchmarks.md"]
    atomic_write_text(written[0], markdown(pairs, machine))
    for kind in dict.fromkeys(c.kind for c in cases):
        plotted = plot_kind(pairs, kind, out_dir / f"bench_{kind}.png")
        if plotted is not None:
            written.append(plotted)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.summarize",
        description="Markdown table and plots from `pytest bench/ --benchmark-json FILE`.",
    )
    parser.add_argument("bench_json", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench_summary"), help="output folder")
    args = parser.parse_args(argv)
    try:
        written = summarize(args.bench_json, args.out)
    except BenchJsonError as exc:
        print(f"bench.summarize: {exc}", file=sys.stderr)
        return 2
    print((args.out / "benchmarks.md").read_text())
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
