"""The package layout: no import cycles among clicooper modules, and one run-directory type.

A cycle is a loop of module-level imports (``import x`` / ``from x import y`` at the top
of a module, in ``try`` blocks too, but not under ``if TYPE_CHECKING``). Importing a
module imports its parent packages first, so those count as edges as well (a module's
own parents only when it imports one by name, e.g. ``import clicooper``). Imports
inside functions run later and are not edges (but should stay rare).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import clicooper
from clicooper.runtime.rundirs import LAUNCH_ARTIFACTS, RUN_ARTIFACTS, RunDir

SRC = Path(clicooper.__file__).resolve().parent


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root``, by dotted name."""
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements run on import: nested ``try``/``if`` bodies, not ``if TYPE_CHECKING``."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" in ast.unparse(node.test):
                out += _top_level(node.orelse)
                continue
            out += _top_level(node.body) + _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _top_level(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                out += _top_level(handler.body)
        else:
            out.append(node)
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports at module level (parents included)."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges: set[str] = set()
        for node in _top_level(ast.parse(path.read_text()).body):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                module = resolve(target)
                if module is None or module == name:
                    continue
                edges.add(module)  # an explicit ``import clicooper`` in a submodule counts
                while "." in module:  # the parents Python imports first, but not our own
                    module = module.rpartition(".")[0]
                    if not name.startswith(module + "."):
                        edges.add(module)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next((c for c in children if c in graph), None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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


def test_no_import_cycles_among_clicooper_modules():
    graph = import_graph(modules(SRC))
    assert "clicooper.runtime.session" in graph["clicooper.runtime.deploy.launcher"]
    assert cycles(graph) == []


#: Modules the light commands (``certs``, ``pool status|down``, ``node status``, ``--help``)
#: import: each CLI subprocess of the suite would pay seconds for torch otherwise.
LIGHT_MODULES = ("clicooper", "clicooper.cli.main", "clicooper.node.pool")


def test_light_modules_do_not_import_torch():
    code = (
        f"import importlib, sys\nfor m in {LIGHT_MODULES!r}:\n    importlib.import_module(m)\n"
        "heavy = sorted({'torch', 'grpc', 'clicooper.api'} & set(sys.modules))\n"
        "assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1]


def test_public_names_load_on_first_use():
    from clicooper import RunConfig, Split, load_dataset, train  # noqa: F401
    from clicooper.api import train as api_train

    assert train is api_train and clicooper.RunConfig is RunConfig
    assert set(clicooper.__all__) <= set(dir(clicooper))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        clicooper.nope  # noqa: B018


def test_the_cycle_check_finds_a_cycle(tmp_path: Path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub.b import f\n")
    (pkg / "sub" / "b.py").write_text("try:\n    import pkg.c\nexcept ImportError:\n    pass\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"
        "def g():\n    import pkg.a\n"
    )
    graph = import_graph(modules(pkg))
    assert cycles(graph) == []  # TYPE_CHECKING and function-local imports are no edges
    (pkg / "c.py").write_text("import pkg.a\n")
    assert cycles(import_graph(modules(pkg))) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (pkg / "__init__.py").write_text("from pkg.a import f\n")  # the package itself, by name
    (pkg / "c.py").write_text("import pkg\n")
    assert cycles(import_graph(modules(pkg))) == [["pkg", "pkg.a", "pkg.c", "pkg.sub.b"]]


def test_run_dir_names_every_artifact_that_a_run_prepares_and_discards(tmp_path: Path):
    run = RunDir(tmp_path)
    paths = [
        run.results,
        run.config,
        run.history,
        run.ledger,
        run.report,
        run.figures,
        run.segment("t1"),
        run.records,
        run.audit,
        run.owner,
        run.party("t2"),
        run.verifier,
        run.checkpoints("t1"),
        run.checkpoints("do"),
        run.deploy,
        run.certs,
        run.logs,
    ]
    tops = {path.relative_to(tmp_path).parts[0] for path in paths}
    assert tops == set(RUN_ARTIFACTS) | set(LAUNCH_ARTIFACTS)
    assert run.checkpoints("do") == tmp_path / "owner" / "checkpoints"
    assert run.segment("t1") == tmp_path / "segments" / "t1.safetensors"
    assert RunDir(str(tmp_path)) == run
