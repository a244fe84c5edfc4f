"""`python -m sefe_fast.train coin [flags]` (or under `torchrun`): parse flags into a RunConfig.

The flags are built from `RunConfig`'s table (`config.py`: one flag per setting, with its
help and group). A preset (`--preset`, see `presets.py`) overrides the defaults; each flag
given on the command line overrides the preset. Every value is checked before any work
starts: each problem is reported on its own line, naming the flag, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sefe_fast.data.coin import CoinDataError
from sefe_fast.io_utils import DiskFullError
from sefe_fast.methods import METHODS
from sefe_fast.run_lock import RunDirLockedError
from sefe_fast.train.checkpoint import RunMismatchError, RunStateError
from sefe_fast.train.config import (
    RunConfig,
    check_overrides,
    default_value,
    flag,
    range_text,
    settings,
    validate,
)
from sefe_fast.train.continual import run_continual
from sefe_fast.train.loop import NonFiniteLossError
from sefe_fast.train.presets import PRESETS, REQUIRES_MODEL_AND_DATA
from sefe_fast.train.stage_eval import BadTestSetError

GROUPS = ("model", "data", "method", "training", "speed")
SCALARS = {"int": int, "float": float}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one flag per setting, every default None so the preset fills it in."""
    p = argparse.ArgumentParser(
        prog="python -m sefe_fast.train",
        description="Continual instruction tuning of a LLaVA model on CoIN (SEFE: ASD + RegLoRA).",
        epilog=methods_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the epilog's lines stay lines
    )
    table = settings()
    p.add_argument(
        "benchmark", choices=table["benchmark"][1].allowed(), help=table["benchmark"][1].help
    )
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default="default", help=table["preset"][1].help
    )
    p.add_argument(
        "--output-dir",
        default=default_value(table["output_dir"][0]),
        help=table["output_dir"][1].help,
    )
    p.add_argument("--restart", action="store_true", default=None, help=table["restart"][1].help)
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    preset_default = _preset_values("default")
    for name, (f, s) in table.items():
        if s.group == "run":
            continue
        kind = str(f.type).split(" ")[0].split("[")[0]
        group = groups[s.group]
        if kind == "bool":
            on_by_default = default_value(f)
            switch = f"--no-{name.replace('_', '-')}" if on_by_default else flag(name)
            action = "store_false" if on_by_default else "store_true"
            group.add_argument(switch, dest=name, action=action, default=None, help=s.help)
            continue
        parse = s.parse or SCALARS.get(kind)
        notes = (
            [] if preset_default[name] is None else [f"default preset: {preset_default[name]!r}"]
        )
        if range_text(s):
            notes.append(("None or " if s.optional else "") + range_text(s))
        help_text = s.help + (f" [{'; '.join(notes)}]" if notes else "")
        help_text = help_text.replace("%", "%%")  # argparse %-formats help
        options: dict[str, Any] = {"dest": name, "help": help_text}
        if s.allowed() is not None:
            options["choices"] = s.allowed()
        elif parse is not None:
            options["type"] = parse
        group.add_argument(flag(name), **options)
    return p


def methods_epilog() -> str:
    """'methods (--method):' and one line per registered method: its name and summary."""
    width = max(len(name) for name in METHODS)
    lines = [f"  {name:<{width}}  {METHODS[name].summary}" for name in sorted(METHODS)]
    return "methods (--method):\n" + "\n".join(lines)


def _preset_values(name: str) -> dict[str, Any]:
    """RunConfig's defaults with preset `name`'s overrides (ValueError for an unknown key)."""
    overrides = PRESETS[name]
    check_overrides(overrides, f"preset {name!r}")
    values = {n: default_value(f) for n, (f, _) in settings().items()}
    values.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in overrides.items()})
    return values


def _fail(parser: argparse.ArgumentParser, problems: list[str]) -> None:
    """Usage, then one `error:` line per problem; exit status 2 (argparse's)."""
    parser.print_usage()
    parser.exit(2, "".join(f"{parser.prog}: error: {problem}\n" for problem in problems))


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Flags → RunConfig (preset values for every flag not given); errors name the flag."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    values = _preset_values(args["preset"])
    for name, given in args.items():
        if given is not None:
            values[name] = given
    if args["task_steps"] is None and (args["max_steps"] is not None or args["epochs"] is not None):
        values["task_steps"] = {}  # a step count given on the command line is for every task
    problems = validate(values)
    if not problems:  # a method's own checks read valid values only
        problems += METHODS[values["method"]].settings_problems(values)
    needs_model = args["preset"] in REQUIRES_MODEL_AND_DATA
    if needs_model and values["model"] is None and values["llm"] is None:
        problems.append(f"--preset {args['preset']} needs --model (or --llm/--vision-tower)")
    if needs_model and values["data"] is None:
        problems.append(f"--preset {args['preset']} needs --data")
    method = METHODS.get(values["method"])
    if values["fsdp"] and method is not None and not method.supports_fsdp:
        problems.append(f"--method {values['method']} does not run with --fsdp")
    if values["llm"] is not None:
        if values["vision_tower"] is None:
            problems.append("--llm needs --vision-tower (and usually --projector)")
        values["model"] = None
    elif values["model"] in ("tiny", "smol") and values["data"] is not None:
        problems.append(
            f"the {values['model']} model only knows mini-CoIN: give --model with --data"
        )
    if values["model"] not in (None, "tiny", "smol") and values["data"] is None:
        problems.append("--model needs --data (CoIN in LLaVA format)")
    if problems:
        _fail(parser, problems)
    return RunConfig(**values)


# Errors about the run directory or the input that the message explains in full: printed as
# one line (no traceback), exit status 1. Anything else keeps its traceback.
EXPLAINED_ERRORS = (
    RunDirLockedError,
    RunMismatchError,
    RunStateError,
    NonFiniteLossError,
    BadTestSetError,
    CoinDataError,
    DiskFullError,
)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m sefe_fast.train`."""
    cfg = parse_config(argv)
    try:
        run_continual(cfg)
    except EXPLAINED_ERRORS as exc:
        print(f"sefe_fast: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
