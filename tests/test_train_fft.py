"""`--method fft` end to end: one process, killed and resumed, and `--fsdp` on 2 CPU processes
(Gloo) with the trained weights and their AdamW state sharded, all to the same results.

One process trains on micro-batches of 8; two ranks on 4 each, which with
`--no-group-by-length` are the same 8 samples per step (DistributedSampler deals one
permutation out in turn). If the sharded gradients were not reduce-scattered right, the
clipping norm not summed over shards, or a checkpoint restored the wrong rows of a shard,
the losses or the saved weights would differ.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from smoke_run import smoke_env

from sefe_fast.methods.fft import WEIGHTS_FILE

ARGS = [
    "coin", "--preset", "smoke", "--tasks", "ScienceQA,TextVQA", "--method", "fft",
    "--stage0-steps", "2", "--minicoin-n-train", "24", "--minicoin-n-test", "8",
    "--global-batch-size", "8", "--no-group-by-length", "--save-every", "1",
]  # fmt: skip
STAGES = ("stage01_ScienceQA", "stage02_TextVQA")


def _run(out, cache, *, ranks=1, fail_after=None):
    """One process (micro-batches of 8) or `ranks` sharded ranks (8 / ranks each)."""
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    per_rank = ["--per-device-batch-size", str(8 // ranks), *(["--fsdp"] if ranks > 1 else [])]
    cmd = [*launcher, "-m", "sefe_fast.train", *ARGS, *per_rank, "--output-dir", str(out)]
    env = {**smoke_env(cache, fail_after), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _losses(run):
    rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"], r["grad_norm"]) for r in rows]


def _weights(run):
    return {s: load_file(run / "adapters" / s / WEIGHTS_FILE) for s in STAGES}


def test_fft_resumes_and_fsdp_trains_like_one_process(tmp_path):
    cache = tmp_path / "cache"
    full = _run(tmp_path / "full", cache)
    assert full.returncode == 0, full.stderr[-4000:]

    # One process, killed in task 2 after its second step, then rerun.
    killed = _run(tmp_path / "resumed", cache, fail_after=6)
    assert killed.returncode == 86, killed.stderr[-4000:]
    resumed = _run(tmp_path / "resumed", cache)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming TextVQA from step 2" in resumed.stdout
    # Two ranks, sharded, killed at the same place, then rerun.
    killed = _run(tmp_path / "fsdp", cache, ranks=2, fail_after=6)
    assert killed.returncode != 0
    assert json.loads((tmp_path / "fsdp" / "run_state.json").read_text())["completed"] == [1]
    fsdp = _run(tmp_path / "fsdp", cache, ranks=2)
    assert fsdp.returncode == 0, fsdp.stderr[-4000:]
    assert "resuming TextVQA from step 2" in fsdp.stdout

    a, b, c = (
        json.loads((tmp_path / r / "results.json").read_text()) for r in ("full", "resumed", "fsdp")
    )
    assert b["accuracy"] == a["accuracy"] and c["accuracy"] == a["accuracy"]
    # Parameters and optimizer state both about halved on rank 0 (the projector is whole).
    accel = c["config"]["accel"]
    assert 0.5 <= accel["fsdp_rank0_param_share"] < 0.6
    assert 0.5 <= accel["fsdp_rank0_optimizer_state_share"] < 0.6

    log_a = _losses(tmp_path / "full")
    assert [r[:2] for r in log_a] == [(s, k) for s in (1, 2) for k in (1, 2, 3, 4)]
    assert _losses(tmp_path / "resumed") == log_a  # the same process count: bit for bit
    for (stage, step, loss_a, norm_a), (_, _, loss_c, norm_c) in zip(
        log_a, _losses(tmp_path / "fsdp")
    ):
        assert loss_c == pytest.approx(loss_a, rel=1e-5), (stage, step)
        assert norm_c == pytest.approx(norm_a, rel=1e-4), (stage, step)

    wa, wb, wc = (_weights(tmp_path / r) for r in ("full", "resumed", "fsdp"))
    for stage in STAGES:
        assert wa[stage].keys() == wb[stage].keys() == wc[stage].keys()
        assert any("layers.0.mlp.up_proj" in k for k in wa[stage])
        for key in wa[stage]:
            assert torch.equal(wb[stage][key], wa[stage][key]), (stage, key)
            torch.testing.assert_close(wc[stage][key], wa[stage][key], rtol=1e-4, atol=1e-5)
    # Task 2 moved the weights task 1 left.
    moved = [k for k in wa[STAGES[0]] if not torch.equal(wa[STAGES[0]][k], wa[STAGES[1]][k])]
    assert len(moved) == len(wa[STAGES[0]])
