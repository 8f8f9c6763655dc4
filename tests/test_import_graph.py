"""No import circles in the package: every ``import`` of a drugprot module, at the top of a file or inside a function
(a lazy import is still a dependency), is an edge; a submodule import also depends on its parent packages (Python
runs their ``__init__``). The graph must have no cycle, between modules nor between the top-level stages
(``drugprot.ensemble``, ``drugprot.inference``, ``drugprot.tuning`` …)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "drugprot"


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported_names(name: str, path: Path) -> set[str]:
    """Every dotted name ``path`` imports (relative imports resolved), including ``from X import Y`` as ``X.Y``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    known = modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        edges = set()
        for target in imported_names(name, path):
            while target and target not in known:  # `from drugprot.x import function` -> drugprot.x
                target = target.rpartition(".")[0]
            parts = target.split(".")
            edges.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))  # parents' __init__ run too
        graph[name] = edges - own_packages - {name, root.name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def stage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Collapse modules to their top-level stage (``drugprot.ensemble.build`` -> ``drugprot.ensemble``)."""
    def stage(name: str) -> str:
        return ".".join(name.split(".")[:2])

    stages: dict[str, set[str]] = {}
    for name, targets in graph.items():
        stages.setdefault(stage(name), set()).update(stage(t) for t in targets if stage(t) != stage(name))
    return stages


def test_the_walk_sees_lazy_imports_and_finds_a_planted_circle(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg.sub.b import g\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("from .. import a\n")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]
    (package / "sub" / "b.py").write_text("import json\n")
    assert cycles(import_graph(package)) == []


def test_drugprot_has_no_import_circle():
    graph = import_graph()
    assert "drugprot.inference" in graph and len(graph) > 30
    assert cycles(graph) == []


#: Stages and the stages above them that they must never import: loading a model (inference, the folder format, the
#: registry client, the MLflow store) stays below building ensembles, tracking studies, tuning and serving.
ABOVE = {
    "drugprot.mlflow_store": {"drugprot.registry", "drugprot.tracking", "drugprot.inference", "drugprot.ensemble"},
    "drugprot.registry": {"drugprot.tracking", "drugprot.inference", "drugprot.ensemble", "drugprot.serving",
                          "drugprot.tuning"},
    "drugprot.inference": {"drugprot.tracking", "drugprot.ensemble", "drugprot.serving", "drugprot.tuning"},
    "drugprot.ensemble_folder": {"drugprot.registry", "drugprot.inference", "drugprot.ensemble"},
    "drugprot.model": {"drugprot.registry", "drugprot.inference", "drugprot.ensemble"},
    "drugprot.tracking": {"drugprot.registry", "drugprot.inference", "drugprot.ensemble", "drugprot.tuning"},
}


@pytest.mark.parametrize("stage", sorted(ABOVE))
def test_no_stage_imports_upwards(stage):
    graph = stage_graph(import_graph())
    assert graph[stage] & ABOVE[stage] == set()
    assert cycles(graph) == []
