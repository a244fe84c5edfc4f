"""sefe_fast benchmarks: vanilla (official) RegLoRA against sefe_fast, side by side.

python -m pytest bench/ --benchmark-only [--benchmark-json out.json]
SEFE_FAST_BENCH_QUICK=1 python -m pytest bench/ --benchmark-only -q      # CI's quick set
python -m bench.summarize out.json --out docs/bench                     # table + plots
"""
