"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90 (no GPU needed)."""

import json
import os
import subprocess
import sys

import pytest

from sefe_fast import kernel_report
from sefe_fast_kernels import reglora_penalty, reglora_tile

SELECTION_KERNELS = {"_radix_histogram_kernel", "_tile_count_kernel", "_compact_kernel"}
CONFIG_COUNTS = {
    "_reglora_fwd_kernel": len(reglora_penalty.FWD_CONFIGS_CUDA),
    "_reglora_grad_b_kernel": len(reglora_penalty.GRAD_B_CONFIGS_CUDA),
    "_reglora_grad_a_kernel": len(reglora_penalty.GRAD_A_CONFIGS_CUDA),
    # one config; the histogram is reported at its 11-bit and its 10-bit level
    "_radix_histogram_kernel": 2,
    "_tile_count_kernel": 1,
    "_compact_kernel": 1,
    "_tile_fwd_kernel": len(reglora_tile.FWD_CONFIGS_CUDA),
    "_tile_fwd_grad_b_kernel": len(reglora_tile.ROW_OWNER_CONFIGS_CUDA),
    "_tile_grad_a_kernel": len(reglora_tile.COL_OWNER_CONFIGS_CUDA),
}
KERNELS = set(CONFIG_COUNTS)
TILE_KERNELS = {"_tile_fwd_kernel", "_tile_fwd_grad_b_kernel", "_tile_grad_a_kernel"}
# Shared memory one program may use on an A100 (opt-in maximum per block, bytes); the
# H100 allows 227 KB.
A100_MAX_SHARED = 163 * 1024


@pytest.fixture(scope="module")
def report() -> list[kernel_report.KernelResource]:
    return kernel_report.build_report()


def test_every_kernel_compiles_for_both_archs_with_every_config(report):
    assert {r.kernel for r in report} == KERNELS
    for kernel, count in CONFIG_COUNTS.items():
        for arch in ("sm_80", "sm_90"):
            rows = [r for r in report if r.kernel == kernel and r.arch == arch]
            assert len(rows) == count, f"{kernel} {arch}: {len(rows)} variants, expected {count}"


def test_no_kernel_spills_and_register_counts_are_sane(report):
    for r in report:
        assert r.spill_bytes == 0, f"{r.kernel} {r.arch} {r.config} spills {r.spill_bytes} bytes"
        assert r.stack_bytes == 0, f"{r.kernel} {r.arch} {r.config} uses a stack frame"
        if r.kernel in SELECTION_KERNELS:
            # A 64×64 fp32 ΔW tile per program: more registers (≥ 3 programs of 4 warps
            # per SM still fit) and the tl.dot operand tiles staged in shared memory.
            assert 16 <= r.registers <= 168, f"{r.kernel} {r.arch}: {r.registers} regs"
            assert 0 <= r.shared_bytes <= 48 * 1024, f"{r.kernel} {r.arch}: {r.shared_bytes} B"
            continue
        if r.kernel in TILE_KERNELS:
            # Tensor-core tiles: accumulators in registers, pipelined operand tiles in
            # shared memory, which must fit an A100.
            assert 16 <= r.registers <= 255, f"{r.kernel} {r.arch} {r.config}: {r.registers}"
            assert r.shared_bytes <= A100_MAX_SHARED, f"{r.kernel} {r.arch} {r.config}"
            assert r.uses_wgmma == (r.arch == "sm_90"), f"{r.kernel} {r.arch}: wgmma"
            continue
        assert 16 <= r.registers <= 128, f"{r.kernel} {r.arch} {r.config}: {r.registers} regs"
        # Only reduction scratch: a few KB, far below the 48 KB static limit.
        assert 0 <= r.shared_bytes <= 8192, f"{r.kernel} {r.arch}: {r.shared_bytes} B shared"


def test_report_cross_checks_ptxas_rerun_against_tritons_cubin():
    # compile_kernel raises when the ptxas -v re-run and triton's own cubin disagree on
    # registers; a report that completed therefore carries the cubin's register counts.
    # Here the check itself is exercised on a cubin of a different kernel variant.
    code = (
        "from sefe_fast import kernel_report as kr\n"
        "from sefe_fast_kernels import reglora_penalty as rp\n"
        "launch = rp.aot_launches()[0]\n"
        "fn = kr._jit_function(launch.kernel)\n"
        "small, big = launch.configs[0], launch.configs[-1]\n"
        "r_small, c_small = kr.compile_kernel(fn, launch.args, {**launch.constexprs, **small[0]}, small[1], 90)\n"
        "r_big, c_big = kr.compile_kernel(fn, launch.args, {**launch.constexprs, **big[0]}, big[1], 90)\n"
        "print(r_small.registers, kr._cubin_registers(c_small.asm['cubin'], 90))\n"
        "print(r_big.registers, kr._cubin_registers(c_big.asm['cubin'], 90))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    (small_rerun, small_cubin), (big_rerun, big_cubin) = (
        tuple(int(x) for x in line.split()) for line in result.stdout.split("\n")[:2]
    )
    assert small_rerun == small_cubin and big_rerun == big_cubin
    assert small_cubin != big_cubin, "the two variants should differ, or the check is vacuous"


@pytest.mark.parametrize(("dtype", "archs"), [("fp16", (90,)), ("fp32", (80, 90))])
def test_kernels_also_compile_for_fp16_and_fp32_factors(dtype, archs):
    # fp32 on both archs: PEFT keeps LoRA factors in fp32 under bf16 autocast, so that is
    # what training launches.
    for r in kernel_report.build_report(archs=archs, dtype=dtype):
        assert r.spill_bytes == 0, f"{r.kernel} {dtype} {r.config} spills"


@pytest.mark.parametrize("bits", [2, 3])
def test_two_bit_and_trit_tile_configs_compile_without_spills_fp32_and_bf16(bits):
    # The report compiles the 4-bit decode; the 2-bit one (E = 16 counts per word) and the
    # trit plane's (a word load per count, base-3 digits) must also compile for both archs
    # and both factor dtypes, every config the launcher may pick, with 0 spills.
    code = (
        "import json, sys, torch\n"
        "from sefe_fast import kernel_report as kr\n"
        "from sefe_fast_kernels import reglora_tile as rt\n"
        "rows, expected = [], 0\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        f"    for launch in rt.aot_launches(dtype=dtype, bits={bits}):\n"
        "        fn = kr._jit_function(launch.kernel)\n"
        "        for kwargs, warps, stages in launch.configs:\n"
        "            for arch in (80, 90):\n"
        "                expected += 1\n"
        "                r, _ = kr.compile_kernel(fn, launch.args,"
        " {**launch.constexprs, **kwargs}, warps, arch, stages)\n"
        "                rows.append([r.kernel, r.arch, str(dtype), launch.constexprs['BITS'],"
        " r.spill_bytes, r.stack_bytes, r.shared_bytes])\n"
        "print(json.dumps([expected, rows]))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr
    expected, rows = json.loads(result.stdout.strip().splitlines()[-1])
    # dtypes × archs × configs, minus the row-owner config the trit plane prunes for fp32
    pruned = 2 if bits == 3 else 0
    assert expected == 2 * 2 * sum(CONFIG_COUNTS[k] for k in TILE_KERNELS) - pruned
    assert len(rows) == expected
    for kernel, arch, dtype, row_bits, spills, stack, shared in rows:
        assert row_bits == bits
        assert spills == 0 and stack == 0, f"{kernel} {arch} {dtype}: spills {spills}"
        assert shared <= A100_MAX_SHARED, f"{kernel} {arch} {dtype}: {shared} B shared"


def test_a_kernel_missing_from_aot_launches_is_reported(monkeypatch):
    original = reglora_penalty.aot_launches
    monkeypatch.setattr(reglora_penalty, "aot_launches", lambda **kw: original(**kw)[:2])
    with pytest.raises(ValueError, match="_reglora_grad_a_kernel has no entry"):
        kernel_report.collect_launches()


def test_jit_helpers_need_no_entry_but_uncalled_kernels_do(monkeypatch):
    # The tile kernels share @triton.jit helpers (_delta_tile, _decode_counts, ...) that are
    # compiled into them; dropping a kernel must still be reported, helpers or not.
    launches = kernel_report.collect_launches()
    names = {kernel_report._python_function(launch.kernel).__name__ for launch in launches}
    assert names >= TILE_KERNELS
    original = reglora_tile.aot_launches
    monkeypatch.setattr(reglora_tile, "aot_launches", lambda **kw: original(**kw)[1:])
    with pytest.raises(ValueError, match="_tile_fwd_kernel has no entry"):
        kernel_report.collect_launches()


def test_cli_json_lists_every_variant_and_exits_zero():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "sefe_fast.kernel_report", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 2 * sum(CONFIG_COUNTS.values())
    for row in rows:
        assert {"kernel", "arch", "registers", "spill_bytes", "shared_bytes"} <= set(row)
        assert row["arch"] in ("sm_80", "sm_90")
