"""The DataLoader feeding the training loop: the same batches with 0 and 2 worker processes,
across a resume mid-task and per rank; and the same trained weights whatever the workers."""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from sefe_fast.data.char_tokenizer import IMAGE_TOKEN, build_char_tokenizer
from sefe_fast.data.coin import collate_train, load_train_dataset
from sefe_fast.model.accel import AccelConfig
from sefe_fast.train.distributed import DistContext
from sefe_fast.train.feed import BatchSchedule, micro_batch_loader, resolve_num_workers
from sefe_fast.train.loop import LoopConfig, train_task

CPU = torch.device("cpu")
N_RECORDS = 40
N_IMAGE_TOKENS = 4


def _dist(rank: int = 0, world_size: int = 1) -> DistContext:
    return DistContext(rank=rank, world_size=world_size, local_rank=rank, device=CPU)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer):
    """40 records, each with its own non-square image (decoded and padded in the reader)."""
    root = tmp_path_factory.mktemp("feed")
    records = []
    for i in range(N_RECORDS):
        size = (24 + i % 7, 32 - i % 5)
        Image.new("RGB", size, (6 * i % 256, 255 - 5 * i, 40 + 3 * i)).save(root / f"{i}.png")
        answer = "ab" * (1 + i % 6)  # uneven lengths: length grouping matters
        records.append(
            {
                "id": f"r{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_TOKEN}\nWhat is {i}?"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    (root / "train.json").write_text(json.dumps(records))
    processor = CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, do_center_crop=True
    )
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    data, _ = load_train_dataset(
        root / "train.json", root, tokenizer, processor,
        image_token_id=image_id, num_image_tokens=N_IMAGE_TOKENS, max_length=200,
    )  # fmt: skip
    return data


def _schedule(data, rank: int = 0, world_size: int = 1) -> BatchSchedule:
    return BatchSchedule(
        len(data), batch_size=4, grad_accum=1, seed=5, dist=_dist(rank, world_size),
        lengths=data.lengths(),
    )  # fmt: skip


def _stream(data, schedule, *, first: int, count: int, workers: int) -> list[dict]:
    collate = functools.partial(collate_train, pad_token_id=0)
    loader = micro_batch_loader(
        data, collate, schedule.micro_batch, first=first, count=count,
        num_workers=workers, device=CPU, seed=5,
    )  # fmt: skip
    return list(loader)


def _assert_same(batches_a: list[dict], batches_b: list[dict]) -> None:
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


# 3 epochs of 10 micro-batches: the stream crosses epoch boundaries (new permutations).
COUNT = 25


def test_same_batches_with_0_and_2_workers_and_as_the_plain_reader(dataset) -> None:
    schedule = _schedule(dataset)
    plain = [collate_train([dataset[i] for i in schedule.micro_batch(m)], 0) for m in range(COUNT)]
    in_process = _stream(dataset, schedule, first=0, count=COUNT, workers=0)
    in_workers = _stream(dataset, _schedule(dataset), first=0, count=COUNT, workers=2)
    _assert_same(plain, in_process)
    _assert_same(plain, in_workers)
    # The images really are decoded per sample (not one cached tensor for all).
    pixels = torch.cat([batch["pixel_values"] for batch in in_workers])
    assert len({tuple(p.flatten()[:8].tolist()) for p in pixels}) > 10


def test_a_resumed_task_sees_exactly_the_remaining_batches(dataset) -> None:
    full = _stream(dataset, _schedule(dataset), first=0, count=COUNT, workers=0)
    for first in (7, 13):  # mid-epoch and in the second epoch, fresh schedule as on resume
        resumed = _stream(dataset, _schedule(dataset), first=first, count=COUNT - first, workers=2)
        _assert_same(full[first:], resumed)


def test_each_rank_gets_its_own_share_the_same_with_workers(dataset) -> None:
    per_rank = []
    for rank in (0, 1):
        plain = _stream(dataset, _schedule(dataset, rank, 2), first=0, count=10, workers=0)
        workers = _stream(dataset, _schedule(dataset, rank, 2), first=0, count=10, workers=2)
        _assert_same(plain, workers)
        per_rank.append(plain)
    # One epoch is 5 micro-batches per rank: within an epoch the ranks' samples are disjoint.
    epoch = [
        {tuple(row.tolist()) for batch in batches[:5] for row in batch["input_ids"]}
        for batches in per_rank
    ]
    assert epoch[0] and not epoch[0] & epoch[1]


class _PixelLM(torch.nn.Module):
    """Embedding LM that reads the pixels and has dropout (so it uses the global RNG)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 8)
        self.pix = torch.nn.Linear(3, 8)
        self.drop = torch.nn.Dropout(0.3)
        self.head = torch.nn.Linear(8, vocab)

    def forward(self, input_ids, attention_mask, labels, pixel_values, num_items_in_batch):
        image = self.pix(pixel_values.mean(dim=(2, 3)))[:, None, :]
        logits = self.head(self.drop(self.emb(input_ids) + image))
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        return SimpleNamespace(loss=ce / num_items_in_batch)


def _train(dataset, tokenizer, workers: int, resume=None, states=None):
    model = _PixelLM(len(tokenizer))
    torch.manual_seed(1)  # the dropout stream
    cfg = LoopConfig(
        per_device_batch_size=4, max_steps=12, save_every=5, seed=3, num_workers=workers,
        share_prompt_prefix=False,
    )  # fmt: skip
    train_task(
        model, dataset, functools.partial(collate_train, pad_token_id=0),
        [{"params": list(model.parameters()), "lr": 0.05}], cfg, _dist(), accel=AccelConfig(),
        resume=resume, save_checkpoint=states.append if states is not None else None,
    )  # fmt: skip
    return model


def test_training_gives_identical_weights_with_workers_and_after_resume(dataset, tokenizer) -> None:
    states: list[dict] = []
    reference = _train(dataset, tokenizer, 0, states=states)
    with_workers = _train(dataset, tokenizer, 2)
    resumed = _train(dataset, tokenizer, 2, resume=states[0])  # from step 5
    assert states[0]["step"] == 5
    for a, b, c in zip(
        reference.parameters(), with_workers.parameters(), resumed.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_resolve_num_workers() -> None:
    assert resolve_num_workers(None, CPU, 1) == 0  # the CPU default reads in-process
    assert resolve_num_workers(3, CPU, 1) == 3
    assert 0 <= resolve_num_workers(None, torch.device("cuda", 0), 8) <= 4
    with pytest.raises(ValueError, match="num_workers"):
        resolve_num_workers(-1, CPU, 1)


def test_the_loader_leaves_the_global_rng_alone(dataset) -> None:
    """LoRA dropout draws from the global RNG, which checkpoints save and restore: reading
    batches must not draw from it (or the default run's results would change)."""
    for workers in (0, 2):
        before = torch.get_rng_state()
        _stream(dataset, _schedule(dataset), first=0, count=3, workers=workers)
        assert torch.equal(before, torch.get_rng_state())


def test_workers_keep_no_pixel_cache(dataset) -> None:
    """A worker's copy of the dataset caches no pixels (host memory × workers × ranks);
    the training process's own cache is untouched."""
    from sefe_fast.data.coin import CoinTrainDataset

    class Probe(CoinTrainDataset):
        def __getitem__(self, index):
            item = super().__getitem__(index)
            item["cached"] = torch.tensor(len(self._pixel_cache))
            return item

    probe = Probe(dataset.tokenized, dataset.image_processor)
    collate = lambda items: torch.stack([item["cached"] for item in items])  # noqa: E731
    schedule = _schedule(probe)
    loader = micro_batch_loader(
        probe, collate, schedule.micro_batch, first=0, count=6, num_workers=2, device=CPU, seed=0
    )
    assert all(int(batch.max()) == 0 for batch in loader)
    assert probe.pixel_cache_bytes > 0
    in_process = micro_batch_loader(
        probe, collate, schedule.micro_batch, first=0, count=6, num_workers=0, device=CPU, seed=0
    )
    assert max(int(batch.max()) for batch in in_process) > 0  # the probe can see a cache


def test_num_workers_flag_defaults_to_auto_and_does_not_change_the_fingerprint() -> None:
    """`--num-workers` changes where batches are read, never which: a rerun with another
    value resumes the same run."""
    from sefe_fast.train.cli import parse_config

    default = parse_config(["coin"])
    assert default.num_workers is None  # 0 on CPU, up to 4 per rank on CUDA
    two = parse_config(["coin", "--num-workers", "2"])
    assert two.num_workers == 2
    assert two.fingerprinted() == default.fingerprinted()
