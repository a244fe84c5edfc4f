"""The dense-tile RegLoRA kernels (and the DeviceMask dispatch) against float64 references.

On a machine without CUDA these run under TRITON_INTERPRET=1 (tests/conftest.py) in fp32,
where tl.dot is an fp32 numpy matmul ("ieee"): value and gradients must match the float64
dense formula to fp32 rounding. On CUDA the same checks run for fp32 factors at every
tl.dot input precision and for bf16 factors, with the tolerances of the accuracy contract
in kernels/reglora_tile.py's docstring.
"""

import pytest
import torch

from sefe_fast.position_plan import PositionPlan
from sefe_fast.reglora.device_mask import (
    PLANE_BITS,
    PLANE_CAPS,
    TRIT_PLANE,
    DeviceMask,
    build_device_mask,
    build_device_mask_group,
    pack_counts,
)
from sefe_fast.reglora.key_elements import KeyElements
from sefe_fast.reglora.penalty import penalty_device_mask, penalty_mask_group, reglora_penalty
from sefe_fast_kernels import reglora_tile
from sefe_fast_kernels.reglora_tile import TRIT_MAGIC, penalty_tile_grouped, words_per_row

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Interpreter and CUDA "ieee": fp32 rounding only. Max error relative to the largest entry.
VALUE_REL, GRAD_REL = 1e-5, 1e-4


def factors(k: int, d: int, rank: int, seed: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    lora_b = torch.randn(k, rank, generator=generator).to(DEVICE, dtype)
    lora_a = torch.randn(rank, d, generator=generator).to(DEVICE, dtype)
    return lora_b, lora_a


def random_counts(k: int, d: int, bits: int, density: float, seed: int) -> torch.Tensor:
    """uint8 [k, d] counts in [1, cap] at about `density` of the entries, 0 elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.rand(k, d, generator=generator) < density
    values = torch.randint(1, PLANE_CAPS[bits] + 1, (k, d), generator=generator)
    return (values * chosen).to(torch.uint8)


def dense_reference(lora_b, lora_a, counts: torch.Tensor, n_total: int):
    """(1/n)·Σ c·|B·A| and its gradients in float64 (torch.abs's gradient: sign(0) = 0)."""
    b = lora_b.detach().double().cpu().requires_grad_()
    a = lora_a.detach().double().cpu().requires_grad_()
    value = (counts.double() * (b @ a).abs()).sum() / max(n_total, 1)
    grad_b, grad_a = torch.autograd.grad(value, (b, a))
    return value.detach(), grad_b, grad_a


def tile(lora_b, lora_a, counts, bits: int, n_total: int, upstream: float = 1.0, **kwargs):
    """Value and gradients (times `upstream`) of penalty_tile_grouped for one matrix."""
    b = lora_b.detach().clone().requires_grad_()
    a = lora_a.detach().clone().requires_grad_()
    plane = pack_counts(counts, bits).to(DEVICE)
    inv_n = torch.full((1,), 1.0 / max(n_total, 1), dtype=torch.float32, device=DEVICE)
    value = penalty_tile_grouped([b], [a], [plane], bits, inv_n, **kwargs)[0]
    weight = torch.tensor(upstream, device=DEVICE)
    grad_b, grad_a = torch.autograd.grad(value, (b, a), grad_outputs=weight)
    return value.detach(), grad_b, grad_a


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str):
    """max |actual − expected| ≤ rel · max(max |expected|, tiny)."""
    expected = expected.double().cpu()
    scale = max(expected.abs().max().item(), 1e-30)
    error = (actual.double().cpu() - expected).abs().max().item()
    assert error <= rel * scale, f"{what}: max error {error:.3e} vs scale {scale:.3e}"


def assert_matches(got, expected, value_rel=VALUE_REL, grad_rel=GRAD_REL):
    value, grad_b, grad_a = got
    ref_value, ref_grad_b, ref_grad_a = expected
    assert value.ndim == 0 and value.dtype == torch.float32
    assert_close(value, ref_value, value_rel, "value")
    assert_close(grad_b, ref_grad_b, grad_rel, "grad B")
    assert_close(grad_a, ref_grad_a, grad_rel, "grad A")


# Shapes that are not multiples of the tiles (64 under the interpreter, 32–128 on CUDA),
# some spanning several row and column blocks (the owners' loops); ranks from 1 (padded to
# the 16 tl.dot needs) to 130 (two rank chunks of 128: no resident owner block, ΔW
# re-formed from rank steps, the value reported by chunk 0 only).
@pytest.mark.parametrize("bits", PLANE_BITS)
@pytest.mark.parametrize(
    ("k", "d", "rank"),
    [(70, 130, 1), (37, 53, 7), (131, 197, 7), (45, 67, 16), (23, 29, 130), (70, 140, 130)],
)
def test_plane_penalty_matches_float64_dense_formula(k, d, rank, bits):
    lora_b, lora_a = factors(k, d, rank, seed=k + rank)
    counts = random_counts(k, d, bits, 0.3, seed=rank + bits)
    # n covers positions outside the plane too (the extra list): the plane part is scaled
    # by the whole mask's 1/n, not by its own count.
    n_total = int(counts.sum()) + 17
    got = tile(lora_b, lora_a, counts, bits, n_total, input_precision="ieee")
    assert got[1].dtype == lora_b.dtype and got[2].dtype == lora_a.dtype
    assert_matches(got, dense_reference(lora_b, lora_a, counts, n_total))


def test_trit_digit_extraction_is_exact_for_every_byte():
    # The kernel's ⌊byte · m_s / 2¹⁶⌋ mod 3 (m_s = ⌈2¹⁶ / 3^s⌉) in the int32 arithmetic it
    # runs, against the plain base-3 digit, for all 256 bytes and 5 digit slots.
    byte = torch.arange(256, dtype=torch.int32)[:, None]
    magic = torch.tensor(TRIT_MAGIC, dtype=torch.int32)[None, :]
    shifted = (byte * magic) >> 16
    digit = shifted - 3 * ((shifted * 21846) >> 16)
    expected = torch.div(byte, 3 ** torch.arange(5, dtype=torch.int32), rounding_mode="floor") % 3
    assert torch.equal(digit, expected)


@pytest.mark.parametrize("bits", [2, TRIT_PLANE, 4])
def test_every_count_value_of_a_multi_bit_plane_is_decoded(bits):
    # Counts 0..cap in every column residue mod E (all shifts and trit slots, the sign
    # bit's too); 70 columns: the trit plane's words straddle the 64-column tiles.
    k, d = 16, 70
    top = PLANE_CAPS[bits] + 1
    counts = ((torch.arange(k)[:, None] + torch.arange(d)[None, :]) % top).to(torch.uint8)
    lora_b, lora_a = factors(k, d, 8, seed=3)
    got = tile(lora_b, lora_a, counts, bits, int(counts.sum()))
    assert_matches(got, dense_reference(lora_b, lora_a, counts, int(counts.sum())))


@pytest.mark.parametrize("bits", PLANE_BITS)
def test_all_positions_chosen(bits):
    k, d = 33, 70
    counts = torch.full((k, d), PLANE_CAPS[bits], dtype=torch.uint8)
    lora_b, lora_a = factors(k, d, 24, seed=4)
    got = tile(lora_b, lora_a, counts, bits, int(counts.sum()))
    assert_matches(got, dense_reference(lora_b, lora_a, counts, int(counts.sum())))


def test_trit_fp32_row_owner_prunes_the_config_that_spills(monkeypatch):
    # On CUDA the autotuner must never try the row-owner config that spills with the trit
    # decode and fp32 factors; every other (code, dtype) keeps the whole list.
    monkeypatch.setattr(reglora_tile, "INTERPRET", False)
    configs = reglora_tile._configs(reglora_tile.ROW_OWNER_CONFIGS_CUDA, None)
    excluded = reglora_tile.ROW_OWNER_TRIT_FP32_EXCLUDED

    def kept(bits, dtype):
        named = {"b_ptr": torch.empty(1, dtype=dtype)}
        chosen = reglora_tile._prune_row_owner_configs(configs, named, BITS=bits)
        return [(c.kwargs, c.num_warps, c.num_stages) for c in chosen]

    trit_fp32 = kept(TRIT_PLANE, torch.float32)
    assert trit_fp32 and not any(c in excluded for c in trit_fp32)
    assert len(trit_fp32) == len(configs) - len(excluded)
    for bits, dtype in ((TRIT_PLANE, torch.bfloat16), (1, torch.float32), (4, torch.float32)):
        assert len(kept(bits, dtype)) == len(configs)


def test_empty_plane_gives_zero_and_zero_gradients():
    lora_b, lora_a = factors(13, 21, 8, seed=5)
    value, grad_b, grad_a = tile(lora_b, lora_a, torch.zeros(13, 21, dtype=torch.uint8), 1, 0)
    assert value.item() == 0.0
    assert torch.count_nonzero(grad_b).item() == 0 and torch.count_nonzero(grad_a).item() == 0


def test_fresh_lora_with_zero_b_has_zero_value_and_gradients():
    # A new task's LoRA starts with B = 0: ΔW = 0 everywhere and d|x|/dx at 0 is 0, so
    # neither factor gets a gradient (torch.abs does the same).
    lora_b, lora_a = factors(19, 23, 8, seed=6)
    lora_b = torch.zeros_like(lora_b)
    counts = random_counts(19, 23, 4, 0.5, seed=6)
    got = tile(lora_b, lora_a, counts, 4, int(counts.sum()))
    assert got[0].item() == 0.0
    assert torch.count_nonzero(got[1]).item() == 0 and torch.count_nonzero(got[2]).item() == 0


def test_results_are_bitwise_deterministic():
    lora_b, lora_a = factors(70, 90, 32, seed=7)
    counts = random_counts(70, 90, 4, 0.4, seed=7)
    first = tile(lora_b, lora_a, counts, 4, 1000)
    second = tile(lora_b, lora_a, counts, 4, 1000)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_grouped_launch_matches_per_matrix_launches_bitwise():
    k, d, rank, bits = 29, 70, 12, 4
    pairs = [factors(k, d, rank, seed=10 + m) for m in range(3)]
    densities = (0.3, 0.0, 0.8)
    counts = [random_counts(k, d, bits, p, seed=20 + m) for m, p in enumerate(densities)]
    n_totals = [int(c.sum()) + 5 for c in counts]
    bs = [b.clone().requires_grad_() for b, _ in pairs]
    as_ = [a.clone().requires_grad_() for _, a in pairs]
    planes = [pack_counts(c, bits).to(DEVICE) for c in counts]
    inv_n = torch.tensor([1.0 / n for n in n_totals], device=DEVICE)
    values = penalty_tile_grouped(bs, as_, planes, bits, inv_n)
    assert values.shape == (3,) and values.dtype == torch.float32
    upstream = torch.tensor([1.0, 2.0, -3.0], device=DEVICE)  # each matrix its own scale
    (values * upstream).sum().backward()
    for m, ((b, a), c, n) in enumerate(zip(pairs, counts, n_totals)):
        single = tile(b, a, c, bits, n, upstream=upstream[m].item())
        assert torch.equal(values[m].detach(), single[0]), f"matrix {m}: grouped ≠ single"
        assert torch.equal(bs[m].grad, single[1]), f"matrix {m} grad B"
        assert torch.equal(as_[m].grad, single[2]), f"matrix {m} grad A"
        ref_value, ref_grad_b, ref_grad_a = dense_reference(b, a, c, n)
        assert_close(values[m].detach(), ref_value, VALUE_REL, f"matrix {m} value")
        assert_close(bs[m].grad, upstream[m].item() * ref_grad_b, GRAD_REL, f"matrix {m} B")
        assert_close(as_[m].grad, upstream[m].item() * ref_grad_a, GRAD_REL, f"matrix {m} A")
    assert values[1].item() == 0.0 and torch.count_nonzero(bs[1].grad).item() == 0


def _count_calls(monkeypatch, *names: str) -> dict[str, int]:
    """Wrap reglora_tile's launch helpers `names` to count how often each runs."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(reglora_tile, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(reglora_tile, name, counted)
    return calls


LAUNCHERS = ("_forward_value", "_forward_value_and_grad_b", "_grad_a")


def test_training_step_runs_the_fused_row_owner_and_the_column_owner_only(monkeypatch):
    # Forward: value and dB from one row-owner pass; backward: only the dA kernel (the
    # saved dB is scaled by g·inv_n), and the gradients still match float64.
    calls = _count_calls(monkeypatch, *LAUNCHERS)
    lora_b, lora_a = factors(100, 150, 20, seed=60)
    counts = random_counts(100, 150, 4, 0.3, seed=60)
    n_total = int(counts.sum())
    got = tile(lora_b, lora_a, counts, 4, n_total, upstream=-2.5)
    assert calls == {"_forward_value": 0, "_forward_value_and_grad_b": 1, "_grad_a": 1}
    ref_value, ref_grad_b, ref_grad_a = dense_reference(lora_b, lora_a, counts, n_total)
    assert_matches(got, (ref_value, -2.5 * ref_grad_b, -2.5 * ref_grad_a))


def test_no_grad_evaluation_runs_the_value_kernel_only(monkeypatch):
    calls = _count_calls(monkeypatch, *LAUNCHERS)
    lora_b, lora_a = factors(100, 150, 20, seed=61)
    counts = random_counts(100, 150, 1, 0.3, seed=61)
    n_total = int(counts.sum()) + 3
    plane = pack_counts(counts, 1).to(DEVICE)
    inv_n = torch.full((1,), 1.0 / n_total, device=DEVICE)
    ref_value = dense_reference(lora_b, lora_a, counts, n_total)[0]
    b, a = lora_b.clone().requires_grad_(), lora_a.clone().requires_grad_()
    with torch.no_grad():
        no_grad = penalty_tile_grouped([b], [a], [plane], 1, inv_n)
    frozen = penalty_tile_grouped([lora_b], [lora_a], [plane], 1, inv_n)  # no factor needs grad
    assert calls == {"_forward_value": 2, "_forward_value_and_grad_b": 0, "_grad_a": 0}
    assert no_grad.grad_fn is None and frozen.grad_fn is None
    assert torch.equal(no_grad, frozen)
    assert_close(no_grad[0], ref_value, VALUE_REL, "no-grad value")
    # The fused path sums the same products in another order: equal to fp32 rounding.
    fused = penalty_tile_grouped([b], [a], [plane], 1, inv_n)
    assert_close(fused[0].detach(), no_grad[0], VALUE_REL, "fused vs value-only")


def test_frozen_b_skips_the_fused_grad_b_and_frozen_a_skips_grad_a(monkeypatch):
    lora_b, lora_a = factors(70, 90, 12, seed=62)
    counts = random_counts(70, 90, 4, 0.4, seed=62)
    n_total = int(counts.sum())
    plane = pack_counts(counts, 4).to(DEVICE)
    inv_n = torch.full((1,), 1.0 / n_total, device=DEVICE)
    _, ref_grad_b, ref_grad_a = dense_reference(lora_b, lora_a, counts, n_total)

    calls = _count_calls(monkeypatch, *LAUNCHERS)
    a = lora_a.clone().requires_grad_()
    (grad_a,) = torch.autograd.grad(penalty_tile_grouped([lora_b], [a], [plane], 4, inv_n)[0], a)
    assert calls == {"_forward_value": 1, "_forward_value_and_grad_b": 0, "_grad_a": 1}
    assert_close(grad_a, ref_grad_a, GRAD_REL, "grad A, B frozen")

    calls.update(dict.fromkeys(calls, 0))
    b = lora_b.clone().requires_grad_()
    (grad_b,) = torch.autograd.grad(penalty_tile_grouped([b], [lora_a], [plane], 4, inv_n)[0], b)
    assert calls == {"_forward_value": 0, "_forward_value_and_grad_b": 1, "_grad_a": 0}
    assert_close(grad_b, ref_grad_b, GRAD_REL, "grad B, A frozen")


def test_a_grad_b_request_without_the_fused_forward_is_a_clear_error():
    lora_b, lora_a = factors(8, 40, 4, seed=63)
    counts = random_counts(8, 40, 1, 0.5, seed=63)
    group = reglora_tile._TileGroup(
        (pack_counts(counts, 1).to(DEVICE),), 1, torch.ones(1, device=DEVICE), "ieee"
    )
    b = lora_b.clone().requires_grad_()
    value = reglora_tile.TilePenaltyFunction.apply(group, False, b, lora_a)
    with pytest.raises(RuntimeError, match="dB was not formed"):
        value.sum().backward()


def test_bad_planes_and_arguments_are_clear_errors():
    lora_b, lora_a = factors(8, 40, 4, seed=8)
    plane = torch.zeros(8, words_per_row(40, 4), dtype=torch.int32, device=DEVICE)
    inv_n = torch.ones(1, device=DEVICE)
    with pytest.raises(
        ValueError, match=r"matrix 0: the plane must be a contiguous int32 \[8, 2\]"
    ):
        penalty_tile_grouped([lora_b], [lora_a], [plane], 1, inv_n)
    with pytest.raises(ValueError, match="plane bits must be one of"):
        penalty_tile_grouped([lora_b], [lora_a], [plane], 5, inv_n)
    with pytest.raises(ValueError, match="input_precision must be one of"):
        penalty_tile_grouped([lora_b], [lora_a], [plane], 4, inv_n, input_precision="fp8")
    with pytest.raises(ValueError, match="matrix 1"):
        penalty_tile_grouped(
            [lora_b, lora_b], [lora_a, lora_a[:, :30]], [plane, plane], 4, inv_n.repeat(2)
        )


# --- DeviceMask dispatch in sefe_fast.reglora.penalty -------------------------------------


def key_elements_with_duplicates(k: int, d: int, tasks: int, density: float, seed: int):
    """KeyElements of `tasks` masks concatenated, with the second task repeating half of
    the first's positions (so duplicates exist whatever the random draw)."""
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(tasks):
        chosen = torch.nonzero(torch.rand(k * d, generator=generator) < density).flatten()
        masks.append(chosen)
    masks.append(masks[0][::2])
    return KeyElements.from_linear(torch.sort(torch.cat(masks)).values, (k, d))


def mask_with_bits(key_elements: KeyElements, bits: int, device=DEVICE) -> DeviceMask:
    """A DeviceMask with a forced plane width: capped counts in the plane, the rest listed."""
    k, d = key_elements.shape
    linear = key_elements.linear()
    counts = torch.bincount(linear, minlength=k * d).reshape(k, d)
    cap = PLANE_CAPS[bits]
    plane = pack_counts(counts.clamp(max=cap).to(torch.uint8), bits)
    excess = (counts - cap).clamp(min=0).flatten()
    listed = torch.nonzero(excess).flatten()
    extra = None
    if listed.numel():
        extra = PositionPlan.from_linear(listed, excess[listed], (k, d), len(key_elements))
        extra = extra.to(device)
    return DeviceMask((k, d), len(key_elements), bits, plane.to(device), extra)


def penalty_and_grads(fn, lora_b, lora_a):
    b = lora_b.detach().clone().requires_grad_()
    a = lora_a.detach().clone().requires_grad_()
    value = fn(b, a)
    grad_b, grad_a = torch.autograd.grad(value, (b, a))
    return value.detach(), grad_b, grad_a


def reference_of(key_elements: KeyElements, lora_b, lora_a):
    return penalty_and_grads(
        lambda b, a: reglora_penalty(b.double(), a.double(), key_elements, "reference"),
        lora_b.cpu(),
        lora_a.cpu(),
    )


@pytest.mark.parametrize("bits", PLANE_BITS)
def test_plane_plus_extra_list_keeps_duplicates_exact(bits):
    # 1 bit: every position chosen twice is listed with count 1; trit: three times, with
    # count − 2; 4 bits: 20 tasks' worth of repeats push some counts above 15 into the list.
    k, d = 40, 70
    ke = key_elements_with_duplicates(k, d, tasks=3 if bits == 1 else 20, density=0.5, seed=bits)
    mask = mask_with_bits(ke, bits)
    assert mask.extra is not None and mask.extra.num_unique > 0
    lora_b, lora_a = factors(k, d, 7, seed=9)
    got = penalty_and_grads(lambda b, a: penalty_device_mask(b, a, mask), lora_b, lora_a)
    assert_matches(got, reference_of(ke, lora_b, lora_a))


@pytest.mark.parametrize("backend", ["triton", "triton_tile", "triton_gather"])
def test_reglora_penalty_gpu_backends_match_the_reference(backend):
    k, d = 45, 67
    ke = key_elements_with_duplicates(k, d, tasks=2, density=0.1, seed=11)
    lora_b, lora_a = factors(k, d, 5, seed=11)
    got = penalty_and_grads(lambda b, a: reglora_penalty(b, a, ke, backend), lora_b, lora_a)
    assert_matches(got, reference_of(ke, lora_b, lora_a))


def test_forced_representations_are_the_requested_ones():
    ke = key_elements_with_duplicates(20, 30, tasks=2, density=0.1, seed=12)
    assert build_device_mask(ke, kernel="tile").bits in PLANE_BITS
    assert build_device_mask(ke, kernel="gather").bits == 0


@pytest.mark.parametrize("bits", [0, *PLANE_BITS])
def test_mask_group_matches_the_reference_per_matrix(bits):
    # A (shape, bits) group with an empty matrix and lists on some matrices only.
    k, d, rank = 30, 50, 6
    kes = [key_elements_with_duplicates(k, d, 2, 0.2, seed=30 + m) for m in range(2)]
    kes.insert(1, KeyElements.from_linear(torch.tensor([3, 3, 70, 700]), (k, d)))
    group = build_device_mask_group(kes, bits, DEVICE)
    pairs = [factors(k, d, rank, seed=40 + m) for m in range(3)]
    bs = [b.clone().requires_grad_() for b, _ in pairs]
    as_ = [a.clone().requires_grad_() for _, a in pairs]
    values = penalty_mask_group(bs, as_, group)
    assert values.shape == (3,)
    upstream = torch.tensor([1.0, -2.0, 0.5], device=DEVICE)
    (values * upstream).sum().backward()
    for m in range(3):
        ref_value, ref_grad_b, ref_grad_a = reference_of(kes[m], *pairs[m])
        assert_close(values[m].detach(), ref_value, VALUE_REL, f"matrix {m} value")
        assert_close(bs[m].grad, upstream[m].item() * ref_grad_b, GRAD_REL, f"matrix {m} B")
        assert_close(as_[m].grad, upstream[m].item() * ref_grad_a, GRAD_REL, f"matrix {m} A")


def test_empty_device_mask_gives_zero_and_zero_gradients():
    lora_b, lora_a = factors(12, 20, 4, seed=50)
    mask = DeviceMask((12, 20), 0, 0, None, None)
    value, grad_b, grad_a = penalty_and_grads(
        lambda b, a: penalty_device_mask(b, a, mask), lora_b, lora_a
    )
    assert value.item() == 0.0
    assert torch.count_nonzero(grad_b).item() == 0 and torch.count_nonzero(grad_a).item() == 0


# --- CUDA: fp32 at every input precision and bf16 factors (skipped without a GPU) ---------

# (factor dtype, input precision, value tolerance, gradient tolerance): the contract of the
# module docstring; gradients compared as ‖g − g_ref‖_F / ‖g_ref‖_F because a sign that
# flips at an entry where |ΔW| is below the rounding error moves one row by 2·c/n.
CUDA_CONTRACT = [
    (torch.float32, "ieee", 1e-5, 1e-4),
    (torch.float32, "tf32x3", 1e-5, 1e-4),
    (torch.float32, "tf32", 2e-3, 1e-2),
    (torch.bfloat16, "tf32", 1e-3, 1e-2),
]


@pytest.mark.skipif(not CUDA, reason="needs a GPU (the interpreter runs fp32 'ieee' only)")
@pytest.mark.parametrize(("dtype", "precision", "value_tol", "grad_tol"), CUDA_CONTRACT)
@pytest.mark.parametrize(("k", "d", "rank"), [(520, 770, 128), (300, 200, 7), (257, 129, 130)])
@pytest.mark.parametrize("bits", PLANE_BITS)
def test_cuda_accuracy_contract(dtype, precision, value_tol, grad_tol, k, d, rank, bits):
    lora_b, lora_a = factors(k, d, rank, seed=rank, dtype=dtype)
    counts = random_counts(k, d, bits, 0.2, seed=bits)
    n_total = int(counts.sum())
    got = tile(lora_b, lora_a, counts, bits, n_total, input_precision=precision)
    ref = dense_reference(lora_b, lora_a, counts, n_total)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    assert abs(got[0].item() - ref[0].item()) <= value_tol * ref[0].item()
    for actual, expected, what in ((got[1], ref[1], "grad B"), (got[2], ref[2], "grad A")):
        error = torch.linalg.norm(actual.double().cpu() - expected) / torch.linalg.norm(expected)
        assert error.item() <= grad_tol, f"{what}: relative Frobenius error {error.item():.2e}"
    again = tile(lora_b, lora_a, counts, bits, n_total, input_precision=precision)
    for x, y in zip(got, again):
        assert torch.equal(x, y), "not bitwise deterministic on the GPU"
