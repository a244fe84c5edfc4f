"""The LoRA matrix shapes of the models the memory profile covers (`--spec`, `--layout`).

A `ModelSpec` lists groups of same-shape LoRA matrices (k×d, how many); `llama_lora_spec`
gives a Llama LLM's seven per layer (q, k, v, o, gate, up, down); `parse_layout` reads
`--layout name=KxD:COUNT,...`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MatrixGroup:
    """`count` LoRA matrices of one role with ΔW of shape k×d (k = out, d = in features)."""

    names: str
    k: int
    d: int
    count: int


@dataclass(frozen=True)
class ModelSpec:
    """The LoRA-targeted linears of a model, as groups of equal role and shape."""

    name: str
    groups: tuple[MatrixGroup, ...]

    @property
    def num_matrices(self) -> int:
        """N, the number of regularized matrices."""
        return sum(g.count for g in self.groups)

    def shape_counts(self) -> dict[tuple[int, int], int]:
        """Distinct (k, d) -> number of matrices of that shape, in first-seen order."""
        counts: dict[tuple[int, int], int] = {}
        for g in self.groups:
            counts[(g.k, g.d)] = counts.get((g.k, g.d), 0) + g.count
        return counts


def llama_lora_spec(name: str, layers: int, hidden: int, intermediate: int) -> ModelSpec:
    """LoRA on q,k,v,o (hidden×hidden), gate,up (intermediate×hidden), down (hidden×intermediate)."""
    return ModelSpec(
        name,
        (
            MatrixGroup("q,k,v,o", hidden, hidden, 4 * layers),
            MatrixGroup("gate,up", intermediate, hidden, 2 * layers),
            MatrixGroup("down", hidden, intermediate, layers),
        ),
    )


SPECS: dict[str, ModelSpec] = {
    "llava-7b": llama_lora_spec("llava-7b", 32, 4096, 11008),
    "llava-13b": llama_lora_spec("llava-13b", 40, 5120, 13824),
    # the tiny default model's LLM (sefe_fast.model.tiny: 4 layers × 128, MLP 352)
    "tiny": llama_lora_spec("tiny", 4, 128, 352),
}


def parse_layout(text: str) -> ModelSpec:
    """A custom spec from "KxD:COUNT[,KxD:COUNT...]", each entry optionally "NAME=KxD:COUNT".

    Example: "q=4096x4096:128,gate=11008x4096:64". Raises ValueError naming the bad entry.
    """
    groups = []
    for i, raw in enumerate(e.strip() for e in text.split(",")):
        if not raw:
            continue
        name, _, body = raw.rpartition("=")
        try:
            dims, count = body.split(":")
            k, d = (int(v) for v in dims.lower().split("x"))
            count_int = int(count)
        except ValueError:
            raise ValueError(
                f"layout entry {i} {raw!r}: expected KxD:COUNT or NAME=KxD:COUNT"
            ) from None
        if k <= 0 or d <= 0 or count_int <= 0:
            raise ValueError(f"layout entry {i} {raw!r}: k, d and count must be positive")
        groups.append(MatrixGroup(name or f"{k}x{d}", k, d, count_int))
    if not groups:
        raise ValueError(f"layout {text!r} lists no matrices")
    return ModelSpec("custom", tuple(groups))
