"""No import cycles in the package (tools/import_graph.py reads the graph from the source)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("import_graph", Path(__file__).resolve().parent.parent / "tools" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(import_graph)  # type: ignore[union-attr]

# Cycles outside merging/ that are being removed separately (issue #18, non-merging part): this list
# only shrinks; the repo-wide test below turns strict once it is empty.
KNOWN_OUTSIDE_MERGING = [
    ["magmax.cli", "magmax.cli_merge", "magmax.cli_report", "magmax.cli_run", "magmax.cli_sweep", "magmax.sweep",
     "magmax.sweep_job"],
    ["magmax.data", "magmax.data.base"],
    ["magmax.models.base", "magmax.models.clip_hf", "magmax.models.efficientnet", "magmax.models.minilm",
     "magmax.models.open_clip_backbone"],
    ["magmax.plots", "magmax.report"],
]


def test_the_tool_finds_a_cycle_and_its_members(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("import pkg.a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.d\n")
    (pkg / "d.py").write_text("from . import sub\nfrom .sub import c\n")
    edges = import_graph.graph(tmp_path, "pkg")
    assert edges["pkg.sub.c"] == {"pkg.a"}  # the TYPE_CHECKING import is no edge
    assert edges["pkg.d"] == {"pkg.sub", "pkg.sub.c"}  # relative imports resolved
    assert import_graph.cycles(edges) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert import_graph.cycles(edges, "pkg.sub") == []


def test_merging_has_no_import_cycle():
    assert import_graph.cycles(import_graph.graph(), "magmax.merging") == []


def test_no_import_cycles_but_the_known_ones_outside_merging():
    found = import_graph.cycles(import_graph.graph())
    assert [c for c in found if c not in KNOWN_OUTSIDE_MERGING] == []


@pytest.mark.xfail(bool(KNOWN_OUTSIDE_MERGING), reason="cycles outside merging/ not yet removed", strict=True)
def test_no_import_cycles_anywhere():
    assert import_graph.cycles(import_graph.graph()) == []
