"""`--method lota` end to end: calibration, mask, masked training per task; killed inside the
calibration and again inside the masked training, the rerun ends with the same masks,
weights, predictions and accuracies as an uninterrupted run."""

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file
from smoke_run import ARGS, run_smoke, smoke_env

from sefe_fast.methods.fft import WEIGHTS_FILE
from sefe_fast.methods.lota import dense_mask
from sefe_fast.reglora import load_key_elements

EXTRA = ("--method", "lota", "--lota-calibration-steps", "2", "--save-every", "1")
STAGES = ("stage01_ScienceQA", "stage02_TextVQA")


def _outputs(run):
    masks = {s: load_key_elements(run / "lota" / f"{s}.safetensors") for s in STAGES}
    weights = {s: load_file(run / "adapters" / s / WEIGHTS_FILE) for s in STAGES}
    predictions = {
        str(p.relative_to(run)): p.read_text() for p in sorted((run / "predictions").rglob("*"))
        if p.is_file()
    }  # fmt: skip
    return masks, weights, predictions


def test_lota_run_killed_in_each_phase_resumes_to_the_same_results(tmp_path):
    cache = tmp_path / "cache"
    full = run_smoke(tmp_path / "full", cache, *EXTRA)
    assert full.returncode == 0, full.stderr[-4000:]
    log = [json.loads(x) for x in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    phases = [(r["phase"], r["step"]) for r in log]
    assert phases[:6] == [
        ("stage01_ScienceQA.calibrate", 1), ("stage01_ScienceQA.calibrate", 2),
        ("stage01_ScienceQA", 1), ("stage01_ScienceQA", 2),
        ("stage01_ScienceQA", 3), ("stage01_ScienceQA", 4),
    ]  # fmt: skip

    run = tmp_path / "resumed"
    # Task 1: 2 + 4 steps; killed after task 2's first calibration step, ...
    killed = run_smoke(run, cache, *EXTRA, fail_after=7)
    assert killed.returncode == 86, killed.stderr[-4000:]
    assert (run / "checkpoints" / "stage02_TextVQA.calibrate.pt").is_file()
    assert not (run / "lota" / "stage02_TextVQA.safetensors").exists()
    # ... then (counting anew) after its second calibration step and two masked steps.
    killed = run_smoke(run, cache, *EXTRA, fail_after=3)
    assert killed.returncode == 86, killed.stderr[-4000:]
    assert "resuming TextVQA calibrate from step 1" in killed.stdout
    assert not (run / "checkpoints" / "stage02_TextVQA.calibrate.pt").exists()
    assert (run / "lota" / "stage02_TextVQA.safetensors").is_file()
    resumed = run_smoke(run, cache, *EXTRA)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming TextVQA from step 2" in resumed.stdout
    assert "calibrate" not in resumed.stdout.split("resuming TextVQA from step 2")[1]

    a = json.loads((tmp_path / "full" / "results.json").read_text())
    b = json.loads((run / "results.json").read_text())
    assert a["accuracy"] == b["accuracy"]
    assert a["config"]["method_detail"]["lota_used_share"] == [0.2]  # two tasks × 10 %
    masks_a, weights_a, predictions_a = _outputs(tmp_path / "full")
    masks_b, weights_b, predictions_b = _outputs(run)
    assert predictions_a == predictions_b
    for stage in STAGES:
        assert masks_a[stage].keys() == masks_b[stage].keys()
        for name in masks_a[stage]:
            assert torch.equal(masks_a[stage][name].linear(), masks_b[stage][name].linear())
        for key in weights_a[stage]:
            assert torch.equal(weights_a[stage][key], weights_b[stage][key]), (stage, key)
    assert not list((run / "checkpoints").glob("*.pt"))
    _assert_rule(masks_a, weights_a)


def _assert_rule(masks, weights):
    """Task 2 changed no target entry outside its mask; its mask avoids task 1's."""
    first, second = (masks[s] for s in STAGES)
    for name in second:
        a, b = (dense_mask(m[name]) for m in (first, second))
        assert not (a & b).any() and int(b.sum()) == int(0.1 * b.numel()), name
        w1, w2 = (weights[s][name] for s in STAGES)
        assert torch.equal(w2[~b], w1[~b]), name
        assert (w2[b] != w1[b]).float().mean() > 0.9, name


def test_lota_under_torchrun(tmp_path):
    """Two ranks (DDP): the masked gradients are averaged and the rule holds end to end."""
    run = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "-m", "sefe_fast.train", *ARGS, "--per-device-batch-size", "2", "--output-dir", str(run), *EXTRA,
    ]  # fmt: skip
    env = {**smoke_env(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    masks, weights, _ = _outputs(run)
    _assert_rule(masks, weights)
