"""A seconds-long real run of `python -m sefe_fast.train` in a subprocess, for fault tests.

2 tasks x 4 optimizer steps of 4 samples, an in-task checkpoint every 2 steps, 8 test
records per task; the tiny model's stage 0 is 2 steps, cached in `cache` (one per module).
"""

import os
import subprocess
import sys

from sefe_fast.train.loop import FAIL_AFTER_STEPS_ENV

TASKS = "ScienceQA,TextVQA"
ARGS = [
    "coin",
    "--preset",
    "smoke",
    "--tasks",
    TASKS,
    "--stage0-steps",
    "2",
    "--global-batch-size",
    "4",
    "--per-device-batch-size",
    "4",
    "--minicoin-n-train",
    "24",
    "--minicoin-n-test",
    "8",
]


def smoke_command(out, *extra):
    """The command line of a smoke run into `out` with `extra` flags."""
    return [sys.executable, "-m", "sefe_fast.train", *ARGS, "--output-dir", str(out), *extra]


def smoke_env(cache, fail_after=None):
    """The environment: stage-0 cache, and optionally an abrupt exit after N steps."""
    env = {**os.environ, "SEFE_FAST_CACHE": str(cache)}
    env.pop(FAIL_AFTER_STEPS_ENV, None)
    if fail_after is not None:
        env[FAIL_AFTER_STEPS_ENV] = str(fail_after)
    return env


WARM_STAGE0 = """
from sefe_fast.model.tiny import Stage0Config, TinyConfig
from sefe_fast.train.distributed import init_distributed
from sefe_fast.train.stage0 import load_or_pretrain_tiny
load_or_pretrain_tiny(init_distributed(), TinyConfig(), Stage0Config().with_steps(2))
"""


def warm_stage0(cache):
    """Pretrain the smoke runs' 2-step stage 0 into `cache` now, so that a run's optimizer
    steps (what FAIL_AFTER_STEPS_ENV counts) are its tasks' steps alone."""
    subprocess.run(
        [sys.executable, "-c", WARM_STAGE0], env=smoke_env(cache), check=True, timeout=600
    )
    return cache


def run_smoke(out, cache, *extra, fail_after=None):
    """Run to completion; the CompletedProcess (stdout/stderr as text)."""
    return subprocess.run(
        smoke_command(out, *extra),
        env=smoke_env(cache, fail_after),
        capture_output=True,
        text=True,
        timeout=600,
    )


def start_smoke(out, cache, *extra, log_file):
    """Start a run in the background (output to the open file `log_file`); the Popen."""
    return subprocess.Popen(
        smoke_command(out, *extra),
        env=smoke_env(cache),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        text=True,
    )
