"""sefe_fast: a performance-oriented trainer for multimodal continual instruction tuning (SEFE)."""

__version__ = "0.1.0"
