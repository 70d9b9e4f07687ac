"""The package's layout rules, read from its source: no import circles, and no torch where
the registry, the hub or a method's schema could pull it in.

The import graph is built from the AST of every module (found with `pkgutil`, without
importing it), with `from a import b` resolved to the submodule `a.b` when there is one, and
imports under `if TYPE_CHECKING:` left out (they never run). Two graphs: module-level
imports only (a circle there breaks an import order), and every import including those
deferred into functions (a circle there is two modules that depend on each other, which
a deferred import only hides; the circles of issue 13 were all of this kind). A subprocess
then checks the torch rule for real, third-party imports included.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import deltahub

ROOT = Path(deltahub.__file__).parent
# Third-party modules that import torch when imported.
TORCH = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors.torch")


def package_modules(root: Path = ROOT, package: str = "deltahub") -> dict[str, Path]:
    """Every module of the package, by dotted name, with its source file."""
    found = {package: root / "__init__.py"}

    def walk(path: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(path)]):
            name = prefix + info.name
            if info.ispkg:
                found[name] = path / info.name / "__init__.py"
                walk(path / info.name, name + ".")
            else:
                found[name] = path / f"{info.name}.py"

    walk(root, package + ".")
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(tree: ast.Module, deferred: bool) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported, and with `deferred` those inside
    functions too; never those under TYPE_CHECKING."""
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if deferred:
                    visit(node.body)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)
            elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                visit(node.body)
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
                visit(node.body)
                visit(node.orelse)

    visit(tree.body)
    return out


def import_graph(
    deferred: bool = False, root: Path = ROOT, package: str = "deltahub"
) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between the package's modules, third-party modules each one imports)."""
    modules = package_modules(root, package)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    external: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in imports_of(tree, deferred):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    parts = name.split(".") if is_pkg else name.split(".")[:-1]
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in targets:
                if target in modules:
                    edges[name].add(target)
                elif target == package or target.startswith(package + "."):
                    raise AssertionError(f"{name} imports {target}, which does not exist")
                else:
                    external[name].add(target)
    return edges, external


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a -> ... -> a) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan; the graph is small, recursion is fine
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    cycles = []
    for component in components:
        start = min(component)
        path, seen = [start], {start}
        while True:  # walk inside the component until a module repeats
            nxt = min(w for w in edges[path[-1]] if w in component)
            if nxt in seen:
                cycles.append([*path[path.index(nxt) :], nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return cycles


def reaches(edges: dict[str, set[str]], external: dict[str, set[str]], start: str) -> list[str] | None:
    """An import chain from `start` to a torch-importing module, or None. Importing a module
    also runs its parent packages' `__init__`, so those count as imported too."""
    parents = {m: {".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)} for m in edges}
    trail: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        m = queue.pop(0)
        bad = sorted(x for x in external[m] if x in TORCH or x.split(".")[0] in TORCH)
        if bad:
            chain = [bad[0]]
            node: str | None = m
            while node is not None:
                chain.append(node)
                node = trail[node]
            return chain[::-1]
        for w in sorted(edges[m] | parents[m]):
            if w not in trail:
                trail[w] = m
                queue.append(w)
    return None


def torch_free_modules(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        m
        for m in edges
        if m in ("deltahub.registry", "deltahub.hub")
        or m.startswith(("deltahub.registry.", "deltahub.hub."))
        or (m.startswith("deltahub.methods.") and m.endswith(".schema"))
        # the registry and every folder's registration line, which lookups import
        or m in ("deltahub.methods", "deltahub.methods.registry", "deltahub.methods.checks")
        or (m.startswith("deltahub.methods.") and m.count(".") == 2 and m + ".schema" in edges)
    )


def test_the_graph_sees_the_package(tmp_path: Path) -> None:
    edges, external = import_graph()
    # A walker that found nothing would pass everything: check it sees known facts.
    assert "deltahub.methods.lora.schema" in edges
    assert "deltahub.methods.registry" in edges["deltahub.artifact"]
    assert "torch" in external["deltahub.methods.lora.runtime"]
    assert len(torch_free_modules(edges)) >= 10
    # The circle issue 13 removed, rebuilt in a scratch package: a deferred import hides it
    # from the module-level graph, not from the full one; relative imports resolve.
    pkg = tmp_path / "scratch"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "artifact.py").write_text("def validate():\n    from scratch import schemas\n")
    (pkg / "schemas.py").write_text("from .artifact import validate\nimport torch.nn\n")
    (pkg / "sub" / "leaf.py").write_text("from .. import schemas\n")
    shallow, ext = import_graph(root=pkg, package="scratch")
    deep, _ = import_graph(deferred=True, root=pkg, package="scratch")
    assert find_cycles(shallow) == []
    assert find_cycles(deep) == [["scratch.artifact", "scratch.schemas", "scratch.artifact"]]
    assert reaches(shallow, ext, "scratch.sub.leaf") == ["scratch.sub.leaf", "scratch.schemas", "torch.nn"]


# Known circles through deferred imports, listed module by module so that any other circle,
# or one of these growing, still fails; delete an entry when its circle is gone (the test
# says so). The AdapterHub interop's two (8c79bbb, 59cba63) are gone.
KNOWN_DEFERRED: list[frozenset[str]] = []


def strongly_connected(edges: dict[str, set[str]], cycle: list[str]) -> frozenset[str]:
    """Every module on some circle through `cycle`'s first module."""

    def reach(start: str, graph: dict[str, set[str]]) -> set[str]:
        seen, stack = {start}, [start]
        while stack:
            for w in graph[stack.pop()]:
                if w not in seen:
                    seen.add(w)
                    stack.append(w)
        return seen

    reverse: dict[str, set[str]] = {m: set() for m in edges}
    for m, targets in edges.items():
        for t in targets:
            reverse[t].add(m)
    return frozenset(reach(cycle[0], edges) & reach(cycle[0], reverse))


@pytest.mark.parametrize("deferred", [False, True], ids=["module-level", "with-deferred"])
def test_no_import_cycles(deferred: bool) -> None:
    edges, _ = import_graph(deferred=deferred)
    cycles = find_cycles(edges)
    known = KNOWN_DEFERRED if deferred else []
    new = [c for c in cycles if strongly_connected(edges, c) not in known]
    assert not new, "import circles:\n" + "\n".join(" -> ".join(c) for c in new)
    gone = set(known) - {strongly_connected(edges, c) for c in cycles}
    assert not gone, f"these circles are gone: delete them from KNOWN_DEFERRED: {sorted(map(sorted, gone))}"


def test_registry_hub_and_schemas_do_not_import_torch() -> None:
    edges, external = import_graph()
    chains = {m: reaches(edges, external, m) for m in torch_free_modules(edges)}
    bad = {m: " -> ".join(c) for m, c in chains.items() if c}
    assert not bad, "torch reached at import time:\n" + "\n".join(bad.values())


def test_torch_free_parts_import_without_torch() -> None:
    """The same rule at run time, third-party imports included."""
    edges, _ = import_graph()
    modules = [*torch_free_modules(edges), "deltahub.artifact", "deltahub.methods"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "from deltahub.methods import get_schema, schema_methods\n"
        "for m in schema_methods():\n"
        "    get_schema(m)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft'))\n"
        "assert not heavy, heavy[:5]\n"
        "print(len(schema_methods()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) >= 8  # every built-in method's schema was imported
