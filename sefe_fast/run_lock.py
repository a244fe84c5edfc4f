"""One writer per run directory: `run_dir/run.lock`, taken atomically by rank 0.

The lock file holds the pid, host name and start time of the run that owns the directory.
It is created with `O_CREAT | O_EXCL`, so of two runs started into one `--output-dir` at
the same moment exactly one gets it; the other stops at once (`RunDirLockedError`) before
touching anything. A lock whose process is gone is taken over with a note: the owner was on
this host and its pid is no longer alive, or the file is empty or unreadable and older than
`UNREADABLE_LOCK_GRACE_S` (a run killed between creating and writing it). A lock held by
another host cannot be checked from here: the message says how to remove it by hand.
While the lock is held, rank 0 also removes the temporary files a killed run left behind
(`io_utils.remove_stale_temporaries`): no other process can be writing them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sefe_fast.io_utils import remove_stale_temporaries
from sefe_fast.run_layout import lock_path

# An empty or unreadable lock younger than this may still be being written by its owner.
UNREADABLE_LOCK_GRACE_S = 30.0


class RunDirLockedError(RuntimeError):
    """Another live run holds the run directory's lock."""


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_owner(path: Path) -> dict[str, Any] | None:
    """The lock's content, or None if it is empty or not a lock record."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(owner, dict) and isinstance(owner.get("pid"), int) and "host" in owner
    return owner if ok else None


def _stale_reason(path: Path, owner: dict[str, Any] | None) -> str | None:
    """Why the existing lock can be taken over (None: it is held, or cannot be judged)."""
    if owner is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return "it was just released"
        return f"it is unreadable and {age:.0f} s old" if age > UNREADABLE_LOCK_GRACE_S else None
    if owner["host"] == socket.gethostname() and not _pid_alive(owner["pid"]):
        return f"its process {owner['pid']} on this host is gone"
    return None


def acquire_run_lock(run_dir: str | Path) -> Path:
    """Take `run_dir/run.lock` for this process (RunDirLockedError if a live run has it)."""
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for _ in range(3):  # another process may take over the same stale lock meanwhile
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_owner(path)
            reason = _stale_reason(path, owner)
            if reason is None:
                held_by = (
                    f"pid {owner['pid']} on {owner['host']}, started {owner.get('started')}"
                    if owner
                    else "a run that is still writing the lock"
                )
                raise RunDirLockedError(
                    f"{path}: another run is writing into {Path(run_dir)} ({held_by}). Wait "
                    "for it to finish or use another --output-dir. If that process no longer "
                    f"exists (e.g. it ran on another machine and was killed), delete {path}."
                ) from None
            print(f"[sefe_fast] taking over the run directory's lock {path}: {reason}")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return path
    raise RunDirLockedError(f"{path}: could not take the lock (other runs keep taking it)")


def release_run_lock(path: Path) -> None:
    """Remove the lock if this process still owns it."""
    owner = _read_owner(path)
    if owner is not None and owner["pid"] == os.getpid() and owner["host"] == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold `run_dir`'s lock for the block (`enabled=False`, ranks > 0: do nothing); on
    entry, remove the temporary files a killed run left in `run_dir`."""
    if not enabled:
        yield
        return
    path = acquire_run_lock(run_dir)
    try:
        removed = remove_stale_temporaries(run_dir)
        if removed:
            print(f"[sefe_fast] removed {removed} temporary file(s) left by an interrupted run")
        yield
    finally:
        release_run_lock(path)
