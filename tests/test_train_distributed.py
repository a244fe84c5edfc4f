"""The smoke preset under torchrun with 2 CPU processes (Gloo): it runs and writes every output."""

import json
import os
import subprocess
import sys

import torch
from peft import PeftModel

from sefe_fast.model.lora import load_projector
from sefe_fast.model.tiny import TinyConfig, load_tiny_from
from sefe_fast.reglora import load_key_elements
from sefe_fast.train.loop import FAIL_AFTER_STEPS_ENV


def test_smoke_preset_with_two_processes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "SEFE_FAST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop(FAIL_AFTER_STEPS_ENV, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "-m", "sefe_fast.train", "coin", "--preset", "smoke", "--output-dir", str(out),
        "--stage0-steps", "2",  # the shipped stage-0 weights are not needed for this check
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    tasks = ["ScienceQA", "TextVQA", "ImageNet"]
    assert results["tasks"] == tasks and results["method"] == "sefe"
    assert results["config"]["world_size"] == 2
    for t, row in enumerate(results["accuracy"]):
        assert all((v is not None) == (i <= t) for i, v in enumerate(row))
    assert set(results["metrics"]) >= {"MFT", "MFN", "MAA", "BWT"}
    assert "accuracy" in proc.stdout and "MFT" in proc.stdout  # matrix printed by rank 0 only
    assert proc.stdout.count("MFT") == 1

    # Predictions: every test record of every evaluated task, gathered from both ranks.
    n_test = json.loads((out / "minicoin" / "ScienceQA" / "test.json").read_text())
    for stage, trained in enumerate(tasks, start=1):
        for evaluated in tasks[:stage]:
            path = out / "predictions" / f"stage{stage:02d}_{trained}" / f"{evaluated}.jsonl"
            rows = [json.loads(x) for x in path.read_text().splitlines()]
            assert len(rows) == len(n_test)
            assert [r["question_id"] for r in rows] == [
                f"{evaluated}_test_{i:05d}" for i in range(len(rows))
            ]

    # Adapters load with plain peft on the stage-0 base; key elements, log and report exist.
    base_dir = next((tmp_path / "cache").glob("tiny-stage0-*[!l]"))
    for stage, task in enumerate(tasks, start=1):
        adapter = out / "adapters" / f"stage{stage:02d}_{task}"
        model = PeftModel.from_pretrained(load_tiny_from(base_dir, TinyConfig()).model, adapter)
        load_projector(model, adapter / "projector.safetensors")
        assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B" in n)
        keys = load_key_elements(out / "key_elements" / f"stage{stage:02d}_{task}.safetensors")
        assert len(keys) == 4 * 7
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [1] * 4 + [2] * 4 + [3] * 4  # rank 0 only, log_every 1
    assert all(r["penalty"] == 0 for r in log if r["stage"] == 1)
    # Step 1 has lr 0 (warmup) so B stays 0 until step 2's update: ΔW ≠ 0 from step 3 on.
    assert all(r["penalty"] > 0 for r in log if r["stage"] > 1 and r["step"] > 2)
    assert (out / "report.md").is_file()
    assert (out / "asd" / "TextVQA" / "train_x20.json").is_file()
