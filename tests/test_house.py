"""The house of ARCHITECTURE.md, checked on the code as it is imported (``retromem.<package>``):
no import circles, and no import that runs up a floor (ground ``retromem.*`` < datastore < index <
service < retro, memory < the command line, which nothing imports). Every import counts, the ones
inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOORS = {"datastore": 1, "index": 2, "service": 3, "retro": 4, "memory": 4}
ROOF = 9


def modules() -> dict[str, Path]:
    """Module name (as imported) -> file, for the library and the command line."""
    out = {}
    for folder in (*FLOORS, "retromem"):
        for path in (REPO / folder).rglob("*.py"):
            if "_pb2" in path.name:
                continue
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts if parts[0] == "retromem" else ["retromem", *parts])] = path
    return out


def floor(mod: str) -> int:
    part = mod.split(".")[1] if "." in mod else ""
    return FLOORS.get(part, ROOF if part == "cli" else 0)


def graph() -> dict[str, set[tuple[str, int]]]:
    mods = modules()
    edges: dict[str, set[tuple[str, int]]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:  # a name imported from a module counts as that module
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    edges[mod].add((t, node.lineno))
    return edges


def circles(edges: dict[str, set[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w, _ in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_no_import_circles():
    assert circles(graph()) == []


def test_imports_point_down_the_floors_and_nothing_imports_the_command_line():
    upward = [f"{mod} imports {t} (line {line})" for mod, targets in graph().items() for t, line in targets
              if floor(t) > floor(mod) and not mod.startswith("retromem.cli")]
    assert upward == []


def test_the_checker_sees_a_circle():
    assert circles({"a": {("b", 1)}, "b": {("c", 1)}, "c": {("a", 1)}, "d": set()}) == [["a", "b", "c"]]
    g = graph()
    assert ("retromem.datastore", 1) not in g  # sanity: names are the imported ones
    assert any(t == "retromem.errors" for t, _ in g["retromem.datastore.store"])
