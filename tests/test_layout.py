"""The layout by role stays the layout: small modules, no import cycles, the same public API,
a top level that holds only the entry points and the public modules (see ARCHITECTURE.md).

Import edges are read from the source with `ast`, never by importing it. What counts as an
edge (chosen so that a cycle found here is one a reader has to untangle):

* every `import` and `from ... import` anywhere in a module, at module level and inside
  functions alike: flame imports lazily to keep start-up cheap, not to hide a cycle, and a
  function-level cycle still means neither module can be read or moved without the other;
* except imports under `if TYPE_CHECKING:`, which never run;
* `from pkg import name` is an edge to the module `pkg.name` when there is one, else to
  `pkg` (its `__init__`); importing a module also imports its parent packages, so those are
  edges too, except the packages the importing module is itself inside (already loading).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import flame

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "flame"
MAX_LINES = 500

# `flame.__all__` on the day the code moved into folders by role; the move kept it as it was.
PUBLIC_API = {
    "AnalysisError",
    "AnalysisLoadError",
    "ConfigError",
    "Context",
    "Data",
    "DataError",
    "EpochRecord",
    "Event",
    "FlameConfig",
    "FlameError",
    "MessageError",
    "NodePolicy",
    "PolicyRefused",
    "Received",
    "Results",
    "RunFailed",
    "RunResult",
    "RunTimeout",
    "TransportError",
    "__version__",
    "context",
    "counts",
    "dp",
    "load_config",
    "load_policy",
    "load_result",
    "run",
    "secure",
    "simulate",
}

# The top level of src/flame: entry points and public modules, then the folders by role.
TOP_LEVEL_MODULES = {
    "__init__.py",  # `import flame`: the public API, loaded lazily
    "__main__.py",  # `python -m flame`
    "main.py",  # `flame.run`: one node's role in a real run
    "simulate.py",  # `flame.simulate`: the whole federation on one machine
    "config.py",  # FlameConfig, load_config
    "errors.py",  # the public exceptions
    "dp.py",  # `flame.dp`: noise for differential privacy
    "testing.py",  # helpers for analysts' own tests
}
TOP_LEVEL_FOLDERS = {
    "aggregator",
    "analysis",
    "cli",
    "clients",
    "data",
    "identity",
    "isolation",
    "node",
    "ops",
    "privacy",
    "protocols",
    "secure",
    "transport",
    "utils",
    "wire",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _ancestors(name: str) -> Iterator[str]:
    parts = name.split(".")
    for end in range(1, len(parts)):
        yield ".".join(parts[:end])


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.Module, package: str) -> Iterator[tuple[str, list[str]]]:
    """(module, names) of every import that runs, TYPE_CHECKING blocks left out."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module, [alias.name for alias in node.names]
        stack.extend(ast.iter_child_nodes(node))


def module_edges(name: str, source: str, modules: set[str], *, package: bool) -> set[str]:
    """The flame modules that importing `name` (whose code is `source`) can import."""
    parent = name if package else name.rpartition(".")[0]
    inside = set(_ancestors(name))
    edges: set[str] = set()
    for module, names in _imported(ast.parse(source), parent):
        targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
        if len(targets) < len(names) or not names:
            targets.append(module)  # a name defined in the package itself, or `import module`
        for target in targets:
            if target in modules:
                edges.add(target)
                edges.update(a for a in _ancestors(target) if a not in inside)
    edges.discard(name)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: module_edges(
            name, path.read_text(encoding="utf-8"), set(modules), package=path.name == "__init__.py"
        )
        for name, path in modules.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
    return cycles


def test_no_module_is_over_the_limit() -> None:
    sizes = {
        name: len(path.read_text(encoding="utf-8").splitlines())
        for name, path in _modules().items()
    }
    over = sorted(f"{n} ({s} lines)" for n, s in sizes.items() if s > MAX_LINES)
    assert not over, f"over {MAX_LINES} lines, split by job: {over}"


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = find_cycles(graph)
    described = [
        " / ".join(f"{a} -> {b}" for a in cycle for b in sorted(graph[a]) if b in cycle)
        for cycle in cycles
    ]
    assert not cycles, "import cycles among flame modules: " + "; ".join(described)


def test_the_cycle_finder_finds_cycles() -> None:
    """The check above could pass by seeing nothing: a known cycle and a known edge."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "flame.ops.check_items" in graph["flame.ops.check"]  # module level
    assert "flame.ops.auth_checks" in graph["flame.ops.node_checks"]  # inside a function
    assert "flame.protocols.paillier.threshold" not in graph["flame.secure.guard"]  # TYPE_CHECKING
    modules = {"p", "p.q", "p.q.user", "p.q.other", "p.r", "p.r.sub"}
    # importing a submodule from outside its package runs the package's __init__ first
    assert module_edges("p.q.user", "from p.r.sub import x", modules, package=False) == {
        "p.r.sub",
        "p.r",
    }
    # `from package import module` inside that package: the package is already loading
    assert module_edges("p.q.user", "from p.q import other", modules, package=False) == {
        "p.q.other"
    }
    assert module_edges("p.q.user", "from . import other", modules, package=False) == {"p.q.other"}
    # a name the package's __init__ defines: an edge to the __init__
    assert module_edges("p.q.user", "from p.q import thing", modules, package=False) == {"p.q"}
    source = "def f():\n    from p.r import sub\nif TYPE_CHECKING:\n    import p.q.other\n"
    assert module_edges("p.q.user", source, modules, package=False) == {"p.r.sub", "p.r"}


def test_public_api_is_unchanged() -> None:
    assert set(flame.__all__) == PUBLIC_API
    for name in sorted(PUBLIC_API):
        assert getattr(flame, name) is not None, name
    assert set(dir(flame)) >= PUBLIC_API


@pytest.mark.parametrize("first", ["modules", "functions"])
def test_secure_and_simulate_stay_functions(first: str) -> None:
    """`flame.secure` and `flame.simulate` are functions beside the package and the module
    of the same name, whichever gets imported first (checked in a fresh interpreter)."""
    script = """
import importlib, inspect, sys
import flame
if sys.argv[1] == "functions":
    assert inspect.isfunction(flame.secure) and inspect.isfunction(flame.simulate)
for module in ("flame.secure", "flame.secure.fields", "flame.simulate", "flame.secure.guard"):
    importlib.import_module(module)
from flame import secure, simulate
assert inspect.isfunction(flame.secure), flame.secure
assert inspect.isfunction(flame.simulate), flame.simulate
assert secure is flame.secure and simulate is flame.simulate
assert inspect.ismodule(flame.dp)
"""
    subprocess.run([sys.executable, "-c", script, first], check=True, timeout=120)


def test_top_level_holds_entry_points_and_public_modules() -> None:
    modules = {p.name for p in PACKAGE.glob("*.py")}
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert modules == TOP_LEVEL_MODULES, (
        "a module at the top of src/flame: put it in the folder of its role "
        f"(ARCHITECTURE.md); unexpected {sorted(modules - TOP_LEVEL_MODULES)}, "
        f"missing {sorted(TOP_LEVEL_MODULES - modules)}"
    )
    assert folders == TOP_LEVEL_FOLDERS, (
        "a new or removed folder: say what it owns in ARCHITECTURE.md and list it here; "
        f"unexpected {sorted(folders - TOP_LEVEL_FOLDERS)}, "
        f"missing {sorted(TOP_LEVEL_FOLDERS - folders)}"
    )
