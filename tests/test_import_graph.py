"""Imports run one way: no cycle among the project's modules, counting imports inside functions.

Every module of `sefe_fast`, `sefe_fast_kernels` (the folder `kernels/`) and the benchmark
suite `bench/` is parsed with `ast`; an import anywhere in it (module level, or inside a
function or method) is an arrow to the module it names, and so is
`importlib.import_module(NAME)` with NAME a string literal or a module-level string constant.
Importing `a.b.c` from outside package `a.b` also runs `a/__init__.py` and `a/b/__init__.py`,
so it is an arrow to those packages too (a package whose `__init__` imports its modules is
in a cycle with anything those modules import that imports the package back).
A first-party import inside a function is allowed only where it must wait (an optional
dependency, or discovery at run time), listed below with the reason.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Import name → folder (the kernels are installed under another name: see pyproject.toml).
PACKAGES = {
    "sefe_fast": ROOT / "sefe_fast",
    "sefe_fast_kernels": ROOT / "kernels",
    "bench": ROOT / "bench",
}

# (module, function) → why its first-party import must wait until the function runs.
DEFERRED_IMPORTS_ALLOWED = {
    ("sefe_fast.reglora.selection", "_select_triton"): (
        "Triton is optional (CUDA machines only): the selection kernels are imported on "
        "first use of backend='triton'"
    ),
    ("sefe_fast.reglora.penalty", "_group_of_one"): (
        "Triton is optional: the gather kernels' grouped plan, through load_triton_module"
    ),
    ("sefe_fast.reglora.penalty", "penalty_mask_group"): (
        "Triton is optional: the tile and gather kernels, through load_triton_module"
    ),
    ("sefe_fast.reglora.device_mask", "build_device_mask_group"): (
        "Triton is optional: the gather kernels' grouped plan for a GPU group's extra lists"
    ),
    ("sefe_fast.roofline", "tile_blocks"): (
        "Triton is optional: the model reads the tile kernels' configured block sizes"
    ),
    ("sefe_fast.kernel_report", "discover_kernel_modules"): (
        "discovery: the compile report walks the kernel package when it runs, so a new "
        "kernel module needs no edit there"
    ),
}


def project_modules() -> dict[str, Path]:
    """Module name → file, for every .py file of the project's packages."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _string_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level `NAME = "text"` assignments."""
    out = {}
    for node in tree.body:
        is_text = isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        if is_text and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value.value
    return out


def _imported_names(node: ast.AST, module: str, is_package: bool, constants: dict[str, str]):
    """The dotted names one AST node imports (with `from X import Y`: X.Y and X)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        return [base, *(f"{base}.{alias.name}" for alias in node.names)]
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        # importlib.import_module, or the kernels' loader (sefe_fast.reglora.penalty)
        if name in ("import_module", "load_triton_module"):
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                return [arg.value]
            if isinstance(arg, ast.Name) and arg.id in constants:
                return [constants[arg.id]]
    return []


def _inside(module: str, package: str) -> bool:
    """Whether `module` is `package` or one of its (sub)modules."""
    return module == package or module.startswith(package + ".")


def _functions_and_imports(tree: ast.Module) -> Iterator[tuple[str | None, ast.AST]]:
    """(enclosing function name or None at module level, node) for every node."""

    def walk(node: ast.AST, function: str | None) -> Iterator[tuple[str | None, ast.AST]]:
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = child.name
            yield inner, child
            yield from walk(child, inner)

    yield from walk(tree, None)


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(module → project modules it imports, [(module, function, target)] deferred imports)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    deferred = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        constants = _string_constants(tree)
        is_package = path.name == "__init__.py"
        for function, node in _functions_and_imports(tree):
            for name in _imported_names(node, module, is_package, constants):
                if name not in modules or name == module:
                    continue
                graph[module].add(name)
                if function is not None:
                    deferred.append((module, function, name))
                parts = name.split(".")
                for end in range(1, len(parts)):
                    package = ".".join(parts[:end])
                    if package in modules and not _inside(module, package):
                        graph[module].add(package)
    return graph, deferred


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_project():
    graph, _ = import_graph()
    assert "sefe_fast.train.continual" in graph and "sefe_fast_kernels.reglora_penalty" in graph
    assert "sefe_fast.train.config" in graph["sefe_fast.train.continual"]
    # the by-name import of the Triton kernels is an arrow too
    assert "sefe_fast_kernels.reglora_penalty" in graph["sefe_fast.reglora.penalty"]


def test_importing_a_module_imports_its_packages():
    graph, _ = import_graph()
    assert "sefe_fast.reglora" in graph["sefe_fast.methods.reglora_method"]
    # a module inside the package does not import the package by importing a sibling
    assert "sefe_fast.train" not in graph["sefe_fast.train.continual"]


def test_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph, _ = import_graph()
    found = cycles(graph)
    assert not found, "import cycles (each line: modules that import each other):\n" + "\n".join(
        " <-> ".join(component) for component in found
    )


def test_no_first_party_imports_inside_functions_without_a_reason():
    _, deferred = import_graph()
    unexplained = sorted(
        f"{module}.{function} imports {target}"
        for module, function, target in deferred
        if (module, function) not in DEFERRED_IMPORTS_ALLOWED
    )
    assert not unexplained, (
        "first-party imports inside functions (move them to the top of the module, or add "
        "the function with its reason to DEFERRED_IMPORTS_ALLOWED):\n" + "\n".join(unexplained)
    )
    used = {(module, function) for module, function, _ in deferred}
    assert set(DEFERRED_IMPORTS_ALLOWED) <= used, "stale entries in DEFERRED_IMPORTS_ALLOWED"
