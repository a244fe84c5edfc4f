"""Issue 22: a run directory nothing corrupts, bad settings refused before any work.

The fault tests run real `python -m sefe_fast.train` processes (a smoke run of seconds) and
kill them: abruptly after N steps (the loop's test hook, like a SIGKILL) or with SIGKILL.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from smoke_run import ARGS, run_smoke, start_smoke, warm_stage0

from sefe_fast.io_utils import TEMPORARY_NAME
from sefe_fast.run_lock import RunDirLockedError, acquire_run_lock, hold_run_dir
from sefe_fast.train.checkpoint import RunMismatchError, RunState, RunStateError
from sefe_fast.train.cli import parse_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A shared stage-0 cache, the tiny model pretrained (2 steps) once per module."""
    return warm_stage0(tmp_path_factory.mktemp("cache"))


def _log_steps(run):
    rows = (run / "train_log.jsonl").read_text().splitlines()
    return [(r["stage"], r["step"]) for r in map(json.loads, rows)]


def _temporaries(run):
    return [p for p in run.rglob(".*") if TEMPORARY_NAME.match(p.name)]


def _wait_for(predicate, what, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


ALL_STEPS = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (2, 3), (2, 4)]


# ---------------------------------------------------------------- 1: changed settings


def test_changed_settings_after_a_kill_are_refused_and_restart_starts_over(tmp_path, cache):
    run = tmp_path / "R"
    killed = run_smoke(run, cache, fail_after=3)  # task 1, after step 3: checkpoint at step 2
    assert killed.returncode == 86, killed.stderr[-3000:]
    checkpoint = run / "checkpoints" / "stage01_ScienceQA.pt"
    assert checkpoint.is_file()
    assert json.loads((run / "run_state.json").read_text())["completed"] == []
    mtime = checkpoint.stat().st_mtime_ns

    other = run_smoke(run, cache, "--lr", "1e-3")
    assert other.returncode == 1, other.stderr[-3000:]
    assert "--lr 0.002 → 0.001" in other.stderr  # names what differs ...
    assert "--output-dir" in other.stderr and "--restart" in other.stderr  # ... and the ways out
    assert "Traceback" not in other.stderr
    assert "resuming" not in other.stdout
    assert checkpoint.stat().st_mtime_ns == mtime  # refused before touching anything

    restarted = run_smoke(run, cache, "--lr", "1e-3", "--restart")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "--restart: removed" in restarted.stdout and "resuming" not in restarted.stdout
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["lr"] == 1e-3
    assert _log_steps(run) == ALL_STEPS  # task 1 trained afresh, its old rows gone


def test_a_run_that_did_nothing_yet_does_not_bind_its_directory(tmp_path):
    RunState.fresh("f", ["ScienceQA"], {"lr": 1.0}).save(tmp_path)  # stopped before step 1
    state = RunState.load_or_fresh(tmp_path, "g", ["TextVQA"], {"lr": 2.0})
    assert (state.fingerprint, state.tasks, state.config) == ("g", ["TextVQA"], {"lr": 2.0})
    (tmp_path / "train_log.jsonl").write_text("")  # it trained: now the settings must match
    with pytest.raises(RunMismatchError, match=r"--lr 1\.0 → 2\.0"):
        RunState.load_or_fresh(tmp_path, "g", ["TextVQA"], {"lr": 2.0})


def test_stray_progress_without_run_state_is_not_resumed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(RunMismatchError, match=r"checkpoints but no run_state\.json"):
        RunState.load_or_fresh(tmp_path, "f", ["ScienceQA"], {"lr": 1.0})
    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / "run_state.json").write_text('{"fingerprint": "f", "tas')  # truncated
    with pytest.raises(RunStateError, match=r"run_state\.json: the run's progress is damaged"):
        RunState.load_or_fresh(tmp_path, "f", ["ScienceQA"], {"lr": 1.0})


# ---------------------------------------------------------------- 2, 11: lock, kills


def test_second_run_fails_at_once_and_a_killed_runs_lock_and_temporaries_are_cleared(
    tmp_path, cache
):
    run = tmp_path / "R"
    with open(tmp_path / "first.log", "w") as log_file:
        first = start_smoke(run, cache, log_file=log_file)
        try:
            _wait_for(lambda: list((run / "checkpoints").glob("*.pt")), "checkpoint", first)
            # Paused, the first run stays mid-task however long the second takes to start.
            first.send_signal(signal.SIGSTOP)
            second = run_smoke(run, cache, "--method", "lora")
            assert second.returncode == 1, second.stderr[-3000:]
            assert "another run is writing into" in second.stderr
            assert f"pid {first.pid} on {socket.gethostname()}" in second.stderr
            assert first.poll() is None  # the first run is untouched by the attempt
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
    lock = json.loads((run / "run.lock").read_text())
    assert lock["pid"] == first.pid  # the killed run's lock stays behind
    # What a kill during atomic writes leaves (names as io_utils' writers make them).
    (run / ".results.json.k3j4h5g6.tmp.json").write_text("{")
    (run / "adapters" / ".stage01_ScienceQA.ab12cd34").mkdir(parents=True)

    rerun = run_smoke(run, cache)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"its process {first.pid} on this host is gone" in rerun.stdout
    # ≥ 2: the run stopped by SIGSTOP may itself have been inside an atomic write.
    removed = re.search(r"removed (\d+) temporary file\(s\)", rerun.stdout)
    assert removed and int(removed.group(1)) >= 2, rerun.stdout[-3000:]
    assert not _temporaries(run)
    assert not (run / "run.lock").exists()  # released at the end
    assert json.loads((run / "results.json").read_text())["config"]["method"] == "sefe"
    assert _log_steps(run) == ALL_STEPS  # one row per step: the log reads as one run


def test_lock_is_exclusive_and_only_a_dead_owner_is_taken_over(tmp_path, capsys):
    path = acquire_run_lock(tmp_path)
    with pytest.raises(RunDirLockedError, match=f"pid {os.getpid()}"):
        acquire_run_lock(tmp_path)
    path.unlink()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {"pid": dead.pid, "host": socket.gethostname(), "started": "x"}
    path.write_text(json.dumps(record))
    with hold_run_dir(tmp_path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "is gone" in capsys.readouterr().out
    assert not path.exists()
    # Another host's lock cannot be judged from here: refused, with the way out.
    path.write_text(json.dumps({**record, "host": "elsewhere"}))
    with pytest.raises(RunDirLockedError, match=r"delete .*run\.lock"):
        acquire_run_lock(tmp_path)


def test_ranks_other_than_zero_take_no_lock(tmp_path):
    with hold_run_dir(tmp_path, enabled=False):
        assert not (tmp_path / "run.lock").exists()


# ---------------------------------------------------------------- 4: moved run dir


def test_moved_run_directory_resumes_from_its_own_files(tmp_path, cache):
    original = tmp_path / "original"
    killed = run_smoke(original, cache, fail_after=5)  # task 1 done, task 2 at step 1
    assert killed.returncode == 86, killed.stderr[-3000:]
    state = json.loads((original / "run_state.json").read_text())
    assert state["completed"] == [1]
    assert state["method_state"]["key_element_files"] == [
        "key_elements/stage01_ScienceQA.safetensors"
    ]
    moved = tmp_path / "moved"
    shutil.move(original, moved)  # the original path no longer exists

    resumed = run_smoke(moved, cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not original.exists()
    results = json.loads((moved / "results.json").read_text())
    assert all(a is not None for a in results["accuracy"][1])


# ---------------------------------------------------------------- 5: settings


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tasks", "ScienceQA,ScienceQA"], "given more than once"),
        (["--max-steps", "0"], "--max-steps 0: must be >= 1"),
        (["--task-steps", "TextVQA=0"], "steps must be >= 1"),
    ],
)
def test_duplicate_tasks_and_zero_steps_are_refused_before_any_work(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_config([*ARGS, *flags])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
