"""The import-layer rule (ARCHITECTURE.md): the package's module-level imports form a DAG.

Read from the source with `ast`, not by importing: every `import authrelay...` and
`from authrelay... import ...` at module level counts, those under `if TYPE_CHECKING:`
(and any other module-level `if`/`try`) included, since a type-only cycle is still two
modules that each need the other. `import_graph(everywhere=True)` adds the imports inside
functions and classes: they run late, so they do not fail at import time, but a cycle
through one is still two modules that each need the other, and it must not exist either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import authrelay

ROOT = Path(authrelay.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The module `name` is, or the module a `from` import takes `name` out of."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _module_level(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    out: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        elif isinstance(node, ast.If):
            out += _module_level(node.body) + _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _module_level(node.body) + _module_level(node.orelse)
            out += _module_level(node.finalbody)
            for h in node.handlers:
                out += _module_level(h.body)
    return out


def _everywhere(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]


def import_graph(everywhere: bool = False) -> dict[str, set[str]]:
    """module -> the package modules it imports: at module level, or (`everywhere`) also
    inside functions and classes."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        for node in _everywhere(tree) if everywhere else _module_level(tree.body):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    pkg = package.split(".")
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] or [base]
            for t in targets:
                dep = _resolve(t, mods)
                if dep is not None and dep.startswith("authrelay") and dep != name:
                    deps.add(dep)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "authrelay.wiring" in graph  # it read the package
    assert cycles(graph) == []


def test_function_level_imports_make_no_cycle_either() -> None:
    graph = import_graph(everywhere=True)
    assert len(graph) > 50
    # Read them: the function-level imports are edges too (localsubmit's of sendmail was).
    assert "authrelay.sendmail" in graph["authrelay.cli"]
    assert "authrelay.sendmail" not in import_graph()["authrelay.cli"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_composition_root_is_imported_by_no_part() -> None:
    # wiring.py builds the parts; a part that imported it would build its own.
    graph = import_graph()
    users = sorted(m for m, deps in graph.items() if "authrelay.wiring" in deps)
    assert set(users) <= {"authrelay.daemon", "authrelay.sendmail"}, users


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_receiving_and_delivering_stay_apart() -> None:
    # The spool is the only hand-off: the receiving side (smtpd/) reaches no delivery or
    # scheduler module, and the spool reaches neither side.
    graph = import_graph()
    for mod in (m for m in graph if m.startswith("authrelay.smtpd")):
        far = sorted(d for d in _reach(graph, mod)
                     if d.startswith(("authrelay.delivery", "authrelay.scheduler")))
        assert far == [], (mod, far)
    for mod in (m for m in graph if m.startswith("authrelay.spool")):
        far = sorted(d for d in _reach(graph, mod) if d.startswith(
            ("authrelay.smtpd", "authrelay.delivery", "authrelay.scheduler")))
        assert far == [], (mod, far)
