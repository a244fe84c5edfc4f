"""Triton key-element selection against the torch streaming path and dense `torch.topk`.

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) in
fp32, on shapes that are not multiples of the interpreter's 128×128 tiles. Positions must
be identical to the torch path's, except swaps of entries whose |ΔW| lies within fp32
rounding of the threshold (the two paths may round a product in the last bit); exact ties
(integer factors, B = 0) must be broken identically (lowest linear index).
"""

from __future__ import annotations

import pytest
import torch

from sefe_fast.reglora import select_key_elements, select_key_elements_dense
from sefe_fast.reglora.selection import num_selected, resolve_selection_backend
from sefe_fast_kernels import key_element_selection

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative distance to the threshold within which two paths may disagree: fp32 rounding of
# an r-term dot product (r ≤ 130) in a different summation order, with margin.
ROUNDING_REL = {torch.float32: 1e-5, torch.bfloat16: 1e-5}

pytestmark = pytest.mark.usefixtures("one_thread")


def factors(k: int, d: int, rank: int, seed: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    lora_b = torch.randn(k, rank, generator=generator).to(dtype)
    lora_a = torch.randn(rank, d, generator=generator).to(dtype)
    return lora_b.to(DEVICE), lora_a.to(DEVICE)


def triton_linear(lora_b, lora_a, ratio) -> torch.Tensor:
    return select_key_elements(lora_b, lora_a, ratio, backend="triton").linear()


def assert_same_up_to_rounding(lora_b, lora_a, got: torch.Tensor, expected: torch.Tensor, m: int):
    """Same m positions, except swaps of entries within rounding of the threshold."""
    assert got.numel() == expected.numel() == m
    assert torch.equal(got, torch.sort(got).values), "positions must come sorted"
    assert torch.unique(got).numel() == m, "no position may be chosen twice"
    got_set, expected_set = set(got.tolist()), set(expected.tolist())
    magnitude = (lora_b.double() @ lora_a.double()).abs().flatten().cpu()
    threshold = magnitude[sorted(expected_set)].min().item()
    rel = ROUNDING_REL[lora_b.dtype]
    for position in got_set ^ expected_set:
        assert magnitude[position].item() == pytest.approx(threshold, rel=rel, abs=1e-30), (
            f"position {position} differs and is not within rounding of the threshold"
        )


@pytest.mark.parametrize(
    ("k", "d", "rank", "ratio"),
    [
        (37, 53, 1, 0.02),
        (100, 77, 5, 0.1),
        (257, 129, 16, 0.02),
        (130, 300, 130, 0.05),
        (200, 131, 64, 0.3),
    ],
)
def test_same_positions_as_torch_path_and_dense_topk(k, d, rank, ratio):
    lora_b, lora_a = factors(k, d, rank, seed=k * d + rank)
    m = num_selected((k, d), ratio)
    got = triton_linear(lora_b, lora_a, ratio)
    torch_path = select_key_elements(lora_b, lora_a, ratio, backend="torch").linear()
    dense = select_key_elements_dense(lora_b, lora_a, ratio).linear()
    assert_same_up_to_rounding(lora_b, lora_a, got, torch_path, m)
    assert_same_up_to_rounding(lora_b, lora_a, got, dense, m)


@pytest.mark.parametrize(("k", "d", "rank"), [(129, 131, 3), (300, 17, 128)])
def test_a_ratio_of_one_entry_picks_the_largest(k, d, rank):
    lora_b, lora_a = factors(k, d, rank, seed=rank)
    ratio = 1.5 / (k * d)  # int(1.5) = 1 entry
    got = triton_linear(lora_b, lora_a, ratio)
    expected = int(torch.argmax((lora_b.double() @ lora_a.double()).abs()).item())
    assert got.tolist() == [expected]


def test_zero_b_picks_the_first_positions():
    # A fresh LoRA: B = 0, every |ΔW| ties at 0, so the first m linear indices win.
    lora_b = torch.zeros(150, 8, device=DEVICE)
    lora_a = torch.randn(8, 140, device=DEVICE)
    got = triton_linear(lora_b, lora_a, 0.02)
    assert got.tolist() == list(range(num_selected((150, 140), 0.02)))


@pytest.mark.parametrize("ratio", [0.13, 0.5])
def test_exact_ties_are_broken_by_lowest_linear_index_like_the_torch_path(ratio):
    # Integer factors: ΔW is exact in fp32 in every path, with many ties at the threshold,
    # and the ties span several column blocks and row blocks (tiles are 128×128 here).
    generator = torch.Generator().manual_seed(0)
    lora_b = torch.randint(-1, 2, (150, 3), generator=generator).float().to(DEVICE)
    lora_a = torch.randint(-1, 2, (3, 270), generator=generator).float().to(DEVICE)
    m = num_selected((150, 270), ratio)
    magnitude = (lora_b @ lora_a).abs().flatten().cpu()
    order = sorted(range(magnitude.numel()), key=lambda i: (-magnitude[i].item(), i))
    expected = sorted(order[:m])
    got = triton_linear(lora_b, lora_a, ratio)
    assert got.tolist() == expected
    assert torch.equal(got, select_key_elements(lora_b, lora_a, ratio, backend="torch").linear())


def test_ratio_one_selects_everything():
    lora_b, lora_a = factors(131, 9, 2, seed=4)
    assert triton_linear(lora_b, lora_a, 1.0).tolist() == list(range(131 * 9))


def test_nan_entries_rank_above_everything_like_topk():
    lora_b, lora_a = factors(40, 30, 4, seed=1)
    lora_b[3, 0] = float("nan")  # row 3 of ΔW becomes NaN
    got = set(triton_linear(lora_b, lora_a, 0.1).tolist())
    assert set(range(3 * 30, 4 * 30)) <= got
    assert got == set(select_key_elements_dense(lora_b, lora_a, 0.1).linear().tolist())


def test_strided_factors_give_the_same_positions():
    lora_b, lora_a = factors(140, 90, 12, seed=9)
    b_strided = lora_b.t().contiguous().t()  # column-major k×r
    a_strided = lora_a.t().contiguous().t()
    assert not b_strided.is_contiguous() and not a_strided.is_contiguous()
    assert torch.equal(
        triton_linear(b_strided, a_strided, 0.05), triton_linear(lora_b, lora_a, 0.05)
    )


def test_bf16_factors_select_on_their_fp32_product():
    lora_b, lora_a = factors(120, 150, 8, seed=6, dtype=torch.bfloat16)
    m = num_selected((120, 150), 0.05)
    got = triton_linear(lora_b, lora_a, 0.05)
    expected = select_key_elements_dense(lora_b.float(), lora_a.float(), 0.05).linear()
    assert_same_up_to_rounding(lora_b.float(), lora_a.float(), got, expected, m)


def test_deterministic_and_in_key_elements_form():
    lora_b, lora_a = factors(200, 150, 16, seed=2)
    first = select_key_elements(lora_b, lora_a, 0.02, backend="triton")
    second = select_key_elements(lora_b.clone(), lora_a.clone(), 0.02, backend="triton")
    assert first.shape == (200, 150) and first.num_segments == 1
    assert torch.equal(first.segments[0].gaps, second.segments[0].gaps)
    assert torch.equal(first.segments[0].escapes, second.segments[0].escapes)
    assert first.segments[0].gaps.device.type == "cpu"


def test_nothing_selected_gives_empty_key_elements():
    lora_b, lora_a = factors(10, 10, 2, seed=5)
    key_elements = select_key_elements(lora_b, lora_a, 0.005, backend="triton")
    assert len(key_elements) == 0 and key_elements.shape == (10, 10)


def test_launcher_reports_how_many_entries_it_placed():
    lora_b, lora_a = factors(70, 80, 4, seed=3)
    linear, placed = key_element_selection.top_linear_indices(lora_b, lora_a, 17)
    assert int(placed) == 17 and linear.numel() == 17
    with pytest.raises(ValueError, match="m must be"):
        key_element_selection.top_linear_indices(lora_b, lora_a, 70 * 80 + 1)


def test_backend_resolution_and_bad_names():
    assert resolve_selection_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_selection_backend("auto", torch.device("cuda", 0)) == "triton"
    assert resolve_selection_backend("triton", torch.device("cpu")) == "triton"
    lora_b, lora_a = factors(10, 10, 2, seed=5)
    with pytest.raises(ValueError, match="unknown selection backend"):
        select_key_elements(lora_b, lora_a, 0.1, backend="cuda")


def test_aot_launches_cover_every_kernel_of_the_module():
    launched = {launch.kernel for launch in key_element_selection.aot_launches()}
    assert launched == {
        key_element_selection._radix_histogram_kernel,
        key_element_selection._tile_count_kernel,
        key_element_selection._compact_kernel,
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA notion")
def test_launcher_never_synchronises_with_the_host():
    lora_b, lora_a = factors(1000, 700, 32, seed=8)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        linear, placed = key_element_selection.top_linear_indices(lora_b, lora_a, 14_000)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(placed) == 14_000 and linear.numel() == 14_000


def test_small_tiles_and_rank_chunks_give_the_same_positions(monkeypatch):
    # The CUDA config's shape of work: many programs merging histograms, ties and segments
    # spread over several column blocks, and the rank in several BLOCK_R chunks with a tail.
    lora_b, lora_a = factors(70, 90, 130, seed=11)
    big_tiles = triton_linear(lora_b, lora_a, 0.07)
    small = {"BLOCK_K": 32, "BLOCK_D": 32, "BLOCK_R": 16, "num_warps": 4}
    monkeypatch.setattr(key_element_selection, "launch_config", lambda: dict(small))
    small_tiles = triton_linear(lora_b, lora_a, 0.07)
    m = num_selected((70, 90), 0.07)
    assert_same_up_to_rounding(lora_b, lora_a, small_tiles, big_tiles, m)
    torch_path = select_key_elements(lora_b, lora_a, 0.07, backend="torch").linear()
    assert_same_up_to_rounding(lora_b, lora_a, small_tiles, torch_path, m)
    # exact ties across many small tiles
    generator = torch.Generator().manual_seed(1)
    int_b = torch.randint(-1, 2, (70, 3), generator=generator).float().to(DEVICE)
    int_a = torch.randint(-1, 2, (3, 90), generator=generator).float().to(DEVICE)
    assert torch.equal(
        triton_linear(int_b, int_a, 0.3),
        select_key_elements(int_b, int_a, 0.3, backend="torch").linear(),
    )


def test_a_compaction_that_disagrees_with_the_count_is_an_error(monkeypatch):
    lora_b, lora_a = factors(30, 40, 4, seed=12)
    real = key_element_selection.top_linear_indices

    def short_by_one(lora_b, lora_a, m):
        linear, placed = real(lora_b, lora_a, m)
        return linear, placed - 1

    monkeypatch.setattr(key_element_selection, "top_linear_indices", short_by_one)
    with pytest.raises(RuntimeError, match="placed 23 entries, expected 24"):
        select_key_elements(lora_b, lora_a, 0.02, backend="triton")
