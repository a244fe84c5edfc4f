"""The packed count planes a DeviceMask can hold: their codes, caps and sizes.

One place for the facts that the device masks (sefe_fast/reglora/device_mask.py), the cost
model (sefe_fast/roofline.py) and the benchmarks share; the kernels (kernels/reglora_tile.py)
decode the same layouts. A plane packs one count per ΔW entry into int32 words, E counts
per word:

- codes 1, 2 and 4: binary planes of that many bits per count (E = 32 / bits; caps 1, 3, 15);
- code 3, TRIT_PLANE: counts 0–2 as base-3 digits, five per byte (3⁵ = 243 ≤ 256), four
  bytes per word (E = 20; 1.6 bits per entry; cap 2).

Counts above a plane's cap go to the DeviceMask's list.
"""

from __future__ import annotations

TRIT_PLANE = 3
PLANE_BITS = (1, 2, TRIT_PLANE, 4)
TRITS_PER_BYTE = 5
# The largest count each plane holds; positions chosen more often are listed with the excess.
PLANE_CAPS = {bits: 2 if bits == TRIT_PLANE else (1 << bits) - 1 for bits in PLANE_BITS}


def check_plane_bits(bits: int) -> None:
    """ValueError unless `bits` is a plane code."""
    if bits not in PLANE_BITS:
        raise ValueError(f"plane bits must be one of {PLANE_BITS} (3: trit plane), got {bits!r}")


def entries_per_word(bits: int) -> int:
    """E: how many counts one int32 word holds (32 // bits; 20 for the trit plane)."""
    check_plane_bits(bits)
    return 4 * TRITS_PER_BYTE if bits == TRIT_PLANE else 32 // bits


def plane_width(d: int, bits: int) -> int:
    """Words per row of a plane of a matrix with `d` columns: ceil(d / E)."""
    per_word = entries_per_word(bits)
    return (int(d) + per_word - 1) // per_word


def plane_label(bits: int) -> str:
    """How tables name a representation: 'gather' (0), '1-bit', '2-bit', 'trit', '4-bit'."""
    if bits == 0:
        return "gather"
    check_plane_bits(bits)
    return "trit" if bits == TRIT_PLANE else f"{bits}-bit"
