"""Measurement and reporting tools, beside the library's data path (nothing in training imports them).

- `measuring`: peak-memory and timing helpers (one set, used by everything below and by the
  pytest-benchmark suite in the top-level `bench/`);
- `workloads`: seeded random LoRA pairs and their cached key-element selections;
- `penalty_cpu`: `python -m sefe_fast.bench.penalty_cpu`, the CPU side-by-side of the fast
  RegLoRA paths against the official ones;
- `profile_memory`: RegLoRA memory over a run, measured; `profile_report`: its command line
  `python -m sefe_fast.profile_memory`, tables and plot;
- `train_step`: `python -m sefe_fast.bench.train_step`, what RegLoRA adds to a tiny-model step.

The compile report `python -m sefe_fast.kernel_report` stays at `sefe_fast/kernel_report.py`
for now (its roofline model is being split out on another branch).
"""
