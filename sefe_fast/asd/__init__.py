"""sefe_fast.asd: Answer Style Diversification (SEFE's data half) and the format checkers."""

from sefe_fast.asd.convert import AsdError, AsdStats, convert_file, convert_records
from sefe_fast.asd.rewriter import Rewriter, parse_explanation

__all__ = [
    "AsdError",
    "AsdStats",
    "Rewriter",
    "convert_file",
    "convert_records",
    "parse_explanation",
]
