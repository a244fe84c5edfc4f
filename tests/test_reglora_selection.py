"""Key-element selection: streaming radix select against the dense topk reference."""

from __future__ import annotations

import pytest
import torch

from sefe_fast.bench.measuring import peak_extra_torch_bytes
from sefe_fast.reglora import (
    reglora_penalty,
    select_key_elements,
    select_key_elements_dense,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _factors(k, d, r, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(k, r, generator=gen).to(dtype),
        torch.randn(r, d, generator=gen).to(dtype),
    )


def _assert_same_set_up_to_rounding(lora_B, lora_A, streamed, dense, m):
    """Same positions, except swaps of entries whose |ΔW| lies within rounding of the threshold."""
    got, ref = set(streamed.linear().tolist()), set(dense.linear().tolist())
    assert len(streamed) == len(dense) == len(got) == m  # no duplicates within one task
    magnitude = (lora_B.double() @ lora_A.double()).abs().flatten()
    threshold = magnitude[list(ref)].min().item()
    for position in got ^ ref:
        assert magnitude[position].item() == pytest.approx(threshold, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    ("k", "d", "r", "ratio"),
    [(37, 53, 1, 0.02), (100, 77, 5, 0.1), (257, 129, 16, 0.02), (64, 300, 128, 0.3)],
)
def test_matches_dense_topk(k, d, r, ratio):
    lora_B, lora_A = _factors(k, d, r, seed=k + d + r)
    m = int(ratio * k * d)
    streamed = select_key_elements(lora_B, lora_A, ratio, tile_elements=1000)
    dense = select_key_elements_dense(lora_B, lora_A, ratio)
    _assert_same_set_up_to_rounding(lora_B, lora_A, streamed, dense, m)
    # the tile size does not change the result
    big_tiles = select_key_elements(lora_B, lora_A, ratio)
    assert torch.equal(big_tiles.linear(), streamed.linear())


def test_exact_ties_are_broken_by_lowest_linear_index():
    # Integer factors: ΔW is exact in fp32 and full of ties, also at the threshold.
    gen = torch.Generator().manual_seed(0)
    lora_B = torch.randint(-1, 2, (50, 3), generator=gen).float()
    lora_A = torch.randint(-1, 2, (3, 40), generator=gen).float()
    ratio = 0.13
    m = int(ratio * 50 * 40)
    magnitude = (lora_B @ lora_A).abs().flatten()
    order = sorted(range(magnitude.numel()), key=lambda i: (-magnitude[i].item(), i))
    expected = sorted(order[:m])
    got = select_key_elements(lora_B, lora_A, ratio, tile_elements=97)
    assert got.linear().tolist() == expected


def test_all_zero_product_picks_the_first_positions():
    # A fresh LoRA has B = 0: every |ΔW| ties at 0.
    lora_B, lora_A = torch.zeros(30, 4), torch.randn(4, 20)
    got = select_key_elements(lora_B, lora_A, 0.05)
    assert got.linear().tolist() == list(range(int(0.05 * 600)))


def test_nan_entries_rank_above_everything_like_topk():
    lora_B, lora_A = _factors(20, 30, 4, seed=1)
    lora_B[3, 0] = float("nan")  # row 3 of ΔW becomes NaN
    got = set(select_key_elements(lora_B, lora_A, 0.1).linear().tolist())
    assert set(range(3 * 30, 4 * 30)) <= got
    assert got == set(select_key_elements_dense(lora_B, lora_A, 0.1).linear().tolist())


def test_deterministic():
    lora_B, lora_A = _factors(300, 200, 8, seed=2)
    first = select_key_elements(lora_B, lora_A, 0.02)
    second = select_key_elements(lora_B.clone(), lora_A.clone(), 0.02)
    assert torch.equal(first.segments[0].gaps, second.segments[0].gaps)
    assert torch.equal(first.segments[0].escapes, second.segments[0].escapes)


@pytest.mark.parametrize("ratio", [0, 0.0, -0.5, 1.0001, 2, float("nan")])
def test_invalid_ratio_raises(ratio):
    lora_B, lora_A = _factors(10, 10, 2, seed=3)
    with pytest.raises(ValueError, match="ratio"):
        select_key_elements(lora_B, lora_A, ratio)
    with pytest.raises(ValueError, match="ratio"):
        select_key_elements_dense(lora_B, lora_A, ratio)


def test_ratio_one_selects_everything():
    lora_B, lora_A = _factors(7, 9, 2, seed=4)
    assert select_key_elements(lora_B, lora_A, 1.0).linear().tolist() == list(range(63))


def test_ratio_selecting_nothing_gives_empty_key_elements_and_zero_penalty():
    lora_B, lora_A = _factors(10, 10, 2, seed=5)
    ke = select_key_elements(lora_B, lora_A, 0.005)  # int(0.5) = 0 entries
    assert len(ke) == 0 and ke.shape == (10, 10)
    assert len(select_key_elements_dense(lora_B, lora_A, 0.005)) == 0
    for backend in ("reference", "torch"):
        B = lora_B.clone().requires_grad_()
        A = lora_A.clone().requires_grad_()
        penalty = reglora_penalty(B, A, ke, backend=backend)
        penalty.backward()
        assert penalty.item() == 0.0
        assert torch.count_nonzero(B.grad) == 0 and torch.count_nonzero(A.grad) == 0


def test_bf16_inputs_select_on_their_fp32_product():
    lora_B, lora_A = _factors(120, 90, 8, seed=6, dtype=torch.bfloat16)
    got = select_key_elements(lora_B, lora_A, 0.05)
    ref = select_key_elements_dense(lora_B.float(), lora_A.float(), 0.05)
    _assert_same_set_up_to_rounding(lora_B.float(), lora_A.float(), got, ref, int(0.05 * 120 * 90))


def test_bad_factors_raise():
    with pytest.raises(ValueError, match="rank mismatch"):
        select_key_elements(torch.randn(5, 3), torch.randn(4, 6))
    with pytest.raises(ValueError, match="floating point"):
        select_key_elements(torch.ones(5, 3, dtype=torch.int64), torch.randn(3, 6))
    with pytest.raises(ValueError, match="2-D"):
        select_key_elements(torch.randn(5), torch.randn(3, 6))


def test_streaming_selection_never_holds_the_product():
    k, d, r = 4096, 2048, 8  # ΔW: 32 MiB of fp32; the histograms take a fixed ~2 MiB
    lora_B, lora_A = _factors(k, d, r, seed=7)
    product_bytes = k * d * 4
    dense_peak = peak_extra_torch_bytes(lambda: select_key_elements_dense(lora_B, lora_A, 0.02))
    stream_peak = peak_extra_torch_bytes(
        lambda: select_key_elements(lora_B, lora_A, 0.02, tile_elements=1 << 16)
    )
    assert dense_peak >= product_bytes  # the measurement sees a k×d buffer when there is one
    assert stream_peak < product_bytes / 10
