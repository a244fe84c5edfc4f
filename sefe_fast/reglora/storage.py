"""Saving and loading key elements: one safetensors file holding many matrices, lossless.

Layout: for matrix `name` and segment (task) `i`, the tensors `name/i/gaps` (uint8) and
`name/i/escapes` (int32 or int64) of `sefe_fast.reglora.key_elements.Segment`. The header
metadata holds a JSON index {name: {"shape": [k, d], "segments": [{"n", "n_escapes",
"crc32_gaps", "crc32_escapes"}, ...]}}, so a loader can check every matrix completely
(counts, markers, bounds, checksums) and name the matrix and the file on any problem.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sefe_fast.io_utils import atomic_path
from sefe_fast.reglora.key_elements import ESCAPE, KeyElements, Segment

FORMAT_NAME = "sefe_fast.key_elements"
FORMAT_VERSION = "1"


class KeyElementsFileError(ValueError):
    """A key-elements file is unreadable, corrupt, truncated or does not match expectations."""


def _crc32(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.contiguous().numpy().view("uint8")) if tensor.numel() else 0


def _tensor_key(name: str, segment: int, part: str) -> str:
    return f"{name}/{segment}/{part}"


def save_key_elements(mapping: Mapping[str, KeyElements], path: str | os.PathLike) -> None:
    """Write `mapping` (matrix name -> KeyElements) to the safetensors file `path` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, dict] = {}
    for name, ke in mapping.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"key-elements names must be non-empty strings, got {name!r}")
        if not isinstance(ke, KeyElements):
            raise TypeError(f"{name}: expected KeyElements, got {type(ke).__name__}")
        segments = []
        for i, seg in enumerate(ke.segments):
            tensors[_tensor_key(name, i, "gaps")] = seg.gaps.contiguous()
            tensors[_tensor_key(name, i, "escapes")] = seg.escapes.contiguous()
            segments.append(
                {
                    "n": len(seg),
                    "n_escapes": int(seg.escapes.numel()),
                    "crc32_gaps": _crc32(seg.gaps),
                    "crc32_escapes": _crc32(seg.escapes),
                }
            )
        index[name] = {"shape": list(ke.shape), "segments": segments}
    metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "index": json.dumps(index)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _read_segment(handle, path: Path, name: str, i: int, info: dict, shape) -> Segment:
    where = f"{path}: matrix {name!r}, segment {i}"
    try:
        gaps = handle.get_tensor(_tensor_key(name, i, "gaps"))
        escapes = handle.get_tensor(_tensor_key(name, i, "escapes"))
    except Exception as exc:  # safetensors raises its own error types for missing/corrupt data
        raise KeyElementsFileError(f"{where}: cannot read tensors ({exc})") from exc
    if gaps.dtype != torch.uint8 or escapes.dtype not in (torch.int32, torch.int64):
        raise KeyElementsFileError(f"{where}: unexpected dtypes {gaps.dtype}/{escapes.dtype}")
    if gaps.ndim != 1 or escapes.ndim != 1:
        raise KeyElementsFileError(f"{where}: gaps and escapes must be 1-D")
    if gaps.numel() != info["n"] or escapes.numel() != info["n_escapes"]:
        raise KeyElementsFileError(
            f"{where}: {gaps.numel()} gaps / {escapes.numel()} escapes stored, "
            f"index says {info['n']} / {info['n_escapes']}"
        )
    if _crc32(gaps) != info["crc32_gaps"] or _crc32(escapes) != info["crc32_escapes"]:
        raise KeyElementsFileError(f"{where}: checksum mismatch (the file is corrupt)")
    if int((gaps == ESCAPE).sum()) != escapes.numel():
        raise KeyElementsFileError(f"{where}: escape markers do not match the escape stream")
    if escapes.numel() and int(escapes.min()) < ESCAPE:
        raise KeyElementsFileError(f"{where}: escaped gap below {ESCAPE}")
    segment = Segment(gaps=gaps, escapes=escapes)
    if len(segment):
        # Gaps are ≥ 0 by construction, so the last position is the largest: check the bound
        # (and that the first gap is ≥ 1, i.e. the first position is ≥ 0).
        if int(gaps[0]) == 0:
            raise KeyElementsFileError(f"{where}: the first gap must be ≥ 1")
        last = int(segment.linear()[-1])
        if last >= shape[0] * shape[1]:
            raise KeyElementsFileError(
                f"{where}: position {last} lies outside the shape {tuple(shape)}"
            )
    return segment


def load_key_elements(
    path: str | os.PathLike,
    expected_shapes: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, KeyElements]:
    """Read a file written by `save_key_elements`; check it against `expected_shapes`.

    Raises KeyElementsFileError (a ValueError) naming the file — and the matrix where one is
    at fault — for an unreadable, truncated or corrupt file, a matrix missing from or extra
    to `expected_shapes`, or a shape that differs from the expected one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"key-elements file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT_NAME:
                raise KeyElementsFileError(
                    f"{path}: not a key-elements file (format {metadata.get('format')!r})"
                )
            if metadata.get("version") != FORMAT_VERSION:
                raise KeyElementsFileError(
                    f"{path}: unsupported key-elements format version {metadata.get('version')!r}"
                )
            try:
                index = json.loads(metadata["index"])
            except (KeyError, json.JSONDecodeError) as exc:
                raise KeyElementsFileError(f"{path}: unreadable index ({exc})") from exc
            _check_expected(path, index, expected_shapes)
            result: dict[str, KeyElements] = {}
            for name, entry in index.items():
                shape = (int(entry["shape"][0]), int(entry["shape"][1]))
                segments = [
                    _read_segment(handle, path, name, i, info, shape)
                    for i, info in enumerate(entry["segments"])
                ]
                result[name] = KeyElements(shape, segments)
            return result
    except KeyElementsFileError:
        raise
    except Exception as exc:  # header parse errors, truncation: safetensors' own error types
        raise KeyElementsFileError(
            f"{path}: corrupt or truncated key-elements file ({exc})"
        ) from exc


def _check_expected(
    path: Path, index: dict, expected_shapes: Mapping[str, tuple[int, int]] | None
) -> None:
    if expected_shapes is None:
        return
    missing = sorted(set(expected_shapes) - set(index))
    extra = sorted(set(index) - set(expected_shapes))
    if missing or extra:
        raise KeyElementsFileError(
            f"{path}: matrices do not match the model: missing {missing}, unexpected {extra}"
        )
    for name, expected in expected_shapes.items():
        stored = tuple(int(s) for s in index[name]["shape"])
        if stored != tuple(int(s) for s in expected):
            raise KeyElementsFileError(
                f"{path}: matrix {name!r} has shape {stored} in the file but the model "
                f"expects {tuple(int(s) for s in expected)}"
            )
