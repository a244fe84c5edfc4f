"""The continual driver: outputs, the method seam, and kill-then-resume = uninterrupted."""

import json
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file
from smoke_run import ARGS, TASKS, run_smoke

from sefe_fast.methods import METHODS, ContinualMethod
from sefe_fast.train.cli import parse_config
from sefe_fast.train.continual import run_continual


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A shared stage-0 cache, so the tiny model is pretrained (2 steps) once per module."""
    return tmp_path_factory.mktemp("cache")


def _run(out, cache, *extra, fail_after=None):
    return run_smoke(out, cache, *extra, fail_after=fail_after)


def _adapter_weights(run):
    return {
        d.name: load_file(d / "adapter_model.safetensors")
        for d in sorted((run / "adapters").iterdir())
    }


def _predictions(run):
    return {
        str(p.relative_to(run)): p.read_text()
        for p in sorted((run / "predictions").rglob("*.jsonl"))
    }


def test_killed_run_resumes_to_the_same_results(tmp_path, cache):
    full = _run(tmp_path / "full", cache)
    assert full.returncode == 0, full.stderr[-3000:]

    # Killed abruptly during task 2, step 3 (its checkpoint at step 2 exists).
    killed = _run(tmp_path / "resumed", cache, fail_after=7)
    assert killed.returncode == 86, killed.stderr[-3000:]
    state = json.loads((tmp_path / "resumed" / "run_state.json").read_text())
    assert state["completed"] == [1]
    assert (tmp_path / "resumed" / "checkpoints" / "stage02_TextVQA.pt").is_file()

    resumed = _run(tmp_path / "resumed", cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming TextVQA from step 2" in resumed.stdout
    a = json.loads((tmp_path / "full" / "results.json").read_text())
    b = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert a["accuracy"] == b["accuracy"]
    assert a["metrics"] == b["metrics"]
    assert _predictions(tmp_path / "full") == _predictions(tmp_path / "resumed")
    wa, wb = _adapter_weights(tmp_path / "full"), _adapter_weights(tmp_path / "resumed")
    assert wa.keys() == wb.keys() == {"stage01_ScienceQA", "stage02_TextVQA"}
    for stage in wa:
        for key in wa[stage]:
            assert torch.equal(wa[stage][key], wb[stage][key]), (stage, key)
    # The in-task checkpoint is gone once the stage completed; the log reads as one run.
    assert not list((tmp_path / "resumed" / "checkpoints").glob("*.pt"))
    log = [
        json.loads(x)
        for x in (tmp_path / "resumed" / "train_log.jsonl").read_text().split("\n")
        if x
    ]
    steps = [(r["stage"], r["step"]) for r in log]
    assert steps == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (2, 3), (2, 4)]

    # Rerunning a finished run changes nothing; another config in the same dir is refused.
    again = _run(tmp_path / "resumed", cache)
    assert again.returncode == 0
    assert (
        json.loads((tmp_path / "resumed" / "results.json").read_text())["accuracy"] == b["accuracy"]
    )
    other = _run(tmp_path / "resumed", cache, "--lr", "0.01")
    assert other.returncode != 0 and "other settings" in other.stderr


class SpyMethod(ContinualMethod):
    """Records every hook call and what the model looked like at that moment."""

    name = "spy"
    calls: ClassVar[list] = []

    def bind_model(self, bundle):
        self.calls.append(("bind", bundle.tokenizer is not None))

    def prepare_train_file(self, task, train_json, work_dir):
        self.calls.append(("prepare", task))
        return train_json

    def before_predictions(self, model, task):
        n_lora = sum("lora_" in n for n, _ in model.named_parameters())
        self.calls.append(("predict", task, n_lora > 0))

    def before_task(self, model, task, stage):
        n_lora = sum("lora_" in n for n, _ in model.named_parameters())
        self.calls.append(("before", task, stage, n_lora > 0))

    def extra_loss(self, model, step):
        self.calls.append(("extra", step))
        return None

    def after_task(self, model, task, stage, run_dir, write):
        n_lora = sum("lora_" in n for n, _ in model.named_parameters())
        self.calls.append(("after", task, stage, n_lora > 0, write))

    def state_dict(self):
        return {"n_calls": len(self.calls)}


def test_every_method_hook_is_called_in_order(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("SEFE_FAST_CACHE", str(cache))
    monkeypatch.setitem(METHODS, "spy", SpyMethod)
    SpyMethod.calls = []
    # --task-steps: TextVQA trains 3 steps, ScienceQA the preset's 4
    config = parse_config(
        [
            *ARGS,
            "--method",
            "spy",
            "--task-steps",
            "TextVQA=3",
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    results = run_continual(config)
    assert SpyMethod.calls == [
        ("bind", True),
        ("prepare", "ScienceQA"),
        ("before", "ScienceQA", 1, True),
        *[("extra", s) for s in range(4)],
        ("after", "ScienceQA", 1, True, True),  # before the merge: LoRA still attached
        ("predict", "ScienceQA", False),  # after the merge
        ("prepare", "TextVQA"),
        ("before", "TextVQA", 2, True),
        *[("extra", s) for s in range(3)],
        ("after", "TextVQA", 2, True, True),
        ("predict", "ScienceQA", False),
        ("predict", "TextVQA", False),
    ]
    state = json.loads((tmp_path / "run" / "run_state.json").read_text())
    assert state["method_state"] == {"n_calls": len(SpyMethod.calls)}
    assert results["method"] == "spy"
    assert results["tasks"] == TASKS.split(",")
    assert results["accuracy"][0][1] is None and results["accuracy"][1][0] is not None
