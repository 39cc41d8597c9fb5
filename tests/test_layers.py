"""The package's layers, and no import circles: read from the source with `ast`, no module run.

    cli                          argument parsing and printing
    record/ replay/ analyze/     what a user asks for: a session, a replay, a database
    machine.py chaos.py boot/    one PC, built the same way for record and replay (schedule.py:
                                 which of its CPUs runs when)
    devices/ engines/ bus.py     its parts
    trace/                       the trace codec
    hw.py errors.py              facts and errors everyone shares

A module imports from its own layer or the ones below, never above: a device or an engine that
imported `record/` would make recording and replay two different machines again (that is how
`machine.py` once reached up into `record/chaos.py`). Among the sessions, only `record/` (and
`cli`) import `record/`. Every import counts, at any depth: one inside a function or under
`if TYPE_CHECKING:` is still an arrow between the modules, and an import circle hidden inside a
function (`timeline.py` <-> `checkpoint_file.py` once) is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "replayvm"
# guests/ is installed as replayvm.guests (pyproject's package-dir).
SOURCE_ROOTS = {"replayvm": ROOT / "replayvm", "replayvm.guests": ROOT / "guests"}

# Top first. A module belongs to the layer of the longest prefix that names it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("replayvm.cli",)),
    ("sessions", ("replayvm.record", "replayvm.replay", "replayvm.analyze")),
    ("machine", ("replayvm.machine", "replayvm.chaos", "replayvm.schedule", "replayvm.boot",
                 "replayvm.guests")),
    ("parts", ("replayvm.devices", "replayvm.engines", "replayvm.bus", "replayvm.clock",
               "replayvm.console")),
    ("codec", ("replayvm.trace",)),
    ("base", ("replayvm", "replayvm.hw", "replayvm.errors", "replayvm.progress")),
]
# Who may import a package beside its own layer's others: record/ is imported by cli alone.
ONLY_IMPORTED_BY = {"replayvm.record": ("replayvm.record", "replayvm.cli")}
# Arrows that break a rule above and cannot be avoided yet: (importer, imported) -> why.
EXCEPTIONS: dict[tuple[str, str], str] = {}


# ---------------------------------------------------------------------------------- the graph
def module_files() -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its __init__.py)."""
    modules = {}
    for package, folder in SOURCE_ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if "build" in parts:
                continue
            if package == "replayvm.guests" and len(parts) > 1:
                continue                        # the guests' recipes are loaded by path, not imported
            name = ".".join((package, *parts)).removesuffix(".__init__")
            modules[name] = path
    return modules


def imports_of(source: str, name: str, is_package: bool, modules: set[str]) -> dict[str, int]:
    """The package's modules that `source` (module `name`) imports, at any depth, with the line
    of the first such import. `from X import y` names module X.y when y is a module, else X."""
    found: dict[str, int] = {}
    here = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source, name)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                       for alias in node.names]
        for target in targets:
            while target and target not in modules:      # `import replayvm.x.y` reaches x.y
                target = target.rpartition(".")[0]
            if target and target != name:
                found.setdefault(target, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    files = module_files()
    names = set(files)
    return {name: imports_of(path.read_text(), name, path.name == "__init__.py", names)
            for name, path in files.items()}


def layer_of(module: str) -> int:
    """Index in LAYERS (0 is the top) of the longest prefix naming `module`."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_violations(graph: dict[str, dict[str, int]], files: dict[str, Path] | None = None) -> list[str]:
    problems = []
    for importer, imported in sorted(graph.items()):
        for target, line in sorted(imported.items()):
            if (importer, target) in EXCEPTIONS:
                continue
            where = f"{files[importer].relative_to(ROOT)}:{line}" if files else importer
            if layer_of(target) < layer_of(importer):
                problems.append(f"{where}: {importer} ({LAYERS[layer_of(importer)][0]}) imports "
                                f"{target} ({LAYERS[layer_of(target)][0]}), a layer above it")
            for package, importers in ONLY_IMPORTED_BY.items():
                if _within(target, package) and not any(_within(importer, p) for p in importers):
                    problems.append(f"{where}: {importer} imports {target}; only "
                                    f"{', '.join(importers)} may import {package}")
    return problems


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each
    sorted; a module importing itself does not count."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


# ---------------------------------------------------------------------------------- the checker
def test_the_checker_sees_imports_in_functions_and_under_type_checking():
    modules = {"replayvm.a", "replayvm.b", "replayvm.c", "replayvm.pkg", "replayvm.pkg.mod"}
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from replayvm.b import B\n"
              "def f():\n    from replayvm.pkg import mod\n    import replayvm.c.inner\n"
              "from replayvm.pkg import something\nimport os\n")
    assert imports_of(source, "replayvm.a", False, modules) == {
        "replayvm.b": 3, "replayvm.pkg.mod": 5, "replayvm.c": 6, "replayvm.pkg": 7}
    assert imports_of("from . import mod\nfrom .. import a\n", "replayvm.pkg.other", False,
                      modules) == {"replayvm.pkg.mod": 1, "replayvm.a": 2}


def test_the_checker_finds_a_circle_and_an_arrow_upwards():
    graph = {"replayvm.replay.timeline": {"replayvm.replay.checkpoint_file": 81},
             "replayvm.replay.checkpoint_file": {"replayvm.replay.timeline": 31},
             "replayvm.machine": {"replayvm.record.chaos": 105},
             "replayvm.analyze.loader": {"replayvm.record.recorder": 1},
             "replayvm.record.chaos": {}, "replayvm.record.recorder": {}}
    assert import_cycles(graph) == [["replayvm.replay.checkpoint_file", "replayvm.replay.timeline"]]
    problems = layer_violations(graph)
    assert len(problems) == 3, problems
    assert any("replayvm.machine (machine) imports replayvm.record.chaos (sessions)" in p for p in problems)
    assert any("replayvm.analyze.loader imports replayvm.record.recorder" in p for p in problems)


def test_every_module_has_a_layer_and_the_lower_layers_are_named_as_the_brief_has_them():
    for module in module_files():
        layer_of(module)
    assert layer_of("replayvm.machine") > layer_of("replayvm.record.session")
    for low in ("replayvm.machine", "replayvm.devices.uart", "replayvm.engines.emu", "replayvm.trace.writer"):
        for high in ("replayvm.record.recorder", "replayvm.replay.replayer", "replayvm.analyze.loader",
                     "replayvm.cli"):
            assert layer_of(low) > layer_of(high), (low, high)


# ---------------------------------------------------------------------------------- the tree
def test_no_module_imports_from_a_layer_above_it():
    files = module_files()
    problems = layer_violations(import_graph(), files)
    assert not problems, "imports against the layering (see tests/test_layers.py):\n" + "\n".join(problems)


def test_no_import_circles_among_the_package_modules():
    cycles = import_cycles(import_graph())
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_graph_is_the_real_one():
    graph = import_graph()
    assert "replayvm.machine" in graph["replayvm.record.session"]
    assert "replayvm.chaos" in graph["replayvm.machine"]
    assert "replayvm.analyze.sql" in graph["replayvm.analyze"]
    assert "replayvm.guests" in graph["replayvm.record.session"]
