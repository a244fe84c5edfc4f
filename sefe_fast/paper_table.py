"""The SEFE paper's CoIN table (LLaVA-1.5-7B), keyed by sefe_fast's method names.

Final accuracy per task after the last one, then MFT, MFN, MAA, BWT, in percent, exactly as
docs/reference.md §5 reproduces them (tests/test_paper_table.py reads that table and checks
that the two agree). Used by `python -m sefe_fast.compare` to print the paper's numbers next
to a run's, so a reader sees both scales at once: the paper trains a 7B model on real CoIN,
while mini-CoIN runs are tiny or 135M models on generated data, so only the methods' order
and gaps are comparable, not the values.
"""

from __future__ import annotations

from sefe_fast.run_results import PAPER_COLUMNS

# sefe_fast method name -> the paper's row label.
PAPER_METHOD_LABELS: dict[str, str] = {
    "fft": "FFT",
    "lora": "LoRA",
    "olora": "O-LoRA",
    "lota": "LoTA",
    "asd": "LoRA+ASD",
    "sefe": "SEFE (ASD+RegLoRA)",
}

_ROWS: dict[str, tuple[float, ...]] = {
    # SQA, TextVQA, ImgNet, GQA, VizWiz, Grd, VQAv2, OCR, MFT, MFN, MAA, BWT
    "fft": (2.95, 36.38, 52.35, 46.40, 33.90, 0.00, 61.65, 50.00, 65.87, 35.45, 36.73, -30.42),
    "lora": (54.05, 44.63, 41.25, 47.55, 20.80, 0.85, 59.30, 64.30, 70.21, 41.59, 39.53, -28.62),
    "olora": (75.40, 52.89, 71.85, 47.30, 37.35, 7.10, 61.85, 61.20, 69.30, 51.87, 49.56, -17.43),
    "lota": (67.30, 41.51, 8.25, 37.15, 42.25, 0.10, 47.95, 56.15, 54.72, 37.58, 50.46, -17.14),
    "asd": (74.45, 49.70, 39.30, 52.00, 50.45, 7.05, 62.25, 47.80, 68.13, 47.88, 59.71, -20.26),
    "sefe": (75.35, 58.66, 83.10, 54.25, 48.85, 16.75, 65.35, 66.25, 69.02, 58.57, 63.04, -10.45),
}

PAPER_ROWS: dict[str, dict[str, float]] = {
    method: dict(zip(PAPER_COLUMNS, values, strict=True)) for method, values in _ROWS.items()
}
