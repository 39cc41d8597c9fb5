"""Every import comes from a declared dependency, and every module imports in a clean interpreter.

`replayvm analyze` on a terminal once crashed with `No module named 'tqdm'`: the bar was imported
inside a function, only on a tty, from a package replayvm never declared. Two checks keep that
from coming back:
- a scan of the source (every `import`, at any depth, and `importlib.import_module("...")`):
  each top-level name must be the standard library, replayvm itself, or a module provided by a
  distribution pyproject.toml declares (a dependency of a dependency is not enough: it may go);
- every module imported in an isolated interpreter (`python -I`: no user site, no PYTHONPATH).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OWN = {"replayvm"}                          # the package itself (guests/ installs as replayvm.guests)
SOURCE_DIRS = ("replayvm", "guests")        # what `pip install .` ships
DEVELOPER_DIRS = ("tests", "bench")         # run from a checkout with the test extra installed
DEVELOPER_LOCAL = {"tests", "bench_figures", "bench_boot", "bench_usertests"}   # bench scripts import their siblings


def requirement_name(requirement: str) -> str:
    """The distribution name of a PEP 508 requirement ("sqlite-utils>=3.36" -> "sqlite-utils")."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"unreadable requirement {requirement!r}"
    return normalized(match.group(1))


def normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def declared_distributions(*, extras: tuple[str, ...] = ()) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return {requirement_name(r) for r in requirements}


def importable_names(distributions: set[str]) -> set[str]:
    """Top-level module names the installed `distributions` provide."""
    provided = importlib.metadata.packages_distributions()
    return {name for name, dists in provided.items() if any(normalized(d) in distributions for d in dists)}


def allowed_names(*, extras: tuple[str, ...] = (), local: set[str] = frozenset()) -> set[str]:
    return set(sys.stdlib_module_names) | OWN | set(local) | importable_names(declared_distributions(extras=extras))


def imported_names(source: str, filename: str = "<snippet>") -> list[tuple[int, str]]:
    """(line, top-level module name) of every absolute import in `source`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and _is_dynamic_import(node.func)):
            found.append((node.lineno, node.args[0].value.split(".")[0]))
    return found


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def undeclared_imports(source: str, allowed: set[str], filename: str = "<snippet>") -> list[str]:
    return [f"{filename}:{line}: {name}" for line, name in imported_names(source, filename)
            if name not in allowed and name != "__future__"]


def python_files(*dirs: str) -> list[Path]:
    return sorted(path for folder in dirs for path in (ROOT / folder).rglob("*.py")
                  if "build" not in path.relative_to(ROOT).parts)


# ---------------------------------------------------------------------------------- the checker
def test_the_checker_catches_an_undeclared_import_inside_a_function():
    # What cli.py did: tqdm imported only when stderr is a tty.
    snippet = "import os\n\ndef bar():\n    if os.isatty(2):\n        from tqdm import tqdm\n"
    assert undeclared_imports(snippet, allowed_names()) == ["<snippet>:5: tqdm"]


def test_the_checker_sees_every_form_of_import():
    snippet = ("import json, tabulate_x.sub as t\nfrom zzz.y import q\nfrom . import sibling\n"
               "import importlib\nimportlib.import_module('dyn.mod')\n__import__('other')\n")
    assert [name for _, name in imported_names(snippet)] == ["json", "tabulate_x", "zzz", "importlib",
                                                              "dyn", "other"]
    assert undeclared_imports(snippet, allowed_names()) == [
        "<snippet>:1: tabulate_x", "<snippet>:2: zzz", "<snippet>:5: dyn", "<snippet>:6: other"]


def test_a_dependency_of_a_dependency_is_not_declared():
    # tabulate comes with sqlite-utils today; code that imports it must declare it itself.
    allowed = importable_names({"sqlite-utils"})
    assert "sqlite_utils" in allowed and "tabulate" not in allowed


def test_declared_dependencies_are_read_from_pyproject():
    declared = declared_distributions()
    assert {"msgpack", "zstandard", "sqlite-utils", "unicorn", "cffi"} <= declared
    assert "pytest" not in declared and "pytest" in declared_distributions(extras=("test",))


# ---------------------------------------------------------------------------------- the tree
def test_every_import_in_the_package_is_declared():
    allowed = allowed_names()
    problems = []
    for path in python_files(*SOURCE_DIRS):
        problems += undeclared_imports(path.read_text(), allowed, str(path.relative_to(ROOT)))
    assert not problems, "imports of undeclared packages (add them to pyproject.toml):\n" + "\n".join(problems)


def test_every_import_in_tests_and_bench_is_declared_with_the_test_extra():
    allowed = allowed_names(extras=("test",), local=DEVELOPER_LOCAL)
    problems = []
    for path in python_files(*DEVELOPER_DIRS):
        problems += undeclared_imports(path.read_text(), allowed, str(path.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


IMPORT_EVERYTHING = r"""
import importlib, importlib.util, pkgutil, sys
root = sys.argv[1]
sys.path.insert(0, root)
assert sys.flags.isolated and sys.flags.no_user_site
import replayvm
assert replayvm.__file__.startswith(root), replayvm.__file__
# guests/ is installed as replayvm.guests (pyproject's package-dir): give it that name here too.
spec = importlib.util.spec_from_file_location("replayvm.guests", f"{root}/guests/__init__.py",
                                              submodule_search_locations=[f"{root}/guests"])
guests = importlib.util.module_from_spec(spec)
sys.modules["replayvm.guests"] = guests
spec.loader.exec_module(guests)
names = ["replayvm", "replayvm.guests"]
for package in (replayvm, guests):
    names += [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".",
                                                          onerror=lambda name: sys.exit(f"cannot walk {name}"))]
for name in names:
    origin = importlib.util.find_spec(name).origin or ""
    if origin.endswith(".so"):
        continue          # a cffi extension: its wrapper (engines/emu.py, kvm.py) loads it, after its library
    importlib.import_module(name)
for recipe in sorted(__import__("pathlib").Path(root, "guests").glob("*/recipe.py")):
    spec = importlib.util.spec_from_file_location(f"recipe_{recipe.parent.name}", recipe)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    names.append(str(recipe))
print("\n".join(names))
"""


def test_every_module_imports_in_an_isolated_interpreter():
    result = subprocess.run([sys.executable, "-I", "-c", IMPORT_EVERYTHING, str(ROOT)],
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                            cwd="/")
    assert result.returncode == 0, result.stderr
    imported = set(result.stdout.split())
    expected = {".".join(path.with_suffix("").relative_to(ROOT).parts).removesuffix(".__init__")
                for path in python_files("replayvm")}
    expected |= {str(path) for path in (ROOT / "guests").glob("*/recipe.py")}
    assert expected <= imported, sorted(expected - imported)
    assert {"replayvm.cli", "replayvm.progress", "replayvm.guests"} <= imported
