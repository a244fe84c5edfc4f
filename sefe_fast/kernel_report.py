"""Ahead-of-time compile report for every Triton kernel in `sefe_fast_kernels`.

Compiles each kernel, for each CUDA autotune config it may run with, for sm_80 (A100) and
sm_90 (H100) — no GPU needed — and reports registers per thread, spill bytes and shared
memory. Registers and spills come from re-running the ptxas bundled with triton, with
`-v` and the flags triton itself uses, on the PTX triton produced; shared memory comes
from triton's compile metadata.

    python -m sefe_fast.kernel_report [--json]
    python -m sefe_fast.kernel_report --roofline     (the model of sefe_fast/roofline.py)

Exit status: 0 when everything compiled without spills, 1 when a kernel failed to
compile, 2 when a kernel spills or a kernel module lists no representative launch.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from sefe_fast import roofline

ARCHS = (80, 90)
KERNEL_PACKAGE = "sefe_fast_kernels"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class KernelResource:
    """Resources of one compiled kernel variant (per thread / per program)."""

    kernel: str
    arch: str  # "sm_80" / "sm_90"
    config: str  # constexprs and num_warps, e.g. "BLOCK_U=32,BLOCK_R=128,num_warps=4"
    registers: int  # 32-bit registers per thread
    spill_bytes: int  # spill stores + spill loads, bytes per thread
    stack_bytes: int  # stack frame, bytes per thread
    shared_bytes: int  # shared memory per program (bytes)
    uses_wgmma: bool  # Hopper warp-group MMA in the PTX


class KernelCompileError(RuntimeError):
    """A kernel failed to compile for a target."""


def _python_function(kernel: object):
    """The undecorated Python function of a (possibly autotuned / interpreted) kernel."""
    inner = kernel
    while isinstance(inner, Autotuner):
        inner = inner.fn
    python_fn = getattr(inner, "fn", None)  # JITFunction and InterpretedFunction both
    if python_fn is None:
        raise TypeError(f"{kernel!r} is not a Triton kernel")
    return python_fn


def _jit_function(kernel: object) -> JITFunction:
    """The JITFunction under an autotuned kernel (only outside the interpreter)."""
    inner = kernel
    while isinstance(inner, Autotuner):
        inner = inner.fn
    if not isinstance(inner, JITFunction):
        raise TypeError(f"{kernel!r} is not a compiled-mode Triton kernel (TRITON_INTERPRET set?)")
    return inner


def _is_kernel(obj: object) -> bool:
    if isinstance(obj, Autotuner | JITFunction):
        return True
    return type(obj).__name__ == "InterpretedFunction"


def _own_kernels(module) -> dict[str, object]:
    """The Triton kernels and `@triton.jit` helpers defined (not merely imported) in
    `module`, by name (helpers are compiled into the kernels that call them)."""
    return {
        name: obj
        for name, obj in vars(module).items()
        if _is_kernel(obj) and _python_function(obj).__module__ == module.__name__
    }


def discover_kernel_modules() -> dict[str, object]:
    """Every module of `sefe_fast_kernels` that defines at least one Triton kernel."""
    # Found by walking the package at run time, so a new kernel file needs no edit here.
    package = importlib.import_module(KERNEL_PACKAGE)
    modules = {}
    for info in pkgutil.iter_modules(package.__path__, prefix=f"{KERNEL_PACKAGE}."):
        module = importlib.import_module(info.name)
        if _own_kernels(module):
            modules[info.name] = module
    return modules


def _signature(fn: JITFunction, args: dict[str, object], constexprs: dict[str, object]):
    """Signature, constexprs and attributes exactly as the JIT would derive them from args."""
    signature: dict[str, str] = {}
    constants: dict[str, object] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            constants[name] = constexprs[name]
            continue
        if name not in args:
            raise KeyError(f"{fn.__name__}: no representative value for argument {name!r}")
        param = fn.params[index]
        kind, spec = native_specialize_impl(
            BaseBackend,
            args[name],
            False,
            not param.do_not_specialize,
            not param.do_not_specialize_on_alignment,
        )
        if kind == "constexpr":  # ints equal to 1 are specialised by the JIT
            signature[name] = "constexpr"
            constants[name] = spec
        else:
            signature[name] = kind
            if spec:
                attrs[(index,)] = BaseBackend.parse_attr(spec)
    return signature, constants, attrs


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)


def _ptxas_resources(ptx: str, arch: int, enable_fp_fusion: bool) -> tuple[int, int, int]:
    """(registers, spill bytes, stack bytes) from `ptxas -v` with triton's own flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        command = [
            ptxas,
            "-lineinfo",
            *([] if enable_fp_fusion else ["--fmad=false"]),
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}",
            str(source),
            "-o",
            str(Path(tmp) / "kernel.cubin"),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    log = result.stdout + result.stderr
    regs, spill = _PTXAS_REGS.search(log), _PTXAS_SPILL.search(log)
    if result.returncode != 0 or regs is None or spill is None:
        raise KernelCompileError(f"ptxas -v failed for sm_{arch}:\n{log}")
    stack, stores, loads = (int(x) for x in spill.groups())
    return int(regs.group(1)), stores + loads, stack


def compile_kernel(
    fn: JITFunction,
    args: dict[str, object],
    constexprs: dict[str, object],
    num_warps: int,
    arch: int,
    num_stages: int | None = None,
) -> tuple[KernelResource, object]:
    """Compile one kernel variant for `sm_{arch}`; return its resources and triton's result.

    Needs a process where TRITON_INTERPRET is unset (the interpreter patches triton.language
    process-wide); `build_report` takes care of that.
    """
    if triton.knobs.runtime.interpret:
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset in this process")
    signature, constants, attrs = _signature(fn, args, constexprs)
    # FP fusion on: the triton 3.9 default a JIT launch uses.
    options = {"num_warps": num_warps, "enable_fp_fusion": True}
    if num_stages is not None:  # software-pipelining depth of a kernel's loops
        options["num_stages"] = num_stages
    try:
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
            target=GPUTarget("cuda", arch, 32),
            options=options,
        )
    except Exception as error:  # report which kernel/arch/config, then propagate
        raise KernelCompileError(
            f"{fn.__name__} failed to compile for sm_{arch} with {constexprs}, "
            f"num_warps={num_warps}: {error}"
        ) from error
    ptx = compiled.asm["ptx"]
    registers, spill_bytes, stack_bytes = _ptxas_resources(ptx, arch, True)
    cubin_registers = _cubin_registers(compiled.asm["cubin"], arch)
    if cubin_registers != registers:
        raise KernelCompileError(
            f"{fn.__name__} sm_{arch}: ptxas -v re-run reports {registers} registers but "
            f"triton's cubin uses {cubin_registers}: the re-run's flags no longer match triton's"
        )
    config = ",".join(f"{k}={v}" for k, v in constexprs.items()) + f",num_warps={num_warps}"
    if num_stages is not None:
        config += f",num_stages={num_stages}"
    resource = KernelResource(
        kernel=fn.__name__,
        arch=f"sm_{arch}",
        config=config,
        registers=registers,
        spill_bytes=spill_bytes,
        stack_bytes=stack_bytes,
        shared_bytes=int(compiled.metadata.shared),
        uses_wgmma="wgmma" in ptx,
    )
    return resource, compiled


def _cubin_registers(cubin: bytes, arch: int) -> int:
    """Registers per thread recorded in a cubin (cuobjdump --dump-resource-usage)."""
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = Path(get_ptxas(arch).path).parent / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        result = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
    match = re.search(r"REG:(\d+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise KernelCompileError(f"cuobjdump failed on the sm_{arch} cubin:\n{result.stderr}")
    return int(match.group(1))


def collect_launches(dtype: str = "bf16") -> list:
    """The representative launches of every kernel module (each module's `aot_launches()`).

    Raises ValueError when a module defines a kernel that its `aot_launches()` omits, so a
    new kernel cannot silently escape the report. A `@triton.jit` helper that a covered
    kernel calls (directly or through other helpers) is compiled into it and needs no entry.
    """
    import torch

    torch_dtype = getattr(torch, DTYPES[dtype])
    launches = []
    for module_name, module in discover_kernel_modules().items():
        launches_fn = getattr(module, "aot_launches", None)
        if launches_fn is None:
            raise ValueError(f"{module_name} defines Triton kernels but no aot_launches()")
        module_launches = launches_fn(dtype=torch_dtype)
        covered = {_python_function(launch.kernel) for launch in module_launches}
        own = _own_kernels(module)
        covered |= _called_helpers(own, covered)
        for name, obj in own.items():
            if _python_function(obj) not in covered:
                raise ValueError(f"{module_name}.{name} has no entry in aot_launches()")
        launches.extend(module_launches)
    return launches


def _called_helpers(own: dict[str, object], covered: set) -> set:
    """Python functions of the module's JIT functions reachable by calls from `covered`."""
    reached: set = set()
    sources = [inspect.getsource(fn) for fn in covered]
    while sources:
        source = sources.pop()
        for name, obj in own.items():
            fn = _python_function(obj)
            if fn not in covered and fn not in reached and re.search(rf"\b{name}\(", source):
                reached.add(fn)
                sources.append(inspect.getsource(fn))
    return reached


def build_report(archs: tuple[int, ...] = ARCHS, dtype: str = "bf16") -> list[KernelResource]:
    """Compile every kernel of every kernel module, every CUDA config, for every arch.

    dtype: the LoRA factors' dtype ("bf16", "fp16", "fp32"). Raises KernelCompileError when
    a kernel fails to compile, ValueError when a kernel module's `aot_launches()` does not
    cover one of its kernels. Under TRITON_INTERPRET=1 (which patches triton.language
    process-wide) the compilation runs in a child process without it.
    """
    launches = collect_launches(dtype)
    if triton.knobs.runtime.interpret:
        return _build_report_in_subprocess(archs, dtype)
    results: list[KernelResource] = []
    for launch in launches:
        fn = _jit_function(launch.kernel)
        # A config is (constexpr kwargs, num_warps) or (constexpr kwargs, num_warps, num_stages).
        for kwargs, num_warps, *stages in launch.configs:
            constexprs = {**launch.constexprs, **kwargs}
            num_stages = stages[0] if stages else None
            for arch in archs:
                resource, _ = compile_kernel(
                    fn, launch.args, constexprs, num_warps, arch, num_stages
                )
                results.append(resource)
    return results


def _build_report_in_subprocess(archs: tuple[int, ...], dtype: str) -> list[KernelResource]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "sefe_fast.kernel_report", "--json", "--dtype", dtype]
    command += ["--arch", *(str(a) for a in archs)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode == 1:
        raise KernelCompileError(result.stderr)
    try:
        rows = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise ValueError(f"kernel report subprocess failed:\n{result.stderr}") from None
    return [KernelResource(**row) for row in rows]


def format_table(results: list[KernelResource]) -> str:
    """A markdown table of the report."""
    lines = [
        "| kernel | arch | config | registers | spill bytes | stack bytes | shared bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.kernel} | {r.arch} | {r.config} | {r.registers} | {r.spill_bytes} "
            f"| {r.stack_bytes} | {r.shared_bytes} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list of results")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="factor dtype")
    parser.add_argument(
        "--roofline",
        action="store_true",
        help="print the modelled roofline at LLaVA-7B shapes (sefe_fast.roofline; no compilation)",
    )
    parser.add_argument(
        "--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities"
    )
    args = parser.parse_args(argv)
    if args.roofline:  # the model lives in sefe_fast.roofline; shown for both factor dtypes
        print(roofline.report("fp32"))
        print()
        print(roofline.format_summary(roofline.summary(roofline.FACTOR_DTYPES["bf16"]), "bf16"))
        return 0
    try:
        results = build_report(tuple(args.arch), args.dtype)
    except KernelCompileError as error:
        print(f"compile failed: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"incomplete kernel registry: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(format_table(results))
    spilling = [r for r in results if r.spill_bytes > 0]
    for r in spilling:
        print(f"SPILL: {r.kernel} {r.arch} {r.config}: {r.spill_bytes} bytes", file=sys.stderr)
    return 2 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
