"""The import graph keeps the layering: no cycles between modules, no arrow against the floors.

The graph is read with `ast` from every .py under PACKAGES; module-level and
function-local imports both count (a function-local import hides a cycle, it
does not remove it). An edge goes from a module to each project module it
names (`from a.b import c` names a.b.c when that is a module, else a.b), or
to the dotted name itself for anything outside the project (threading, ...).
Importing a.b.c also runs a and a.b, but those implicit parent edges are not
counted: every module would then sit in a cycle with its package's __init__.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("formats", "edgemoe", "devices", "cluster")

# edgemoe's public API: what code built on edgemoe (cluster/) may import. Everything else in
# edgemoe/ is internal and may change with any commit.
PUBLIC_API = (
    "edgemoe",  # the package: load(), Bytes, __version__
    "edgemoe.generate",  # generation as steps (prefill, decode_step, stream)
    "edgemoe.moe.api",  # the executor seam and the pieces that compute experts
    "edgemoe.memcap",  # capped runs, for benchmarks
)


@dataclass(frozen=True)
class Rule:
    """Modules named `where` (or under it) may import of the project only what `allow` names
    (None: anything) and never what `forbid` names; a name covers its submodules."""

    where: str
    why: str
    allow: tuple[str, ...] | None = None
    forbid: tuple[str, ...] = ()


RULES = (
    Rule(
        "formats", "the ground floor: the file format imports nothing above it", allow=("formats",)
    ),
    Rule(
        "devices", "profiles are data and a profiler: formats/ only", allow=("devices", "formats")
    ),
    Rule(
        "edgemoe.models",
        "model files compute; files, caches, threads and the engine are not theirs",
        forbid=(
            "edgemoe.store",
            "edgemoe.cache",
            "edgemoe.cli",
            "edgemoe.engine",
            "edgemoe.moe.local",
            "threading",
            "concurrent.futures",
        ),
    ),
    Rule(
        "cluster",
        "builds on edgemoe's public API, the format and the device profiles only",
        allow=("cluster", "formats", "devices", *PUBLIC_API),
    ),
)

# Known violations (importer, imported), excused until they are gone; the test fails when one
# no longer exists, so this list cannot outlive them. At f638ab7 it held the cycle
# engine -> bound / planning -> engine and routing -> engine:
#   ("edgemoe.engine", "edgemoe.bound"), ("edgemoe.engine", "edgemoe.planning"),
#   ("edgemoe.planning", "edgemoe.engine"), ("edgemoe.routing", "edgemoe.engine"),
# removed by the engine refactor (issue 13), which landed before this test: nothing is pending.
PENDING: frozenset[tuple[str, str]] = frozenset()


def _covers(name: str, target: str) -> bool:
    return target == name or target.startswith(name + ".")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """module -> the names it imports (project modules resolved, others as written)."""
    files = {
        module_name(root, p): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))
    }
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(_resolve(a.name, files) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join([*pkg, base] if base else pkg)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.add(sub if sub in files else _resolve(base, files))
        targets.discard(mod)
        graph[mod] = targets
    return graph


def _resolve(name: str, files) -> str:
    """The longest prefix of a dotted name that is a project module, else the name."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in files:
            return ".".join(parts[:n])
    return name


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path ending where it starts) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graphs are small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(g)) for g in groups]


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest cycle through the group's first module, staying inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected group without a cycle")


def violations(graph: dict[str, set[str]], rules=RULES) -> list[tuple[str, str, str]]:
    """(importer, imported, why) for every arrow a rule forbids."""
    project = set(graph)
    out = []
    for mod, targets in sorted(graph.items()):
        for rule in rules:
            if not _covers(rule.where, mod):
                continue
            for t in sorted(targets):
                refused = any(_covers(f, t) for f in rule.forbid)
                if rule.allow is not None and t in project:
                    refused |= not any(_covers(a, t) for a in rule.allow)
                if refused:
                    out.append((mod, t, rule.why))
    return out


def without_pending(graph: dict[str, set[str]], pending=PENDING) -> dict[str, set[str]]:
    return {m: {t for t in ts if (m, t) not in pending} for m, ts in graph.items()}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT, PACKAGES)


def test_no_import_cycles(graph):
    found = cycles(without_pending(graph))
    assert not found, "import cycles (break one arrow of each): " + "; ".join(
        " -> ".join(c) for c in found
    )


def test_no_import_against_the_layering(graph):
    found = violations(without_pending(graph))
    assert not found, "imports against the layering:\n" + "\n".join(
        f"  {m} imports {t} ({why})" for m, t, why in found
    )


def test_pending_violations_still_exist(graph):
    gone = sorted((m, t) for m, t in PENDING if t not in graph.get(m, ()))
    assert not gone, f"no longer imported, remove from PENDING: {gone}"


def test_public_api_modules_exist(graph):
    assert [m for m in PUBLIC_API if m not in graph] == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_finds_a_cycle_through_function_local_and_relative_imports(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg import b\n",
            "pkg/b.py": "def f():\n    from .sub import c\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "import pkg.a\nimport threading\n",
            "pkg/d.py": "from pkg.a import thing\n",  # into the cycle, not part of it
        },
    )
    g = import_graph(tmp_path, ("pkg",))
    assert g["pkg.b"] == {"pkg.sub.c"} and g["pkg.d"] == {"pkg.a"}
    assert cycles(g) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    assert cycles(without_pending(g, {("pkg.b", "pkg.sub.c")})) == []


def test_checker_applies_allow_and_forbid(tmp_path):
    _write(
        tmp_path,
        {
            "low/__init__.py": "import json\n",
            "low/x.py": "from high import y\n",
            "high/__init__.py": "",
            "high/y.py": "import low.x\nfrom concurrent.futures import ThreadPoolExecutor\n",
        },
    )
    g = import_graph(tmp_path, ("low", "high"))
    rules = (
        Rule("low", "floor", allow=("low",)),
        Rule("high.y", "no threads", forbid=("concurrent.futures",)),
    )
    assert violations(g, rules) == [
        ("high.y", "concurrent.futures", "no threads"),
        ("low.x", "high.y", "floor"),
    ]
