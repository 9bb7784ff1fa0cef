"""Every import points down (shared/DESIGN.md "Layout and layers"), checked over the source
with `ast`: every import statement counts, at any depth (a lazy import inside a function, a
type-only one), since each is a dependency a reader must follow.

    top      gateway/ outside gateway/core
    middle   policies/, backends/
    bottom   gateway/core/ (imports nothing of the project)

And no module imports itself back through any chain of imports (no cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "policies", "backends")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports (`from a.b import c` counts a.b.c when that is a
    module, else a.b; relative imports are resolved against `name`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def floor(module: str) -> int:
    if module.startswith("gateway.core") or module == "gateway":
        return 0
    if module.startswith(("policies", "backends")):
        return 1
    return 2


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(path, name, known) for name, path in modules.items()}


def test_every_import_points_down() -> None:
    wrong = sorted(f"{a} -> {b}" for a, deps in graph().items() for b in deps
                   if floor(b) > floor(a))
    assert not wrong, "imports that point up a floor:\n" + "\n".join(wrong)


def test_the_core_imports_nothing_above_it() -> None:
    deps = {a: {b for b in bs if not b.startswith("gateway.core")}
            for a, bs in graph().items() if a.startswith("gateway.core")}
    assert not any(deps.values()), deps


def test_policies_and_backends_import_only_the_core_of_gateway() -> None:
    wrong = sorted(f"{a} -> {b}" for a, deps in graph().items() for b in deps
                   if a.startswith(("policies", "backends")) and b.startswith("gateway")
                   and not b.startswith("gateway.core"))
    assert not wrong, wrong


def test_no_import_cycles() -> None:
    g = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_what_they_should() -> None:
    """The parser finds real edges (a test that cannot fail is a defect)."""
    g = graph()
    assert "gateway.core.context" in g["policies.admission"]
    assert "policies.registry" in g["gateway.settings"]
    assert "backends.upstream_http" in g["backends.openai"]
    assert floor("gateway.handler") == 2 and floor("backends.openai") == 1


def test_only_the_local_kind_and_the_top_import_the_engine() -> None:
    """backends/local is one backend kind: other kinds share what they need with it through
    backends/hf (the checkpoint read without torch), and policies through the core."""
    wrong = sorted(f"{a} -> {b}" for a, deps in graph().items() for b in deps
                   if b.startswith("backends.local") and not a.startswith("backends.local")
                   and floor(a) != 2)
    assert not wrong, wrong
    assert "backends.hf.config" in graph()["backends.vllm"]


def test_benchmarks_do_not_import_the_tests() -> None:
    """bench/ runs on a checkout without the test suite's helpers; what both need (starting a
    gateway process) lives in gateway/launch.py."""
    wrong = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            wrong += [f"{path.relative_to(ROOT)} -> {n}" for n in names
                      if n == "tests" or n.startswith("tests.")]
    assert not wrong, "bench/ imports tests/:\n" + "\n".join(wrong)


def test_the_http_layer_knows_the_handler_only_by_its_contract() -> None:
    """gateway/http/ imports gateway/http/contract.py (Incoming, ResponseWriter, Handler), never
    gateway/handler.py: the handler is handed to it when the app is built."""
    wrong = sorted(f"{a} -> {b}" for a, deps in graph().items() if a.startswith("gateway.http")
                   for b in deps if b == "gateway.handler")
    assert not wrong, wrong
