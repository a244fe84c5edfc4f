"""Time how the training loop reads its micro-batches on the default run's data; print JSON.

    OMP_NUM_THREADS=1 python bench/time_feed.py --data RUN/minicoin --task GQA

Side by side in one process, interleaved over `--rounds` rounds, each reading the same
`--batches` micro-batches of `--batch-size` (the default preset's 16), in an order rotated
every round, from a freshly loaded dataset (cold pixel cache: every image is decoded and preprocessed):
- `plain`: the loop's former reader, `collate([dataset[i] for i in micro_batch])`;
- `loader0`: the DataLoader with `num_workers=0` (the CPU default);
- `loader2`: the DataLoader with two worker processes (for comparison only).
Reports the median wall and CPU seconds per micro-batch of each and the ratios to `plain`. With
`--warm`, one dataset whose images are all cached is read by `plain` and `loader0`: the
difference is the DataLoader's own overhead per micro-batch.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from sefe_fast.data.coin import collate_train, load_train_dataset
from sefe_fast.model.tiny import TinyConfig, build_tiny_model
from sefe_fast.train.distributed import DistContext
from sefe_fast.train.feed import BatchSchedule, micro_batch_loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a mini-CoIN directory")
    parser.add_argument("--task", default="GQA")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--warm",
        action="store_true",
        help="one dataset with every image already cached: times the reader's own overhead",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    bundle = build_tiny_model(TinyConfig(), 0)
    tokenizer = bundle.tokenizer
    collate = functools.partial(collate_train, pad_token_id=tokenizer.pad_token_id)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    def load():
        dataset, _ = load_train_dataset(
            args.data / args.task / "train.json",
            args.data,
            tokenizer,
            bundle.image_processor,
            image_token_id=bundle.image_token_id,
            num_image_tokens=bundle.num_image_tokens,
            max_length=768,
        )
        schedule = BatchSchedule(
            len(dataset), batch_size=args.batch_size, grad_accum=1, seed=0, ctx=ctx,
            lengths=dataset.lengths(),
        )  # fmt: skip
        return dataset, schedule

    warm = load() if args.warm else None
    if warm is not None:
        for m in range(args.batches):
            for i in warm[1].micro_batch(m):
                warm[0][i]

    def fresh():
        return warm if warm is not None else load()

    def plain(dataset, schedule):
        for m in range(args.batches):
            collate([dataset[i] for i in schedule.micro_batch(m)])

    def loader(workers):
        def run(dataset, schedule):
            batches = micro_batch_loader(
                dataset, collate, schedule.micro_batch, first=0, count=args.batches,
                num_workers=workers, device=ctx.device, seed=0,
            )  # fmt: skip
            for _ in batches:
                pass

        return run

    readers = {"plain": plain, "loader0": loader(0)}
    if not args.warm:  # workers start with an empty cache of their own: not comparable warm
        readers["loader2"] = loader(2)
    times: dict[str, list[float]] = {name: [] for name in readers}
    cpu_times: dict[str, list[float]] = {name: [] for name in readers}
    names = list(readers)
    for round_ in range(args.rounds):
        # Rotate the order each round: background load drifts during a run.
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            read = readers[name]
            dataset, schedule = fresh()
            start, start_cpu = time.perf_counter(), time.process_time()
            read(dataset, schedule)
            times[name].append((time.perf_counter() - start) / args.batches)
            cpu_times[name].append((time.process_time() - start_cpu) / args.batches)
    median = {name: statistics.median(values) for name, values in times.items()}
    median_cpu = {name: statistics.median(values) for name, values in cpu_times.items()}
    print(
        json.dumps(
            {
                "task": args.task,
                "batches": args.batches,
                "batch_size": args.batch_size,
                "rounds": args.rounds,
                "warm": args.warm,
                "median_s_per_batch": median,
                "ratio_to_plain": {k: v / median["plain"] for k, v in median.items()},
                # CPU seconds of this process (workers' time not included): steadier than
                # wall time on a loaded machine.
                "median_cpu_s_per_batch": median_cpu,
                "cpu_ratio_to_plain": {k: v / median_cpu["plain"] for k, v in median_cpu.items()},
                "all_s_per_batch": times,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
