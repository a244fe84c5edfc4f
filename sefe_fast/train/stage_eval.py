"""Evaluation of one stage's model: greedy answers on every test set, sharded over ranks.

Each rank decodes its shard of a task's test records (records i ≡ rank mod world size;
under FSDP every rank decodes in lockstep, so a rank without records repeats record 0 and
rank 0's answer is kept); rank 0 gathers the answers in test-file order. A task's test set
(records, encoded prompts, and the processed images while they fit in PIXEL_CACHE_BYTES) is
prepared once and kept across stages.

`check_test_sets` prepares every task's test set before the first task trains, so a bad
test file stops the run at its start, not after hours of training: an empty file, a bad
record (as `load_test_records` checks), a repeated `question_id` (its predictions would
collide), a prompt longer than `--max-length` tokens, an image that does not decode to the
end, or a gold answer the task's scorer cannot read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sefe_fast.data.coin_test_records import load_test_records
from sefe_fast.data.images import image_to_pixel_values, load_image
from sefe_fast.data.textvqa import (
    attach_human_answers,
    find_textvqa_annotations,
    load_textvqa_answers,
)
from sefe_fast.generate import encode_prompt, greedy_generate
from sefe_fast.model.accel import AccelConfig, autocast
from sefe_fast.model.build import ModelBundle
from sefe_fast.scoring import score
from sefe_fast.tasks import decode_length, evaluation_question
from sefe_fast.train.config import RunConfig
from sefe_fast.train.distributed import DistContext, gather_objects


class BadTestSetError(ValueError):
    """A test file that cannot be evaluated; the message names the file and the record."""


# Processed test images are kept across stages while they fit in this many bytes.
PIXEL_CACHE_BYTES = 512 << 20


@dataclass
class TestSet:
    """One task's test records on this rank: its shard's indices, prompts and images."""

    records: list[Any]
    shard: list[int]
    prompts: list[list[int]]
    pixels: list[torch.Tensor] | None  # None when not cached (computed per stage)


class StageEvaluator:
    """Greedy predictions of a model on the tasks' test sets (this rank's shard; rank 0 gathers)."""

    def __init__(
        self,
        cfg: RunConfig,
        dist: DistContext,
        bundle: ModelBundle,
        data_dir: Path,
        image_root: Path,
        accel: AccelConfig,
        sharded: bool,
    ) -> None:
        self.cfg, self.dist, self.bundle = cfg, dist, bundle
        self.data_dir, self.image_root = data_dir, image_root
        self.accel, self.sharded = accel, sharded
        self.test_sets: dict[str, TestSet] = {}

    def test_set(self, task: str) -> TestSet:
        """This rank's shard of `task`'s test records, prompts encoded (cached per task)."""
        if task in self.test_sets:
            return self.test_sets[task]
        records = load_test_records(
            self.data_dir / task / "test.json", self.image_root, skip_bad=self.cfg.skip_bad
        )
        if self.cfg.max_test_per_task is not None:
            records = records[: self.cfg.max_test_per_task]
        if not records:
            raise BadTestSetError(f"{self.data_dir / task / 'test.json'}: no test records")
        if task == "TextVQA" and self.cfg.data is not None:  # real CoIN: the ten human answers
            source = find_textvqa_annotations(
                self.data_dir, self.image_root, self.cfg.textvqa_annotations
            )
            attach_human_answers(records, load_textvqa_answers(source), source)
        shard = list(range(self.dist.rank, len(records), self.dist.world_size))
        if self.sharded and not shard:
            shard = [0]  # lockstep decoding needs a prompt on every rank; rank 0's answer is kept
        bundle = self.bundle
        prompts = [
            encode_prompt(
                evaluation_question(task, records[i].text),
                bundle.tokenizer,
                image_token_id=bundle.image_token_id,
                num_image_tokens=bundle.num_image_tokens,
                has_image=records[i].image is not None,
            )
            for i in shard
        ]
        size = bundle.model.config.vision_config.image_size
        cache = len(shard) * 3 * size * size * 4 <= PIXEL_CACHE_BYTES
        test_file = self.data_dir / task / "test.json"
        pixels = [self._pixels(test_file, records[i]) for i in shard] if cache else None
        self.test_sets[task] = TestSet(records, shard, prompts, pixels)
        return self.test_sets[task]

    def check_test_sets(self, tasks: list[str]) -> None:
        """Prepare and check every task's test set up front (module docstring); ValueError
        naming the test file, the record and the problem (BadTestSetError)."""
        for task in tasks:
            test_file = self.data_dir / task / "test.json"
            test = self.test_set(task)
            seen: set[str] = set()
            for record in test.records:
                where = f"{test_file}: record {record.question_id!r}"
                if record.question_id in seen:
                    raise BadTestSetError(f"{where}: question_id repeated (each must be unique)")
                seen.add(record.question_id)
                try:
                    score(task, "", record.gold)
                except (ValueError, TypeError) as problem:
                    raise BadTestSetError(
                        f"{where}: the scorer cannot read the gold answer: {problem}"
                    ) from problem
            for i, prompt in zip(test.shard, test.prompts):
                if len(prompt) > self.cfg.max_length:
                    raise BadTestSetError(
                        f"{test_file}: record {test.records[i].question_id!r}: its prompt is "
                        f"{len(prompt)} tokens, over --max-length {self.cfg.max_length}; "
                        "shorten or remove the question"
                    )
            if test.pixels is None:  # not decoded yet: decode once now, then let go
                for i in test.shard:
                    self._pixels(test_file, test.records[i])

    def _pixels(self, test_file: Path, record: Any) -> torch.Tensor | None:
        """The record's processed image [3, H, W] (None for a text-only question);
        BadTestSetError naming test file and record."""
        if record.image is None:
            return None
        try:
            return image_to_pixel_values(load_image(record.image), self.bundle.image_processor)
        except (ValueError, OSError) as problem:
            raise BadTestSetError(
                f"{test_file}: record {record.question_id!r}: {problem} (replace the image, "
                "or drop the record)"
            ) from problem

    def predictions(self, model: torch.nn.Module, eval_task: str) -> list[dict] | None:
        """Greedy predictions of `model` on `eval_task` (rows in test-file order, rank 0)."""
        test, bundle = self.test_set(eval_task), self.bundle
        pixels = test.pixels
        if pixels is None:
            test_file = self.data_dir / eval_task / "test.json"
            pixels = [self._pixels(test_file, test.records[i]) for i in test.shard]
        outputs = greedy_generate(
            model,
            test.prompts,
            pixels,
            max_new_tokens=decode_length(eval_task, self.cfg.max_new_tokens),
            eos_token_id=bundle.tokenizer.eos_token_id,
            pad_token_id=bundle.tokenizer.pad_token_id,
            banned_token_ids=[bundle.image_token_id],
            batch_size=self.cfg.eval_batch_size,
            device=self.dist.device,
            progress=self.dist.is_main,
            desc=f"eval {eval_task}",
            autocast=lambda: autocast(self.accel, self.dist.device),
            lockstep=self.sharded,
        )
        texts = [bundle.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]
        gathered = gather_objects(list(zip(test.shard, texts)))
        if not self.dist.is_main:
            return None
        by_index: dict[int, str] = {}
        for part in gathered:  # in rank order: a padding rank's repeat never wins
            for index, text in part:
                by_index.setdefault(index, text)
        return [
            {
                "question_id": rec.question_id,
                "prediction": by_index[i],
                "answer": rec.gold,
            }
            for i, rec in enumerate(test.records)
        ]
