"""The package's layout: no import cycles, and no two modules of one name with different jobs.

Imports are read from the source (every ``import`` statement, those inside functions
included, except under ``if TYPE_CHECKING:``), so a lazy import that only hides a cycle
counts as one.
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set

import nnsim_hooks

ROOT = Path(nnsim_hooks.__file__).resolve().parent
PACKAGE = "nnsim_hooks"

#: Names several modules (or packages) share on purpose, with the reason: each set is
#: exactly the modules allowed that name. A new module of one of these names fails too.
SHARED_NAMES: Dict[str, Set[str]] = {
    # the same job at another scale: one process, or several processes sharing the rows
    "build": {"nnsim_hooks.index.build", "nnsim_hooks.index.sharded.build"},
    "queries": {"nnsim_hooks.index.queries", "nnsim_hooks.index.sharded.queries"},
    # a package and its main module
    "engine": {"nnsim_hooks.engine", "nnsim_hooks.engine.engine"},
}


def _modules() -> Dict[str, Path]:
    """Dotted name -> file, for every module of the package (``integrations`` through its
    symlink, as it is imported)."""
    out = {}
    for base, dirs, files in os.walk(ROOT, followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = (Path(base) / name).relative_to(ROOT).with_suffix("")
            parts = [PACKAGE, *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = Path(base) / name
    return out


def _type_checking_nodes(tree: ast.AST) -> Set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    return skip


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The package's modules that ``name`` imports (a name imported from a package counts
    as its submodule when there is one of that name, else as the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def import_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _describe(cycle: List[str], graph: Dict[str, Set[str]]) -> str:
    members = set(cycle)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in cycle)


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert "nnsim_hooks.index.gradient_index" in graph and "nnsim_hooks.integrations.datasets" in graph
    cycles = import_cycles(graph)
    assert not cycles, "import cycles (move the shared piece down, or hand it in):\n" + "\n".join(
        _describe(c, graph) for c in cycles)


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from .other import x\n\nif TYPE_CHECKING:\n    from . import typed\n")
    modules = {"p.m": source, "p.other": source, "p.typed": source, "p": source}
    assert _imports("p.m", source, modules) == {"p.other"}


def test_no_two_modules_share_a_name_unless_listed():
    by_name = defaultdict(set)
    for name in _modules():
        if name != PACKAGE:
            by_name[name.rpartition(".")[2]].add(name)
    shared = {short: names for short, names in by_name.items() if len(names) > 1}
    unlisted = {short: sorted(names) for short, names in shared.items() if names - SHARED_NAMES.get(short, set())}
    assert not unlisted, (
        f"modules of one name: {unlisted}. Give each a name that says its job, or, when they do the same job "
        "(one process / several), list them in SHARED_NAMES with the reason"
    )
