"""No module of the gradrewrite package imports, directly or through others, a module
that imports it back at import time.

The graph is read from the source with ``ast`` (nothing is imported): an edge A -> B
for every import statement that runs when A is imported, i.e. at module level,
including inside ``if``/``try``/``with`` blocks and class bodies, but not inside
functions (they run later) or under ``if TYPE_CHECKING:`` (never runs). Relative
imports are resolved against A's package; an imported package is its ``__init__``;
``from P import x`` is an edge to the submodule ``P.x`` when there is one, else to
``P``. Importing ``P.Q.m`` also runs the ``__init__`` of ``P`` and ``P.Q``: those
count as edges too, except packages that contain A (already imported before A).
"""
from __future__ import annotations

import ast
from pathlib import Path

import gradrewrite

PACKAGE_DIR = Path(gradrewrite.__file__).resolve().parent


def modules(package_dir: Path) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__) for every .py file under the package."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_time_imports(tree: ast.Module, *, deferred: bool = False) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported (``deferred``: also
    those inside functions and under ``if TYPE_CHECKING:``)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(stmts: list[ast.stmt]) -> None:
        for s in stmts:
            if isinstance(s, (ast.Import, ast.ImportFrom)):
                found.append(s)
            elif isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if deferred:  # else: runs when called, after every import finished
                    walk(s.body)
            elif isinstance(s, ast.If) and _is_type_checking(s.test):
                if deferred:
                    walk(s.body)
                walk(s.orelse)
            else:  # if / try / with / for / while / class bodies run at import time
                for block in ("body", "orelse", "finalbody"):
                    walk(getattr(s, block, None) or [])
                for handler in getattr(s, "handlers", None) or []:
                    walk(handler.body)
                for case in getattr(s, "cases", None) or []:
                    walk(case.body)

    walk(tree.body)
    return found


def import_graph(package_dir: Path, *, deferred: bool = False) -> dict[str, dict[str, int]]:
    """Module -> {module it imports at import time: line of the first such import}
    (``deferred``: counting imports inside functions and for type checking too)."""
    mods = modules(package_dir)
    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_pkg) in mods.items():
        own_package = name if is_pkg else name.rpartition(".")[0]
        containing = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        edges: dict[str, int] = {}

        def add(target: str, line: int) -> None:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the packages on the way run their __init__ first
                mod = ".".join(parts[:i])
                if mod in mods and mod != name and (mod == target or mod not in containing):
                    edges.setdefault(mod, line)

        for node in import_time_imports(ast.parse(path.read_text(), str(path)), deferred=deferred):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
                continue
            if node.level:
                base = own_package.split(".")[:len(own_package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in mods else source, node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One closed path per group of modules that import each other (a strongly connected
    component, Tarjan): the shortest cycle through the group's first module."""
    return [_shortest_cycle(graph, comp) for comp in components(graph)]


def components(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _shortest_cycle(graph: dict[str, dict[str, int]], comp: list[str]) -> list[str]:
    start, members = comp[0], set(comp)
    paths, seen = [[start]], {start}
    while paths:
        nxt = []
        for path in paths:
            for w in sorted(graph[path[-1]]):
                if w == start:
                    return path + [start]
                if w in members and w not in seen:
                    seen.add(w)
                    nxt.append(path + [w])
        paths = nxt
    raise AssertionError(f"no cycle through {start}")  # not reached for a component of two or more


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    """The cycle's imports with their lines, and every module of its component."""
    steps = [f"{a} -> {b} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    comp = next(c for c in components(graph) if cycle[0] in c)
    rest = sorted(set(comp) - set(cycle))
    tail = [f"(with {', '.join(rest)} in the same cycle group)"] if rest else []
    return "\n    ".join(steps + tail)


# ------------------------------------------------------------------ the package
def test_gradrewrite_has_no_import_cycles():
    graph = import_graph(PACKAGE_DIR)
    found = cycles(graph)
    assert not found, "import cycles (module-level imports; break each by moving the shared piece " \
        "into a module of its own):\n  " + "\n  ".join(describe(graph, c) for c in found)


def test_mcu_backend_has_no_cycles_even_through_deferred_imports():
    """Inside the mcu backend no module imports one that imports it back at all: a cycle
    is not broken by moving one of its imports into a function (DESIGN.md, graph kinds)."""
    graph = import_graph(PACKAGE_DIR, deferred=True)
    mcu = "gradrewrite.backends.mcu"
    inside = {m: {d: line for d, line in deps.items() if d == mcu or d.startswith(mcu + ".")}
              for m, deps in graph.items() if m == mcu or m.startswith(mcu + ".")}
    found = cycles(inside)
    assert not found, "import cycles in the mcu backend (counting imports inside functions):\n  " + \
        "\n  ".join(describe(inside, c) for c in found)


def test_the_graph_sees_the_package():
    """The reader finds the imports it should (a checker that reads nothing passes anything)."""
    graph = import_graph(PACKAGE_DIR)
    assert "gradrewrite.rewrite.graph" in graph["gradrewrite.compiler"]
    assert "gradrewrite.backends.base" in graph["gradrewrite.backends.mcu"]


# ------------------------------------------------------------------ the checker itself
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_finds_a_relative_cycle_through_three_modules(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .b import f\n",
        "b.py": "from . import c\n",
        "c.py": "try:\n    from .a import g\nexcept ImportError:\n    pass\n",
        "d.py": "from .a import f\n",
    })
    graph = import_graph(root)
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert "pkg.a -> pkg.b (line 1)" in describe(graph, cycles(graph)[0])


def test_function_and_type_checking_imports_do_not_count(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .b import f\n",
        "b.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import T\n"
                 "def f():\n    from .a import g\n"),
    })
    assert cycles(import_graph(root)) == []
    assert cycles(import_graph(root, deferred=True)) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_packages_resolve_to_their_init(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "sub/__init__.py": "from .impl import run\n",
        "sub/impl.py": "from ..util import helper\n",
        "util.py": "from . import sub\n",            # a submodule: pkg.sub, i.e. its __init__
        "other.py": "import pkg.sub.impl\n",        # runs pkg/sub/__init__ too
    })
    graph = import_graph(root)
    assert set(graph["pkg.other"]) == {"pkg.sub", "pkg.sub.impl"}
    assert cycles(graph) == [["pkg.sub", "pkg.sub.impl", "pkg.util", "pkg.sub"]]


def test_a_name_from_the_own_package_is_an_edge_to_its_init(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "from .a import run\nhelper = 1\n",
        "a.py": "from . import helper\n",
        "b.py": "from .a import run\n",   # pkg/__init__ runs before b, but b does not import it
    })
    graph = import_graph(root)
    assert "pkg" not in graph["pkg.b"]
    assert cycles(graph) == [["pkg", "pkg.a", "pkg"]]
