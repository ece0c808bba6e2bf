"""No import circles in src/magmax (tools/import_graph.py), and the tool itself against a package built here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
sys.modules["import_graph"] = import_graph  # dataclasses look their module up while the class is made
_spec.loader.exec_module(import_graph)

# The whole package: nothing is left out.
EXCLUDE: list[str] = []


@pytest.fixture(scope="module")
def graph():
    return import_graph.build()


def test_no_circle_among_module_level_imports(graph):
    keep = import_graph.kept_modules(graph, EXCLUDE)
    assert import_graph.cycles(graph.edges("module"), keep) == []


def test_no_lazy_import_closes_a_circle(graph):
    """A function-level import that closes a circle is still two modules needing each other."""
    keep = import_graph.kept_modules(graph, EXCLUDE)
    closing = [edge for edge in import_graph.lazy_closing(graph, keep) if edge not in import_graph.ALLOWED_LAZY]
    assert closing == []
    allowed = dict(import_graph.ALLOWED_LAZY)
    edges = {a: {b for b in targets if (a, b) not in allowed} for a, targets in graph.edges("all").items()}
    assert import_graph.cycles(edges, keep) == []


def test_the_graph_sees_the_package(graph):
    # A graph that read nothing would pass the two tests above: pin edges of each kind that exist.
    assert "magmax.checkpoints" in graph.module_level["magmax.cli_merge"]
    assert "magmax.models.clip_hf" in graph.lazy["magmax.models.registry"]
    assert "magmax.cli_run" in graph.module_level["magmax.cli"]
    assert "magmax.merging.backends.gpu.triton" in graph.module_level["magmax.merging.backends.select"]


FAKE = {
    "__init__.py": "from magmax import a\n",
    # a <-> b at module level
    "a.py": "from magmax.b import x\n",
    "b.py": "import magmax.a\nx = 1\n",
    # c <-> d only through a function-level import
    "c.py": "def f():\n    from magmax import d\n    return d\n",
    "d.py": "from magmax.c import f\n",
    # e <-> f only through TYPE_CHECKING
    "e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from magmax.f import y\nz = 1\n",
    "f.py": "from magmax.e import z\ny = 2\n",
    # module level inside try and a class body; relative imports in a subpackage
    "j.py": "try:\n    from magmax.k import q\nexcept ImportError:\n    q = None\nw = 1\n",
    "k.py": "class K:\n    from magmax.j import w\nq = 1\n",
    "sub/__init__.py": "",
    "sub/g.py": "from . import h\n",
    "sub/h.py": "from ..sub import g\n",
    # no circle: a TYPE_CHECKING block's else branch runs
    "m.py": "import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n    from magmax import n\n",
    "n.py": "",
}


@pytest.fixture
def fake_src(tmp_path: Path) -> Path:
    for name, text in FAKE.items():
        path = tmp_path / "magmax" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_tool_tells_the_kinds_of_circle_apart(fake_src):
    g = import_graph.build(fake_src)
    keep = import_graph.kept_modules(g, [])
    module = [["magmax.a", "magmax.b"], ["magmax.j", "magmax.k"], ["magmax.sub.g", "magmax.sub.h"]]
    assert import_graph.cycles(g.edges("module"), keep) == module
    assert import_graph.cycles(g.edges("all"), keep) == sorted(module + [["magmax.c", "magmax.d"]])
    assert import_graph.cycles(g.edges("typing"), keep) == sorted(module + [["magmax.c", "magmax.d"], ["magmax.e", "magmax.f"]])
    assert import_graph.lazy_closing(g, keep) == [("magmax.c", "magmax.d")]
    assert g.module_level["magmax.m"] == {"magmax.n"}
    # the package's own __init__ importing a submodule is an edge; the implicit parent import is not
    assert g.module_level["magmax"] == {"magmax.a"}
    assert "magmax" not in g.module_level["magmax.b"]


def test_tool_exit_status_and_exclusion(fake_src, capsys):
    assert import_graph.main(["--src", str(fake_src)]) == 1
    out = capsys.readouterr().out
    assert "cycles among module-level imports: 3" in out
    assert "magmax.c -> magmax.d" in out
    # without the module-level circles, the lazy one alone still fails
    for name in ("b.py", "k.py", "sub/h.py"):
        (fake_src / "magmax" / name).write_text("x = q = 1\n")
    assert import_graph.main(["--src", str(fake_src)]) == 1
    (fake_src / "magmax" / "c.py").write_text("def f():\n    pass\n")
    assert import_graph.main(["--src", str(fake_src)]) == 0
    capsys.readouterr()
    (fake_src / "magmax" / "sub" / "h.py").write_text("from ..sub import g\n")
    assert import_graph.main(["--src", str(fake_src), "--exclude", "sub"]) == 0
    assert import_graph.main(["--src", str(fake_src)]) == 1
