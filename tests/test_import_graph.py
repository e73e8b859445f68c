"""No import circle among the repository's modules (core/, suites/, tools/), read from the source with ``ast``.

Only module-level imports count: those that run when a module is imported (including ones inside module-level
``if`` / ``try`` blocks and class bodies). Imports inside functions run later, at call time, and are left out, as
are imports under ``if TYPE_CHECKING:``. Importing ``a.b.c`` also runs the packages ``a`` and ``a.b``, so those
count as imported too, unless the importing module sits inside them (they are already running then).
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# source root -> the top-level folders under it whose modules are scanned (names as Python imports them)
SOURCE_ROOTS = ((REPO / "core", ("ts_qat_pytorch", "ts_qat_cli")), (REPO, ("suites", "tools")))


def find_modules(roots) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the given (root, top-level folders) pairs."""
    modules = {}
    for root, tops in roots:
        for top in tops:
            for path in sorted((Path(root) / top).rglob("*.py")):
                parts = path.relative_to(root).with_suffix("").parts
                modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module):
    """The Import / ImportFrom nodes that run when the module is imported."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(modules: dict[str, Path], in_functions: bool = False) -> dict[str, set[str]]:
    """Module -> the repository modules it imports at module level (see the module docstring); with
    ``in_functions``, imports inside functions too."""
    def known(name: str | None) -> str | None:
        while name and name not in modules:  # `import a.b.c` where a.b.c is a name, not a module
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        imports = ([n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))] if in_functions
                   else _module_level_imports(tree))
        for node in imports:
            if isinstance(node, ast.Import):
                targets.update(known(alias.name) for alias in node.names)
                continue
            if node.level:  # relative: `from ..x import y` inside package a.b -> a.x
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # `from p import m`: module p.m when there is one, else the names come from p
            targets.update(known(f"{source}.{alias.name}") for alias in node.names)
        own = set(_ancestors(name)) | {name}
        edges = set()
        for target in targets - {None}:
            edges.update(t for t in (*_ancestors(target), target) if t in modules and t not in own)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one, as [m0, m1, ..., m0]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; module graphs are shallow enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(set(c), graph) for c in components]


def _cycle_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first back to it)."""
    start = min(component)
    parent = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


def test_no_import_cycle_in_repository():
    modules = find_modules(SOURCE_ROOTS)
    assert "ts_qat_pytorch.utils.checkpoint" in modules and "suites.common.runner" in modules
    cycles = find_cycles(import_graph(modules))
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_cycle_in_the_core_even_through_imports_at_call_time():
    """An import moved into a function hides a circle from Python, not from the reader: the library has none."""
    cycles = find_cycles(import_graph(find_modules(SOURCE_ROOTS[:1]), in_functions=True))
    assert not cycles, "import cycles in core/ (imports inside functions included):\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def test_no_import_cycle_in_the_suites_even_through_imports_at_call_time():
    """The suites' pipeline and the suites have none either (the contract, the run object and the stages package
    import downwards only; a suite's scripts read its recipe, not its suite)."""
    cycles = find_cycles(import_graph(find_modules([(REPO, ("suites",))]), in_functions=True))
    assert not cycles, "import cycles in suites/ (imports inside functions included):\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def test_the_core_imports_no_suite_and_no_tool():
    """The library knows no application of it: not even at call time (imports inside functions count here)."""
    found = []
    for name, path in find_modules(SOURCE_ROOTS[:1]).items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{name} imports {t}" for t in targets if t.split(".")[0] in ("suites", "tools")]
    assert not found, "\n".join(found)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_detector_finds_a_cycle_and_skips_deferred_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .sub import b\n",                      # relative, into a subpackage's module
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "import pkg.c\n",                        # absolute
        "pkg/c.py": "if True:\n    from pkg.a import thing\n",  # a module-level block; a name, not a module
        "pkg/lazy.py": "def f():\n    from pkg import a\n",      # inside a function: not module-level
        "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n",
        "pkg/e.py": "from pkg import lazy\n",
    })
    modules = find_modules([(tmp_path, ("pkg",))])
    graph = import_graph(modules)
    assert graph["pkg.lazy"] == set() and graph["pkg.d"] == set() and graph["pkg.e"] == {"pkg.lazy"}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]

    (tmp_path / "pkg/c.py").write_text("def f():\n    from pkg.a import thing\n")  # deferred: no cycle left
    assert find_cycles(import_graph(find_modules([(tmp_path, ("pkg",))]))) == []


def test_detector_finds_a_cycle_through_a_package_init(tmp_path):
    # importing lib.x first runs lib/__init__.py, which imports app.run while app.run is half-imported
    _write(tmp_path, {
        "app/__init__.py": "",
        "app/run.py": "from lib.x import y\n",
        "lib/__init__.py": "from app.run import main\n",
        "lib/x.py": "from . import y_table\ny = 1\n",  # a sibling inside its own package is no cycle
        "lib/y_table.py": "",
    })
    cycles = find_cycles(import_graph(find_modules([(tmp_path, ("app", "lib"))])))
    assert cycles == [["app.run", "lib", "app.run"]]
