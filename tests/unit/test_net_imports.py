"""The layers of docs/architecture.md, read from the source: no import cycle among slicer's modules,
and slicer/net imports nothing from the layers above it. Every import counts, wherever it is (inside
``if TYPE_CHECKING:`` and inside functions too); a package's ``__init__`` run implicitly by
importing one of its modules does not (Python allows that cycle by design)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import slicer

Graph = dict[str, set[str]]
SOURCE = Path(slicer.__file__).parent


def modules(package: Path) -> dict[str, Path]:
    """Dotted name → file, for every module of the package rooted at ``package``."""
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The known modules that module ``name`` imports: ``from pkg import sub`` names the
    submodule if there is one, else the package (its ``__init__``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    yield f"{base}.{alias.name}"
                elif base in known:
                    yield base


def import_graph(package: Path) -> Graph:
    known = modules(package)
    return {name: set(imported(name, path, known)) - {name} for name, path in known.items()}


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                    found.append(sorted(component))
    return found


def upward(graph: Graph, layer: str, above: tuple[str, ...]) -> list[tuple[str, str]]:
    return sorted((m, d) for m, deps in graph.items() if m == layer or m.startswith(layer + ".")
                  for d in deps if any(d == a or d.startswith(a + ".") for a in above))


@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph(SOURCE)


def test_the_graph_is_read_from_the_source(graph):
    assert "slicer.net.backends" in graph["slicer.net.host"]  # from slicer.net.backends import ...
    assert "slicer.vmm.jail" in graph["slicer.net.host"]
    assert "slicer.net.config" in graph["slicer.core.config"]
    assert "slicer.net" in graph["slicer.core.manager"]  # from slicer.net import HostNetwork: the package


def test_no_import_cycle_in_slicer(graph):
    assert cycles(graph) == []


@pytest.mark.parametrize(("layer", "above"), [
    ("slicer.net", ("slicer.core", "slicer.api", "slicer.daemon", "slicer.cli", "slicer.client")),
    ("slicer.vmm", ("slicer.net", "slicer.core", "slicer.api", "slicer.daemon", "slicer.cli", "slicer.client")),
])
def test_a_layer_imports_nothing_from_the_layers_above(graph, layer, above):
    assert upward(graph, layer, above) == []


def test_slicer_net_depends_only_on_what_is_below_it(graph):
    allowed = ("slicer.net", "slicer.vmm", "slicer.channel")
    outside = {d for m, deps in graph.items() if m.startswith("slicer.net") for d in deps
               if not d.startswith(allowed)}
    assert outside == set()


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_a_cycle_through_type_checking_and_relative_imports_is_found(tmp_path):
    pkg = write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import A\n",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.b import B\nA = 1\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "from .. import c\nB = 2\n",
        "pkg/c.py": "def f():\n    import pkg.a\n",
        "pkg/d.py": "from pkg.sub import b\nimport os\n",
    })
    g = import_graph(pkg)
    assert g["pkg.sub.b"] == {"pkg.c"} and g["pkg.d"] == {"pkg.sub.b"} and g["pkg"] == {"pkg.a"}
    assert cycles(g) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert upward(g, "pkg.sub", ("pkg.c",)) == [("pkg.sub.b", "pkg.c")]


def test_a_package_importing_its_own_modules_is_no_cycle(tmp_path):
    pkg = write(tmp_path, {"pkg/__init__.py": "from pkg.a import A\n", "pkg/a.py": "from pkg.b import B\nA = 1\n",
                           "pkg/b.py": "B = 2\n"})
    assert cycles(import_graph(pkg)) == []
