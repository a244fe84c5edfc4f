"""Fixtures of the benchmark suite (see bench/cases.py for what runs)."""

from __future__ import annotations

import os
import platform

import pytest
import torch

from bench.cases import QUICK, RANKS, SHAPES, THREADS_ENV, MaskStore, configure_threads


def pytest_configure(config) -> None:
    configure_threads()


def pytest_report_header(config) -> list[str]:
    mode = "quick (SEFE_FAST_BENCH_QUICK=1)" if QUICK else "full"
    shapes = ", ".join(s.id for s in SHAPES)
    return [
        f"sefe_fast bench: {mode}; shapes {shapes}; ranks {RANKS}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads, ${THREADS_ENV}; "
        f"{os.cpu_count()} cpus, "
        f"{platform.processor() or platform.machine()}); CUDA: {torch.cuda.is_available()}"
    ]


@pytest.fixture(scope="session")
def masks() -> MaskStore:
    """Real per-task selections, shared by every case of the session."""
    return MaskStore()
