"""The import graph of the magmax package, read from the source (AST), and its cycles.

    python tools/import_graph.py                 # every cycle in src/magmax
    python tools/import_graph.py magmax.merging  # only cycles among modules under magmax.merging

An edge a → b is any import of b in a's source (module level or inside a function; imports under
``if TYPE_CHECKING:`` are left out, they never run). ``from pkg import name`` points at ``pkg.name``
when that is a module, else at ``pkg``. A package's ``__init__`` is the package's own module; importing
``pkg.sub`` is not counted as an import of ``pkg`` (Python runs it first, but that is no dependency).
Exit status 1 when a cycle is found.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def modules(root: Path = SRC, package: str = "magmax") -> dict[str, Path]:
    """Module name → source file, for every .py file of the package."""
    out: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def graph(root: Path = SRC, package: str = "magmax") -> dict[str, set[str]]:
    """Module → the package's modules it imports."""
    known = modules(root, package)
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in known else base)
            for target in targets:
                while target and target not in known:  # import a.b.c where only a.b is a module of ours
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]], within: str = "") -> list[list[str]]:
    """The strongly connected components of more than one module (each a cycle or a knot of them),
    among the modules under ``within`` (all when empty), each sorted, in sorted order."""
    nodes = [n for n in edges if not within or n == within or n.startswith(within + ".")]
    chosen = set(nodes)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def strong(v: str) -> None:  # Tarjan's algorithm
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v] & chosen):
            if w not in index:
                strong(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(nodes):
        if v not in index:
            strong(v)
    return sorted(found)


def main(argv: list[str]) -> int:
    within = argv[0] if argv else ""
    found = cycles(graph(), within)
    for component in found:
        print(" <-> ".join(component))
    print(f"{len(found)} import cycle(s){' under ' + within if within else ''}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
