"""CLI: python -m sefe_fast.asd --input train.json --output train_x20.json --ratio 0.2 --seed 0
[--task NAME] [--rewriter MODEL_PATH]."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sefe_fast.asd.convert import AsdError, convert_file
from sefe_fast.tasks import COIN_TASKS


def main(argv: list[str] | None = None) -> int:
    """Convert a train file with ASD and print the summary; exit status 2 on unusable input."""
    parser = argparse.ArgumentParser(
        prog="python -m sefe_fast.asd",
        description="Answer Style Diversification: rewrite a share of a LLaVA-format train "
        "file into the other answer formats.",
    )
    parser.add_argument("--input", required=True, type=Path, help="LLaVA-format train.json")
    parser.add_argument("--output", required=True, type=Path, help="e.g. train_x20.json")
    parser.add_argument("--ratio", type=float, default=0.2, help="share converted (default 0.2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=COIN_TASKS, default=None, help="CoIN task name")
    parser.add_argument(
        "--rewriter", type=Path, default=None, help="local HF model directory for explanations"
    )
    args = parser.parse_args(argv)
    try:
        stats = convert_file(
            args.input,
            args.output,
            ratio=args.ratio,
            seed=args.seed,
            task=args.task,
            rewriter_path=args.rewriter,
        )
    except (AsdError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(stats.summary())
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
