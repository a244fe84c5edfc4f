"""Measure what RegLoRA adds to a training step of the tiny model (plain LoRA vs. penalty).

    python -m sefe_fast.bench.train_step [--steps 5] [--rounds 3] [--tasks 7]

Each mode runs the same optimizer step (forward, backward, AdamW) on the same batch of
mini-CoIN-length sequences: `lora` (no penalty), `reference` (the official formula: dense
B·A per matrix) and `torch` (the fast CPU backend; `triton` is added on CUDA). The key
elements are those of `--tasks` earlier tasks (random LoRAs, M = 2 %), as in the last
stage of a run. Modes are interleaved round by round so that load from other processes
hits them alike; the median step time per mode is reported with the overhead over `lora`,
both as wall time and as this process's CPU time (less sensitive to other processes on a
shared machine; run with `--threads 1` there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sefe_fast.model.lora import attach_lora, lora_parameters, merge_lora
from sefe_fast.model.tiny import TinyConfig, build_tiny_model
from sefe_fast.paper_defaults import REG_LAMBDA
from sefe_fast.reglora import RegLoRA, collect_key_elements, lora_factors, merge_key_elements


def _key_elements(model: torch.nn.Module, tasks: int, r: int, ratio: float) -> dict:
    """Merged key elements of `tasks` random LoRAs (what the last stage of a run carries)."""
    merged: dict = {}
    for task in range(tasks):
        peft_model = attach_lora(model, r=r, alpha=2 * r, dropout=0.0)
        torch.manual_seed(100 + task)
        with torch.no_grad():
            for p in lora_parameters(peft_model):
                p.normal_(0, 0.05)
        selected = collect_key_elements(peft_model, ratio)
        merged = {
            n: merge_key_elements([merged[n], ke]) if n in merged else ke
            for n, ke in selected.items()
        }
        model = merge_lora(peft_model)
    return merged


def measure(
    steps: int = 5, rounds: int = 3, tasks: int = 7, batch: int = 16, length: int = 370, r: int = 16
) -> dict:
    """Median seconds per training step for each mode, and the overhead over plain LoRA (%)."""
    bundle = build_tiny_model(TinyConfig(), seed=0)
    model = bundle.model
    for p in model.parameters():
        p.requires_grad_(False)
    merged = _key_elements(model, tasks, r, 0.02)
    peft_model = attach_lora(model, r=r, alpha=2 * r, dropout=0.05)
    params = lora_parameters(peft_model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    torch.manual_seed(0)
    ids = torch.randint(5, len(bundle.tokenizer), (batch, length))
    ids[:, 1 : 1 + bundle.num_image_tokens] = bundle.image_token_id
    pixels = torch.randn(batch, 3, 32, 32)
    backends = ["reference", "torch"] + (["triton"] if torch.cuda.is_available() else [])
    modes = {
        "lora": None,
        **{backend: RegLoRA(merged, lam=REG_LAMBDA, backend=backend) for backend in backends},
    }

    def step(reg: RegLoRA | None) -> None:
        loss = peft_model(input_ids=ids, pixel_values=pixels, labels=ids).loss
        if reg is not None:
            loss = loss + reg(lora_factors(peft_model))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for reg in modes.values():  # warm-up (plans are built and cached here)
        step(reg)
    wall: dict[str, list[float]] = {name: [] for name in modes}
    cpu: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(rounds):
        for name, reg in modes.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step(reg)
            wall[name].append((time.perf_counter() - t0) / steps)
            cpu[name].append((time.process_time() - c0) / steps)
    result: dict = {}
    for label, times in (("wall", wall), ("cpu", cpu)):
        median = {name: statistics.median(v) for name, v in times.items()}
        result[f"{label}_seconds_per_step"] = median
        result[f"{label}_overhead_percent"] = {
            name: 100 * (median[name] / median["lora"] - 1) for name in modes if name != "lora"
        }
    return {
        **result,
        "setup": {
            "batch": batch,
            "length": length,
            "lora_r": r,
            "earlier_tasks": tasks,
            "threads": torch.get_num_threads(),
            "matrices": len(merged),
        },
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: print the measurement as JSON."""
    parser = argparse.ArgumentParser(prog="python -m sefe_fast.bench.train_step")
    parser.add_argument("--steps", type=int, default=5, help="steps per mode per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=7, help="earlier tasks' key elements")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=370, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.steps, args.rounds, args.tasks, args.batch, args.length)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
