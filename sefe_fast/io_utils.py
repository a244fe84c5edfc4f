"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Names of the temporaries below: `.{target name}.{8 random chars}` (directories) or
# `.{target name}.{8 random chars}.tmp{suffix}` (files), from tempfile's mkdtemp / mkstemp.
TEMPORARY_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}(\.tmp.*)?$")


def remove_stale_temporaries(root: str | os.PathLike) -> int:
    """Delete the temporaries of this module's writers under `root` (recursively); return
    how many were removed. Call it only while no writer can be running there (a killed run
    leaves them behind; `sefe_fast.run_lock` calls it once it holds the run's lock)."""
    root = Path(root)
    if not root.is_dir():
        return 0
    stale = [p for p in root.rglob(".*") if TEMPORARY_NAME.match(p.name)]
    removed = 0
    for path in sorted(stale, key=lambda p: len(p.parts)):  # a folder before its contents
        if not path.exists() and not path.is_symlink():
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


# Below this many free bytes a failed write is taken to be the full disk's doing: writers
# such as torch.save report a full disk as "unexpected pos ..." without an errno.
DISK_FULL_FREE_BYTES = 1 << 20


class DiskFullError(OSError):
    """A write failed because the disk is full (errno ENOSPC); earlier files are intact."""


def raise_if_disk_full(error: BaseException, target: Path) -> None:
    """Raise DiskFullError naming `target` if `error` (from writing it) came from a full
    disk: ENOSPC anywhere in its chain, or under DISK_FULL_FREE_BYTES left; else return."""
    if not isinstance(error, Exception) or isinstance(error, DiskFullError):
        return
    chain: BaseException | None = error
    enospc = False
    while chain is not None and not enospc:
        enospc = isinstance(chain, OSError) and chain.errno == errno.ENOSPC
        chain = chain.__cause__ or chain.__context__
    try:
        free = shutil.disk_usage(target.parent).free
    except OSError:
        free = None
    if enospc or (free is not None and free < DISK_FULL_FREE_BYTES):
        raise DiskFullError(
            errno.ENOSPC,
            f"no space left on device while writing {target} ({free} bytes free; the write "
            f"failed with: {error}). The file was not replaced and earlier files are intact: "
            "free some space, then rerun the same command to resume",
        ) from error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, else delete it.

    Use it for writers that want a file name (safetensors, torch.save, savefig).
    The temporary file keeps `path`'s suffix so format-sniffing writers behave.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(error, target)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path`; on success it replaces `path`.

    A reader sees either the old directory or the complete new one; on an error the
    temporary directory is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(error, path)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + fsync + rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write `obj` as JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write one JSON object per line to `path` atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
