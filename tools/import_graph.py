"""Import graph of src/magmax, read from the source's AST (nothing is imported), and the circles in it.

    python tools/import_graph.py                   # cycles among module-level imports, then lazy ones
    python tools/import_graph.py --exclude merging # leave out magmax.merging and its submodules
    python tools/import_graph.py --edges           # also print every edge (module -> module, kind)
    python tools/import_graph.py --type-checking   # also the circles that TYPE_CHECKING imports close
    python tools/import_graph.py --src OTHER/src   # another checkout

What counts as an import of module B by module A:
- ``import magmax.b`` / ``from magmax import b`` / ``from magmax.b import x`` / relative forms. A name
  imported from a package (``from magmax.models import base``) is the submodule where one by that name
  exists, else the package's ``__init__``.
- Importing ``magmax.a.b`` also runs the ``__init__`` of ``magmax`` and ``magmax.a`` first; those implicit
  parent edges are not drawn (every package that imports its own submodules would otherwise be a circle
  by construction). An explicit import of a package (``import magmax``, ``from magmax.data import x``
  where x is not a submodule) is an edge to its ``__init__`` like any other.
- Module-level imports (including those inside module-level ``try``/``if`` blocks and class bodies) run
  when the module is first imported: a circle among them is an import-order hazard as well as a
  layering defect.
- Imports inside a function or method body are *lazy* and reported separately. They count: a lazy
  import that closes a circle is still a circle in design terms (two modules that each need the other;
  the lazy import only hides it from the import machinery), so the tool also prints the circles of
  module-level plus lazy imports and names each lazy import that closes one. A lazy import may stay
  only where it is listed in ``ALLOWED_LAZY`` with its reason.
- Imports under ``if TYPE_CHECKING:`` do not count: they never run. ``--type-checking`` lists the circles
  they would close, for information only (an annotation-only dependency is not a failure).

Exit status: 1 where a module-level circle exists or a lazy import not in ``ALLOWED_LAZY`` closes one,
0 otherwise. tests/test_import_graph.py holds the whole of src/magmax to both.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys
from dataclasses import dataclass, field

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"
PACKAGE = "magmax"

# Lazy (function-level) edges that may close a circle, with the reason. Empty: there are none today.
ALLOWED_LAZY: dict[tuple[str, str], str] = {}


@dataclass
class Graph:
    modules: set[str] = field(default_factory=set)
    packages: set[str] = field(default_factory=set)
    module_level: dict[str, set[str]] = field(default_factory=dict)
    lazy: dict[str, set[str]] = field(default_factory=dict)
    typing: dict[str, set[str]] = field(default_factory=dict)  # under ``if TYPE_CHECKING:``

    def edges(self, kind: str) -> dict[str, set[str]]:
        """``module``, ``lazy``, ``all`` (module-level and lazy) or ``typing`` (all and TYPE_CHECKING)."""
        if kind == "module":
            return self.module_level
        if kind == "lazy":
            return self.lazy
        tables = [self.module_level, self.lazy] + ([self.typing] if kind == "typing" else [])
        return {m: set().union(*(t.get(m, ()) for t in tables)) for m in self.modules}


def module_name(path: pathlib.Path, src: pathlib.Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, str]]:
    """(import node, kind) for every import: kind ``module`` (runs on import), ``lazy`` (inside a function
    body) or ``typing`` (under ``if TYPE_CHECKING:``, never runs)."""
    out: list[tuple[ast.Import | ast.ImportFrom, str]] = []

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            visit_stmt(child, kind)

    def visit_stmt(child: ast.AST, kind: str) -> None:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            out.append((child, kind))
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            visit(child, "typing" if kind == "typing" else "lazy")
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.body:
                visit_stmt(sub, "typing")
            for sub in child.orelse:
                visit_stmt(sub, kind)
        else:
            visit(child, kind)

    visit(tree, "module")
    return out


def _resolve(base: str, name: str | None, graph: Graph) -> str | None:
    """The module that ``from base import name`` (or ``import base`` where name is None) loads."""
    if name is not None and f"{base}.{name}" in graph.modules:
        return f"{base}.{name}"
    probe = base
    while probe and probe not in graph.modules:
        probe = probe.rpartition(".")[0]
    return probe or None


def build(src: pathlib.Path = SRC, package: str = PACKAGE) -> Graph:
    graph = Graph()
    files = sorted((src / package).rglob("*.py"))
    for path in files:
        name = module_name(path, src)
        graph.modules.add(name)
        if path.name == "__init__.py":
            graph.packages.add(name)
    for path in files:
        name = module_name(path, src)
        own_package = name if name in graph.packages else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, kind in _imports(tree):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_resolve(alias.name, None, graph) for alias in node.names]
            else:
                if node.level:
                    anchor = own_package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [_resolve(base, alias.name, graph) for alias in node.names]
            for target in targets:
                if target is None or target == name or not target.startswith(package):
                    continue
                table = {"module": graph.module_level, "lazy": graph.lazy, "typing": graph.typing}[kind]
                table.setdefault(name, set()).add(target)
    return graph


def cycles(edges: dict[str, set[str]], keep: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a self-loop), restricted to ``keep``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in keep:
                continue
            if w not in index:
                strong(w)
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
            if len(comp) > 1 or v in edges.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(keep):
        if v not in index:
            strong(v)
    return sorted(found)


def shortest_circle(edges: dict[str, set[str]], component: list[str]) -> list[str]:
    """One short circle through the component's first module, for a readable report."""
    members = set(component)
    start = component[0]
    from collections import deque

    prev: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        v = queue.popleft()
        for w in sorted(edges.get(v, ())):
            if w not in members:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return list(reversed(path)) + [start]
            if w not in seen:
                seen.add(w)
                prev[w] = v
                queue.append(w)
    return component


def kept_modules(graph: Graph, exclude: list[str]) -> set[str]:
    prefixes = [f"{PACKAGE}.{e}" for e in exclude]
    return {m for m in graph.modules if not any(m == p or m.startswith(p + ".") for p in prefixes)}


def lazy_closing(graph: Graph, keep: set[str]) -> list[tuple[str, str]]:
    """Lazy edges a -> b where b reaches a again (through any edges): each closes a circle."""
    everything = graph.edges("all")

    def reaches(src: str, dst: str) -> bool:
        seen, todo = {src}, [src]
        while todo:
            v = todo.pop()
            if v == dst:
                return True
            for w in everything.get(v, ()):
                if w in keep and w not in seen:
                    seen.add(w)
                    todo.append(w)
        return False

    out = []
    for a in sorted(keep):
        for b in sorted(graph.lazy.get(a, ())):
            if b in keep and b not in graph.module_level.get(a, ()) and reaches(b, a):
                out.append((a, b))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=pathlib.Path, default=SRC, help="the folder that holds the magmax package")
    parser.add_argument("--exclude", action="append", default=[], help="subpackage of magmax to leave out")
    parser.add_argument("--edges", action="store_true", help="print every edge")
    parser.add_argument("--type-checking", action="store_true", help="also list circles TYPE_CHECKING imports close (information)")
    args = parser.parse_args(argv)
    graph = build(args.src)
    keep = kept_modules(graph, args.exclude)
    if args.edges:
        for kind in ("module", "lazy", "typing"):
            for a in sorted(keep):
                for b in sorted(getattr(graph, {"module": "module_level"}.get(kind, kind)).get(a, ())):
                    if b in keep:
                        print(f"{a} -> {b} ({kind})")
    status = 0
    kinds = [("module", "module-level imports"), ("all", "module-level and lazy imports")]
    if args.type_checking:
        kinds.append(("typing", "module-level, lazy and TYPE_CHECKING imports (information only)"))
    for kind, title in kinds:
        edges = graph.edges(kind)
        found = cycles(edges, keep)
        print(f"cycles among {title}: {len(found)}")
        for comp in found:
            print("  " + " -> ".join(shortest_circle(edges, comp)) + f"   ({len(comp)} modules)")
        if kind == "module" and found:
            status = 1
    closing = lazy_closing(graph, keep)
    print(f"lazy imports that close a circle: {len(closing)}")
    for a, b in closing:
        note = ALLOWED_LAZY.get((a, b))
        print(f"  {a} -> {b}" + (f"   (allowed: {note})" if note else ""))
        if note is None:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
