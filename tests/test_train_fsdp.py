"""`--fsdp` with 2 CPU processes (Gloo): the same training and predictions as DDP, resumable.

The frozen model is sharded over the two ranks, the LoRA and projector stay whole, and
their gradients are averaged by hand; a task's LoRA is merged shard by shard. If any of
that were wrong (a shard merged with the wrong rows, gradients not averaged, a rank
decoding out of step) the losses of the later tasks, the adapters or the predictions
would differ from the DDP run's.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sefe_fast.model.sharding import add_to_weight
from sefe_fast.train.loop import FAIL_AFTER_STEPS_ENV

ARGS = [
    "coin", "--preset", "smoke", "--tasks", "ScienceQA,TextVQA,ImageNet",
    "--stage0-steps", "2", "--minicoin-n-train", "48", "--max-steps", "3",
    "--save-every", "1",
    # Dropout off: DDP shares the prompt prefix's dropout over a batch, FSDP does not.
    "--lora-dropout", "0",
    # 5 records: rank 0 decodes 3 (2 batches), rank 1 decodes 2 (1 batch, then a repeat).
    "--max-test-per-task", "5", "--eval-batch-size", "2",
]  # fmt: skip


def _torchrun(out, cache, *extra, fail_after=None):
    env = {**os.environ, "SEFE_FAST_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop(FAIL_AFTER_STEPS_ENV, None)
    if fail_after is not None:
        env[FAIL_AFTER_STEPS_ENV] = str(fail_after)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "-m", "sefe_fast.train", *ARGS, "--output-dir", str(out), *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _log(run):
    rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    return [(r["phase"], r["step"], r["loss"], r["penalty"]) for r in rows]


def test_fsdp_trains_like_ddp_and_resumes(tmp_path):
    cache = tmp_path / "cache"
    ddp = _torchrun(tmp_path / "ddp", cache)
    assert ddp.returncode == 0, ddp.stderr[-4000:]

    # Killed in task 2 after its first step, then rerun: resumes from the checkpoint.
    killed = _torchrun(tmp_path / "fsdp", cache, "--fsdp", fail_after=4)
    assert killed.returncode != 0
    assert json.loads((tmp_path / "fsdp" / "run_state.json").read_text())["completed"] == [1]
    fsdp = _torchrun(tmp_path / "fsdp", cache, "--fsdp")
    assert fsdp.returncode == 0, fsdp.stderr[-4000:]
    assert "resuming TextVQA from step 1" in fsdp.stdout

    a = json.loads((tmp_path / "ddp" / "results.json").read_text())
    b = json.loads((tmp_path / "fsdp" / "results.json").read_text())
    assert b["config"]["fsdp"] and b["config"]["accel"]["fsdp_blocks"] > 0
    # Each rank holds about half of the weights (the projector, a small part, is whole).
    assert 0.5 <= b["config"]["accel"]["fsdp_rank0_param_share"] < 0.6
    assert "fsdp_blocks" not in a["config"]["accel"]
    assert b["accuracy"] == a["accuracy"]

    log_a, log_b = _log(tmp_path / "ddp"), _log(tmp_path / "fsdp")
    assert [r[:2] for r in log_b] == [r[:2] for r in log_a] and len(log_a) == 9
    for (phase, step, loss_a, pen_a), (_, _, loss_b, pen_b) in zip(log_a, log_b):
        assert loss_b == pytest.approx(loss_a, rel=1e-5), (phase, step)
        assert pen_b == pytest.approx(pen_a, rel=1e-4, abs=1e-9), (phase, step)
    assert any(r[3] > 0 for r in log_a)  # the RegLoRA penalty is live in tasks 2 and 3

    for stage in ("stage01_ScienceQA", "stage02_TextVQA", "stage03_ImageNet"):
        for name in ("adapter_model.safetensors", "projector.safetensors"):
            wa = load_file(tmp_path / "ddp" / "adapters" / stage / name)
            wb = load_file(tmp_path / "fsdp" / "adapters" / stage / name)
            assert wa.keys() == wb.keys()
            for key in wa:
                torch.testing.assert_close(wb[key], wa[key], rtol=1e-3, atol=1e-4, msg=key)

    preds = sorted((tmp_path / "ddp" / "predictions").rglob("*.jsonl"))
    assert len(preds) == 6
    for path in preds:
        rows = path.read_text().splitlines()
        assert len(rows) == 5
        assert (
            tmp_path / "fsdp" / path.relative_to(tmp_path / "ddp")
        ).read_text().splitlines() == rows


def test_add_to_weight_checks_the_shape():
    weight = torch.zeros(4, 3)
    add_to_weight(weight, torch.ones(4, 3, dtype=torch.float64))
    assert torch.equal(weight, torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"delta of shape \(3, 4\) for weight \(4, 3\)"):
        add_to_weight(weight, torch.ones(3, 4))
