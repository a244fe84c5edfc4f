"""The KV-cache keyword of the installed transformers: `cache` (5.x) or `past_key_values`.

transformers 5.x renamed the forward argument and the output field `past_key_values` to
`cache`; the old argument still works but raises a FutureWarning on every forward (512 in a
default run: one per generated token batch and per shared-prefix training step), and the old
output field logs a deprecation line. Code that passes or reads a KV cache uses these two
helpers, so it speaks whichever name the installed version (>= 4.56, pyproject.toml) has.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import LlavaForConditionalGeneration

# The forward keyword (and output field) that carries the KV cache in this transformers.
CACHE_KEYWORD = (
    "cache"
    if "cache" in inspect.signature(LlavaForConditionalGeneration.forward).parameters
    else "past_key_values"
)


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`{CACHE_KEYWORD: cache}`: the keyword argument that hands `cache` to a forward."""
    return {CACHE_KEYWORD: cache}


def output_cache(output: Any) -> Any:
    """The KV cache a forward with `use_cache=True` returned."""
    return getattr(output, CACHE_KEYWORD)
