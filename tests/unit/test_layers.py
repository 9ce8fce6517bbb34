"""The import rules of DESIGN.md, read from the source: ``protocol`` <- ``comm`` <- the
rest, ZeroMQ only in ``comm``, ``manager`` and the units never import each other, the
index knows no sockets, and no package imports itself in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import edgellm.comm

SRC = Path(edgellm.comm.__file__).resolve().parents[1]  # .../src/edgellm


def _imports() -> dict[str, set[str]]:
    """module (``edgellm.a.b``) -> the modules it imports (absolute, any depth)."""
    out: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        module = ".".join(("edgellm", *path.relative_to(SRC).with_suffix("").parts))
        module = module.removesuffix(".__init__")
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
        out[module] = names
    return out


IMPORTS = _imports()


def _package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_only_comm_imports_zmq():
    users = sorted(m for m, names in IMPORTS.items()
                   if any(n == "zmq" or n.startswith("zmq.") for n in names)
                   and _package(m) != "comm")  # fmt: skip
    assert users == []


@pytest.mark.parametrize("package, forbidden", [
    ("protocol", {"comm", "manager", "unit", "units", "kvevents", "kvindex", "discovery",
                  "engine", "gateway"}),
    ("comm", {"manager", "unit", "units", "kvevents", "kvindex", "discovery", "engine",
              "gateway"}),
    ("kvindex", {"comm", "manager", "unit", "units", "kvevents", "discovery"}),
    ("manager", {"unit", "units"}),
    ("unit", {"manager"}),
    ("units", {"manager"}),
    ("gateway", {"manager", "unit", "units", "engine"}),  # the llm unit is met on the wire
    ("httpapi", {"manager", "unit", "units", "engine", "gateway", "kvevents", "kvindex"}),
])  # fmt: skip
def test_imports_go_one_way(package, forbidden):
    crossing = sorted((m, n) for m, names in IMPORTS.items() if _package(m) == package
                      for n in names if n.startswith("edgellm.") and _package(n) in forbidden)
    assert crossing == []


def test_no_module_imports_itself_through_a_circle():
    graph = {m: {n for n in names if n in IMPORTS and n != m and not m.startswith(n + ".")}
             for m, names in IMPORTS.items()}  # fmt: skip
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for nxt in sorted(graph[module]):
            if seen.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[module] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module, [module])
    assert circles == []


def test_the_comm_package_exports_what_it_says():
    assert sorted(edgellm.comm.__all__) == sorted(set(edgellm.comm.__all__))
    for name in edgellm.comm.__all__:
        assert getattr(edgellm.comm, name) is not None
