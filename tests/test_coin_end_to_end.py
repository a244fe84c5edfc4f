"""Real CoIN formats, end to end: `torchrun -m sefe_fast.train coin --preset paper` on the
eight-task fixture with a tiny random HF LLaVA, every test record of every task scored.

Also: a one-task run ends with BWT undefined and its report written (issue 22, item 7).
"""

import json
import os
import subprocess
import sys

import pytest
from coin_fixture import write_coin_fixture
from tiny_hf_llava import write_tiny_llava

from sefe_fast.data.textvqa import TEXTVQA_ANNOTATION_FILE
from sefe_fast.evaluation import read_predictions, rescore_run
from sefe_fast.run_layout import predictions_path
from sefe_fast.tasks import COIN_TASKS

# One optimizer step of 4 samples per task (2 ranks x 2), a small LoRA, 6 decoded tokens.
FAST = [
    "--max-steps",
    "1",
    "--global-batch-size",
    "4",
    "--per-device-batch-size",
    "2",
    "--max-new-tokens",
    "6",
    "--eval-batch-size",
    "4",
    "--lora-r",
    "4",
    "--lora-alpha",
    "8",
    "--save-every",
    "0",
    "--num-proc",
    "1",
]


@pytest.fixture(scope="module")
def real_coin(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_coin")
    counts = write_coin_fixture(root / "data")
    return root / "data", write_tiny_llava(root), counts


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _torchrun(data, model, out, method, *extra):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--standalone", "-m", "sefe_fast.train", "coin",
        "--preset", "paper", "--model", str(model), "--data", str(data),
        "--method", method, "--output-dir", str(out), *FAST, *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)


def _check_every_record_scored(data, out, counts):
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == list(COIN_TASKS)
    assert results["config"]["max_new_tokens"] == 6
    human = {
        str(entry["question_id"]): entry["answers"]
        for entry in json.loads((data / "TextVQA" / TEXTVQA_ANNOTATION_FILE).read_text())["data"]
    }
    for stage, trained in enumerate(COIN_TASKS, start=1):
        for index, task in enumerate(COIN_TASKS[:stage]):
            test = json.loads((data / task / "test.json").read_text())
            rows = read_predictions(predictions_path(out, stage, trained, task))
            # Every test record, text-only ScienceQA included, is scored once.
            assert len(rows) == len(test) == counts[task]
            assert [r["question_id"] for r in rows] == [str(t["question_id"]) for t in test]
            assert results["scores"][stage - 1][index]["n"] == len(test)
            if task == "TextVQA":  # the list it was scored against, not test.json's string
                assert [r["answer"] for r in rows] == [human[str(t["question_id"])] for t in test]
            if task == "Grounding":
                assert [r["answer"] for r in rows] == [t["answer_bbox"] for t in test]
    # Rescoring from the prediction files alone, both ways, gives every cell again.
    for legacy in (False, True):
        rescored = rescore_run(out, legacy=legacy)
        for stage in range(len(COIN_TASKS)):
            assert [s["n"] for s in rescored["scores"][stage][: stage + 1]] == [
                counts[t] for t in COIN_TASKS[: stage + 1]
            ]
    assert rescore_run(out)["accuracy"] == results["accuracy"]
    metrics = results["metrics"]
    assert metrics["BWT"] == pytest.approx(metrics["MFN"] - metrics["MFT"])
    assert (out / "report.md").is_file()


@pytest.mark.slow
def test_paper_preset_on_real_coin_formats_scores_every_record(real_coin, tmp_path):
    """Official rules pinned end to end: ScienceQA's text-only questions are trained and
    scored like the others; TextVQA is scored against the annotation file's ten answers;
    Grounding against answer_bbox; every test record of every task gets one prediction
    at every stage (2 processes, so text-only micro-batches meet image ones under DDP)."""
    data, model, counts = real_coin
    out = tmp_path / "run"
    proc = _torchrun(data, model, out, "lora")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_every_record_scored(data, out, counts)
    evaluation = subprocess.run(
        [sys.executable, "-m", "sefe_fast.evaluation", str(out), "--legacy"],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert evaluation.returncode == 0, evaluation.stderr
    assert "legacy scoring" in evaluation.stdout


@pytest.mark.slow
def test_sefe_on_real_coin_formats_goes_through_asd(real_coin, tmp_path):
    """The same run with SEFE: every task's training file goes through ASD first."""
    data, model, counts = real_coin
    out = tmp_path / "run"
    proc = _torchrun(data, model, out, "sefe")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_every_record_scored(data, out, counts)


def test_missing_textvqa_annotations_stop_the_run_before_training(real_coin, tmp_path):
    """For real CoIN, TextVQA without its annotation file is an error naming the paths
    tried, raised before any training."""
    data, model, _ = real_coin
    bare = tmp_path / "data"
    (bare / "TextVQA").mkdir(parents=True)
    for name in ("train.json", "test.json"):
        (bare / "TextVQA" / name).write_text((data / "TextVQA" / name).read_text())
    image_root = tmp_path / "image_root"  # the images, without the annotation file
    image_root.mkdir()
    (image_root / "images").symlink_to(data / "images")
    proc = subprocess.run(
        [sys.executable, "-m", "sefe_fast.train", "coin", "--preset", "paper",
         "--model", str(model), "--data", str(bare), "--image-root", str(image_root),
         "--tasks", "TextVQA", "--output-dir", str(tmp_path / "run"), *FAST],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"{bare}/TextVQA/{TEXTVQA_ANNOTATION_FILE}" in proc.stderr
    assert "--textvqa-annotations" in proc.stderr
    assert not (tmp_path / "run" / "adapters").exists()


def test_one_task_run_reports_bwt_as_undefined(real_coin, tmp_path):
    """Issue 22 item 7: BWT needs an earlier task; a one-task run prints it as undefined,
    exits 0 and still writes results.json (BWT null) and report.md.

    Two ranks, one sample each per step, six steps over ScienceQA's four samples (two
    text-only): some step gives a rank only a text-only sample, and DDP must still see the
    projector's gradient on that rank (without `vision_anchor` DDP stops at the step after:
    "parameters that were not used in producing loss")."""
    data, model, _ = real_coin
    out = tmp_path / "run"
    one_each = ["--tasks", "ScienceQA", "--max-steps", "6", "--global-batch-size", "2",
                "--per-device-batch-size", "1"]  # fmt: skip
    proc = _torchrun(data, model, out, "lora", *one_each)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "BWT undefined" in proc.stdout
    assert json.loads((out / "results.json").read_text())["metrics"]["BWT"] is None
    assert "BWT is undefined" in (out / "report.md").read_text()
