"""Loading CoIN's on-disk layout: LLaVA-format train files (test files: coin_test_records.py).

Per task CoIN has a `train.json` (a list of `{"id", "image", "conversations"}` in LLaVA's
format; ASD files such as `train_x20.json` have the same layout) and a `test.json` (a list of
`{"question_id", "image", "text", "answer"}`; Grounding adds `answer_bbox` and `size`).
Image paths are relative to a data root.

Text-only records: ScienceQA has questions without a picture (about half of its test set).
CoIN keeps them, in train and test, as records with no `image` key; the official LLaVA loader
trains on them with no image tokens in the prompt, and the official ScienceQA evaluation
scores them (docs/reference.md §4). Here a record whose `image` is absent or null is
text-only: its conversation must hold no `<image>` placeholder, it gets no pixel values, and
a batch may mix such records with image records (`collate_train` stacks only the images
present; the LLaVA forward fills image features into image-token positions in order).

What counts as a bad record (an error naming file, record id and problem, or with
`skip_bad=True` a skip counted in `LoadStats`): not a JSON object; a missing or non-string
`id`; an `image` that is neither a non-empty string nor absent/null; conversations that do
not alternate human/gpt turns starting with a human turn and ending with an answer; an empty
answer; an image record without exactly one `<image>` placeholder, or with one outside the
first human turn; a text-only record with a placeholder; a missing or unreadable image file. Samples longer than
`max_length` tokens are truncated (counted); a sample with no answer token left after
truncation is dropped (counted). Nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import Dataset as TorchDataset

from sefe_fast.data.char_tokenizer import IMAGE_TOKEN
from sefe_fast.data.conversation import (
    GPT_FROM,
    IGNORE_INDEX,
    add_bos,
    check_conversation,
    image_placeholder_id,
    labels_from_offsets,
    render_for,
)
from sefe_fast.data.images import check_image_readable, image_to_pixel_values, load_image

logger = logging.getLogger(__name__)

# Records tokenised per tokenizer call (the fast tokenizer parallelises inside a batch).
_TOKENIZE_CHUNK = 1024
# In-memory cache of processed images per dataset, in bytes (mini-CoIN images are ~12 KB each).
DEFAULT_PIXEL_CACHE_BYTES = 1 << 30


class CoinDataError(ValueError):
    """A malformed CoIN record or file; the message names the file, the record and the problem."""


@dataclass
class LoadStats:
    """What loading a file kept, truncated and dropped (counts of records).

    `skipped_reasons` holds one message per bad record skipped (`skip_bad=True`) and per
    sample dropped for having no answer token left, each naming the file and record id.
    """

    source: str = ""
    n_records: int = 0
    n_kept: int = 0
    n_truncated: int = 0
    n_no_answer_dropped: int = 0
    n_bad_skipped: int = 0
    # Tokens the tokenizer could not represent (they became its unknown token), and the
    # records holding any: the tiny model's character vocabulary is printable ASCII only.
    n_unknown_tokens: int = 0
    n_records_with_unknown: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    problem_counts: dict[str, int] = field(default_factory=dict)

    def add_problem(self, kind: str, message: str) -> None:
        """Record one skipped or dropped record: its full message and its kind of problem."""
        self.skipped_reasons.append(message)
        self.problem_counts[kind] = self.problem_counts.get(kind, 0) + 1

    def summary(self) -> str:
        """One line: records read, kept, truncated, dropped and skipped (with problem kinds)."""
        line = (
            f"{self.source or 'data'}: {self.n_records} records, {self.n_kept} kept, "
            f"{self.n_truncated} truncated, {self.n_no_answer_dropped} dropped with no answer "
            f"token after truncation, {self.n_bad_skipped} bad records skipped"
        )
        if self.n_unknown_tokens:
            line += (
                f"; {self.n_unknown_tokens} characters unknown to the tokenizer (in "
                f"{self.n_records_with_unknown} records) became its unknown token"
            )
        if self.problem_counts:
            kinds = sorted(self.problem_counts.items())
            line += " [" + "; ".join(f"{kind}: {n}" for kind, n in kinds) + "]"
        return line


def read_json_records(json_path: str | os.PathLike) -> list[Any]:
    """Read a JSON list (`.json`) or one JSON value per line (`.jsonl`); errors name the file."""
    path = Path(json_path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CoinDataError(f"{path}: invalid JSON: {error}") from error
    if not isinstance(data, list):
        raise CoinDataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def record_label(record: Any, index: int, key: str) -> str:
    """How an error names a record: by its `key` field (`id`, `question_id`) and index."""
    ident = record.get(key) if isinstance(record, dict) else None
    return f"record {ident!r} (index {index})" if ident is not None else f"record at index {index}"


def _check_image_field(image: Any) -> None:
    if not isinstance(image, str) or not image:
        raise ValueError(
            "'image' must be a non-empty string, or absent/null for a text-only record"
        )


def record_image_path(
    record: dict[str, Any], image_root: Path, verify_images: bool, decode: bool = False
) -> Path | None:
    """The record's resolved image path, or None for a text-only record (no or null `image`)
    (`decode`: decode the whole image, not just its header)."""
    image = record.get("image")
    if image is None:
        return None
    _check_image_field(image)
    image_path = image_root / image
    if verify_images:
        check_image_readable(image_path, decode=decode)
    elif not image_path.is_file():
        raise FileNotFoundError(f"image file not found: {image_path}")
    return image_path


def _check_train_record(
    record: Any, image_root: Path, verify_images: bool, decode: bool = False
) -> tuple[str, Path | None]:
    """Validate one train record; return (id, image path or None if text-only) or raise
    ValueError with the problem (`decode`: decode the whole image, not just its header)."""
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object ({type(record).__name__})")
    for key in ("id", "conversations"):
        if key not in record:
            raise ValueError(f"missing key {key!r}")
    if not isinstance(record["id"], str | int):
        raise ValueError(f"'id' must be a string, got {type(record['id']).__name__}")
    if record.get("image") is not None:
        _check_image_field(record["image"])
    conversations = record["conversations"]
    check_conversation(conversations)
    for index, turn in enumerate(conversations):
        if turn["from"] == GPT_FROM and not turn["value"].strip():
            raise ValueError(f"empty answer in turn {index}")
    n_placeholders = sum(turn["value"].count(IMAGE_TOKEN) for turn in conversations)
    if record.get("image") is None:
        if n_placeholders:
            raise ValueError(
                f"text-only record (no 'image') has {n_placeholders} {IMAGE_TOKEN} placeholder(s)"
            )
    else:
        if n_placeholders != 1:
            raise ValueError(
                f"expected exactly one {IMAGE_TOKEN} placeholder, found {n_placeholders}"
            )
        if IMAGE_TOKEN not in conversations[0]["value"]:
            raise ValueError(f"{IMAGE_TOKEN} must be in the first human turn")
    return str(record["id"]), record_image_path(record, image_root, verify_images, decode)


def fail_or_skip(
    stats: LoadStats, skip_bad: bool, source: Path, label: str, problem: BaseException
) -> None:
    """A bad record: raise CoinDataError naming `source`, `label` and `problem`, or with
    `skip_bad` count it in `stats` (by the problem's kind) and go on."""
    message = f"{source}: {label}: {problem}"
    if not skip_bad:
        raise CoinDataError(message) from problem
    stats.n_bad_skipped += 1
    # The kind is the problem's text up to its first ": " (which precedes paths and details).
    stats.add_problem(str(problem).split(": ")[0], message)


def _tokenize_batch(
    batch: dict[str, list[Any]],
    *,
    tokenizer: Any,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int,
) -> dict[str, list[Any]]:
    """datasets.map function: rendered conversations → input_ids, labels, truncated, n_unknown
    (tokens that became the tokenizer's unknown token)."""
    placeholder_id = image_placeholder_id(tokenizer)
    unknown_id = tokenizer.unk_token_id
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "truncated": [], "n_unknown": []}
    texts, spans = [], []
    for conversations in batch["conversations"]:
        text, answer_spans = render_for(json.loads(conversations), tokenizer)
        texts.append(text)
        spans.append(answer_spans)
    encoding = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=add_bos(tokenizer))
    for ids, offsets, answer_spans in zip(encoding["input_ids"], encoding["offset_mapping"], spans):
        tokenized = labels_from_offsets(
            ids,
            offsets,
            answer_spans,
            placeholder_id=placeholder_id,
            image_token_id=image_token_id,
            num_image_tokens=num_image_tokens,
            max_length=max_length,
        )
        out["input_ids"].append(tokenized.input_ids)
        out["labels"].append(tokenized.labels)
        out["truncated"].append(tokenized.truncated)
        out["n_unknown"].append(0 if unknown_id is None else ids.count(unknown_id))
    return out


def _cache_file(
    cache_dir: str | os.PathLike, json_path: Path, tokenizer: Any, params: dict[str, Any]
) -> Path:
    """Arrow cache file name keyed by the file's bytes, the tokenizer's vocabulary and params."""
    digest = hashlib.sha256(json_path.read_bytes())
    digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    digest.update(json.dumps(params, sort_keys=True).encode())
    digest.update(b"sefe_fast-tokenize-v1")
    return Path(cache_dir) / f"{json_path.stem}-{digest.hexdigest()[:20]}.arrow"


class CoinTrainDataset(TorchDataset):
    """Tokenised training samples; items are dicts of `input_ids`, `labels` (LongTensor [L])
    and `pixel_values` (FloatTensor [3, H, W], None for a text-only sample), images processed
    on first use and cached."""

    def __init__(
        self,
        tokenized: datasets.Dataset,
        image_processor: Any,
        pixel_cache_bytes: int = DEFAULT_PIXEL_CACHE_BYTES,
    ) -> None:
        self.tokenized = tokenized
        self.image_processor = image_processor
        self.pixel_cache_bytes = pixel_cache_bytes
        self._pixel_cache: dict[str, torch.Tensor] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.tokenized)

    def lengths(self) -> list[int]:
        """Tokens of every sample (image tokens included), in dataset order."""
        return [len(ids) for ids in self.tokenized["input_ids"]]

    def pixel_values(self, image_path: str) -> torch.Tensor:
        """Processed pixels of one image file, from the cache when possible: [3, H, W]."""
        cached = self._pixel_cache.get(image_path)
        if cached is not None:
            return cached
        try:
            pixels = image_to_pixel_values(load_image(image_path), self.image_processor)
        except (ValueError, OSError) as problem:
            raise CoinDataError(
                f"training image {image_path}: {problem}; replace it, or rerun with --skip-bad "
                "(which decodes every image before training and skips unreadable ones)"
            ) from problem
        size = pixels.numel() * pixels.element_size()
        if self._cached_bytes + size <= self.pixel_cache_bytes:
            self._pixel_cache[image_path] = pixels
            self._cached_bytes += size
        return pixels

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | None]:
        row = self.tokenized[int(index)]
        return {
            "input_ids": torch.tensor(row["input_ids"], dtype=torch.long),
            "labels": torch.tensor(row["labels"], dtype=torch.long),
            "pixel_values": self.pixel_values(row["image"]) if row["image"] else None,
        }


def load_train_dataset(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    tokenizer: Any,
    image_processor: Any,
    *,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int,
    skip_bad: bool = False,
    num_proc: int = 1,
    cache_dir: str | os.PathLike | None = None,
    verify_images: bool = True,
) -> tuple[CoinTrainDataset, LoadStats]:
    """Load a LLaVA-format train file into tokenised samples with answer-only labels.

    `image_token_id`/`num_image_tokens`: the model's image token id and image features per
    image; `max_length`: tokens per sample after image expansion. `num_proc` tokenises in
    parallel processes; `cache_dir` caches the tokenisation as Arrow, keyed by the file's
    content, the tokenizer and these parameters. `verify_images` reads each image header
    at load time (else only checks that the file exists). Raises CoinDataError naming file,
    record and problem for a bad record unless `skip_bad` (then it is counted in LoadStats).
    """
    source = Path(json_path)
    root = Path(image_root)
    stats = LoadStats(source=str(source))
    records = read_json_records(source)
    if not records:
        raise CoinDataError(f"{source}: the training file holds no records")
    stats.n_records = len(records)
    image_placeholder_id(tokenizer)  # fail early on a tokenizer without <image>

    columns: dict[str, list[Any]] = {"id": [], "image": [], "conversations": []}
    for index, record in enumerate(records):
        try:
            # With skip_bad every image is decoded now: one that is cut short must be skipped
            # here, not crash the loop mid-task (without skip_bad only headers are read).
            record_id, image_path = _check_train_record(record, root, verify_images, skip_bad)
        except (ValueError, OSError) as problem:
            fail_or_skip(stats, skip_bad, source, record_label(record, index, "id"), problem)
            continue
        columns["id"].append(record_id)
        columns["image"].append(str(image_path) if image_path is not None else "")
        # JSON text keeps the Arrow schema flat whatever extra keys the turns carry.
        columns["conversations"].append(json.dumps(record["conversations"]))
    if not columns["id"]:
        raise CoinDataError(f"{source}: no usable training record ({stats.summary()})")

    params = {
        "image_token_id": image_token_id,
        "num_image_tokens": num_image_tokens,
        "max_length": max_length,
    }
    table = datasets.Dataset.from_dict(columns)
    cache_params = {**params, "columns": "n_unknown"}  # a cache made before that column: stale
    map_kwargs: dict[str, Any] = {
        "function": _tokenize_batch,
        "fn_kwargs": {"tokenizer": tokenizer, **params},
        "batched": True,
        "batch_size": _TOKENIZE_CHUNK,
        "remove_columns": ["conversations"],
        "num_proc": num_proc if num_proc > 1 and len(table) > _TOKENIZE_CHUNK else None,
        "desc": f"tokenising {source.name}",
    }
    if cache_dir is not None:
        cache_file = _cache_file(cache_dir, source, tokenizer, cache_params)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        map_kwargs["cache_file_name"] = str(cache_file)
        map_kwargs["load_from_cache_file"] = True
    else:
        map_kwargs["keep_in_memory"] = True
    with _quiet_progress(len(table)):
        tokenized = table.map(**map_kwargs)

    truncated = tokenized["truncated"]
    stats.n_truncated = int(sum(truncated))
    unknown = tokenized["n_unknown"]
    stats.n_unknown_tokens = int(sum(unknown))
    stats.n_records_with_unknown = sum(1 for n in unknown if n)
    keep = []
    for index, (labels, record_id) in enumerate(zip(tokenized["labels"], tokenized["id"])):
        if any(label != IGNORE_INDEX for label in labels):
            keep.append(index)
        else:
            stats.n_no_answer_dropped += 1
            stats.add_problem(
                "no answer token after truncation",
                f"{source}: record {record_id!r}: no answer token left after truncation "
                f"to {max_length} tokens",
            )
    if len(keep) < len(tokenized):
        tokenized = tokenized.select(keep)
    stats.n_kept = len(tokenized)
    if (
        stats.n_truncated
        or stats.n_no_answer_dropped
        or stats.n_bad_skipped
        or stats.n_unknown_tokens
    ):
        logger.warning(stats.summary())
    return CoinTrainDataset(
        tokenized.remove_columns(["truncated", "n_unknown"]), image_processor
    ), stats


class _quiet_progress:
    """Silence datasets' progress bars for small files (they cost more than the work)."""

    def __init__(self, n_rows: int) -> None:
        self.quiet = n_rows <= 10 * _TOKENIZE_CHUNK
        self.was_enabled = datasets.utils.logging.is_progress_bar_enabled()

    def __enter__(self) -> None:
        if self.quiet:
            datasets.utils.logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        if self.quiet and self.was_enabled:
            datasets.utils.logging.enable_progress_bar()


def collate_train(
    items: Sequence[dict[str, torch.Tensor | None]], pad_token_id: int
) -> dict[str, torch.Tensor | None]:
    """Right-pad a list of samples into a batch.

    Returns `input_ids` (padded with `pad_token_id`), `attention_mask` (1 on real tokens),
    `labels` (padded with -100), all LongTensor [B, L_max], and `pixel_values` [N, 3, H, W]:
    the images of the N samples that have one, in batch order (None when N = 0: a batch of
    text-only samples). LLaVA places image i's features at the i-th run of image tokens, so
    text-only rows (no image tokens) need no placeholder image.
    """
    if not items:
        raise ValueError("collate_train got an empty batch")
    longest = max(int(item["input_ids"].numel()) for item in items)
    batch = len(items)
    input_ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    for row, item in enumerate(items):
        length = int(item["input_ids"].numel())
        input_ids[row, :length] = item["input_ids"]
        labels[row, :length] = item["labels"]
        attention_mask[row, :length] = 1
    images = [item["pixel_values"] for item in items if item.get("pixel_values") is not None]
    pixel_values = torch.stack(images) if images else None  # type: ignore[arg-type]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values,
    }
