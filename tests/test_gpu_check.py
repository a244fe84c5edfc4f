"""bench/gpu_check.py: the smoke run CI keeps working, and the checks it applies can fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check, gpu_check_model
from sefe_fast.reglora.penalty import BACKENDS

REPO = Path(__file__).resolve().parents[1]


def _run_smoke(out: Path, *options: str, timeout: int) -> tuple[int, str, dict]:
    """Run `bench/gpu_check.py --smoke` writing into `out`: (exit code, stderr, report)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    result = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--smoke", *options, "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    path = out / gpu_check.OUT_NAME
    assert path.is_file(), f"no report (exit {result.returncode}): {result.stderr[-3000:]}"
    return result.returncode, result.stderr, json.loads(path.read_text())


def test_smoke_run_writes_a_complete_passing_report(tmp_path):
    code, stderr, report = _run_smoke(tmp_path, timeout=240)
    assert code == 0, stderr[-3000:]
    assert report["mode"] == "smoke" and report["all_ok"] is True
    assert not list(tmp_path.glob(".*tmp*")), "the JSON must be written atomically"
    size = gpu_check.SMOKE
    backends = report["environment"]["penalty_backends"]
    assert backends == list(gpu_check.GPU_PENALTY_BACKENDS) and backends
    # every backend × shape × task count × dtype is checked, with its numbers
    expected = len(size.shapes) * len(size.tasks) * len(size.dtypes) * len(backends)
    assert len(report["correctness"]) == expected
    for row in report["correctness"]:
        assert row["ok"] and row["deterministic"], row
        assert row["value_rel_error"] < 1e-5 and row["grad_b"]["max_rel_error"] < 1e-4
    timed = {(r["shape"], r["tasks"], r["backend"]) for r in report["penalty_time"]}
    assert len(timed) == len(size.shapes) * len(size.tasks) * (len(backends) + 1)
    step = report["model_step"]
    assert step["matrices"] == sum(count for _, _, count in size.shapes)
    assert all(step[b]["min_ms"] > 0 for b in (*backends, "reference"))
    for backend in backends:
        assert step[backend]["ok"] and step[backend]["value_rel_error_vs_official"] < 1e-5
    for row in report["selection"]:
        assert row["identical_to_torch"] and row["identical_to_dense_topk"], row
        assert row["launcher_host_syncs"] == "n/a"  # checked on CUDA only
    model = report["model"]
    assert model["sdpa"]["loss"] == pytest.approx(model["sdpa"]["loss"])  # finite
    assert 4.0 < model["sdpa"]["loss"] < 8.0  # about ln(vocab 300) = 5.7 for a random model
    assert model["flash_attention_2"] == {"skipped": "needs CUDA"}
    assert set(report["seconds"]) >= {"masks", "correctness", "model", "total"}


def test_penalty_backends_are_the_gpu_ones_penalty_offers():
    assert set(gpu_check.GPU_PENALTY_BACKENDS) <= set(BACKENDS)
    assert "triton" in gpu_check.GPU_PENALTY_BACKENDS
    assert "reference" not in gpu_check.GPU_PENALTY_BACKENDS


def test_gradient_check_fails_on_a_wrong_gradient_and_allows_ambiguous_signs():
    generator = torch.Generator().manual_seed(0)
    lora_b = torch.randn(30, 4, generator=generator)
    lora_a = torch.randn(4, 20, generator=generator)
    indices = torch.stack([torch.arange(30), torch.arange(30) % 20], dim=1)
    b = lora_b.clone().requires_grad_()
    a = lora_a.clone().requires_grad_()
    value = (b @ a)[indices[:, 0], indices[:, 1]].abs().mean()
    value.backward()
    ref = gpu_check.reference_with_bounds(lora_b, lora_a, indices)
    assert ref["value"].item() == pytest.approx(value.item(), rel=1e-6)
    eps = torch.finfo(torch.float32).eps
    assert gpu_check.grad_check(b.grad, ref["grad_b"], ref["allow_b"], eps)["ok"]
    assert gpu_check.grad_check(a.grad, ref["grad_a"], ref["allow_a"], eps)["ok"]
    wrong = b.grad.clone()
    wrong[3] *= -1
    assert not gpu_check.grad_check(wrong, ref["grad_b"], ref["allow_b"], eps)["ok"]
    # A position with ΔW = 0 exactly: its sign is rounding's choice, so either is allowed.
    lora_b[5] = 0.0
    ref = gpu_check.reference_with_bounds(lora_b, lora_a, indices)
    assert ref["ambiguous"] == 1
    flipped = ref["grad_b"].clone()
    flipped[5] += lora_a[:, indices[5, 1]].double() / indices.shape[0]
    assert gpu_check.grad_check(flipped.float(), ref["grad_b"], ref["allow_b"], eps)["ok"]


@pytest.mark.parametrize(
    ("name", "is_fa2"),
    [
        ("flash_attn::_flash_attn_forward", True),
        ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>(Flash_fwd_params)", True),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>(params)", False),
        ("aten::_scaled_dot_product_flash_attention", False),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", False),
    ],
)
def test_flash_attn_events_are_told_from_pytorchs_own_flash_kernels(name, is_fa2):
    assert gpu_check_model.is_flash_attn_event(name) is is_fa2


def test_sections_past_the_time_budget_are_skipped_and_fail_the_run(tmp_path):
    code, stderr, report = _run_smoke(tmp_path, "--budget-s", "0", timeout=120)
    assert code == 1, stderr[-3000:]
    assert report["environment"]["penalty_backends"]  # the first section always runs
    assert report["correctness"] == {"skipped": "time budget of 0 s spent"}
    assert report["all_ok"] is False
