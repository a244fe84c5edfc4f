"""sefe_fast.reglora: RegLoRA key-element selection, compact masks, penalty and regularizer.

See docs/reference.md §2 for the official semantics this package reproduces (`backend=
"reference"`) and speeds up (`"torch"` on the CPU, `"triton"` on GPUs).
"""

from sefe_fast.position_plan import PositionPlan
from sefe_fast.reglora.key_elements import KeyElements, merge_key_elements
from sefe_fast.reglora.penalty import reference_penalty_from_indices, reglora_penalty
from sefe_fast.reglora.regularizer import RegLoRA, collect_key_elements, lora_factors
from sefe_fast.reglora.selection import select_key_elements, select_key_elements_dense
from sefe_fast.reglora.storage import (
    KeyElementsFileError,
    load_key_elements,
    save_key_elements,
)

__all__ = [
    "KeyElements",
    "KeyElementsFileError",
    "PositionPlan",
    "RegLoRA",
    "collect_key_elements",
    "load_key_elements",
    "lora_factors",
    "merge_key_elements",
    "reference_penalty_from_indices",
    "reglora_penalty",
    "save_key_elements",
    "select_key_elements",
    "select_key_elements_dense",
]
