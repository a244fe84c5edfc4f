#!/usr/bin/env bash
# Regenerates every number and plot of BENCHMARKS.md's CPU sections in one run:
#   bash bench/reproduce.sh [OUT_DIR]      (default docs/bench; about 3 minutes here)
# Selections are cached in ${SEFE_FAST_CACHE:-~/.cache/sefe_fast}/selections (a second run
# skips them).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/bench}"
mkdir -p "$out"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores usable"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  python -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}, {torch.get_num_threads()} torch threads by default')"
} | tee "$out/machine.txt"

# One intra-op thread for both sides (the suite's default): stable numbers on a shared
# machine (bench/cases.py). SEFE_FAST_BENCH_THREADS=0 uses torch's default instead.
export SEFE_FAST_BENCH_THREADS="${SEFE_FAST_BENCH_THREADS:-1}"
python -m pytest bench/ --benchmark-only -q --benchmark-json "$out/bench_cpu.json"
python -m bench.summarize "$out/bench_cpu.json" --out "$out"
python -m sefe_fast.profile_memory --threads "$SEFE_FAST_BENCH_THREADS" --plot "$out/memory_llava7b.png" | tee "$out/memory_llava7b_bf16.md"
python -m sefe_fast.profile_memory --threads "$SEFE_FAST_BENCH_THREADS" --dtype fp32 | tee "$out/memory_llava7b_fp32.md"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/machine.txt"
