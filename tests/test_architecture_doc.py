"""docs/architecture.md stays true to the tree: every file and folder it names exists, and every
function or class it names in `file.py` `Name` pairs is defined there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
PATH = re.compile(r"`((?:replayvm|guests|tests|docs|traces)/[\w./<>-]*|[\w-]+\.(?:py|md))`")
FOLDERS = ("replayvm", "replayvm/record", "replayvm/replay", "replayvm/analyze", "replayvm/trace",
           "replayvm/devices", "replayvm/engines", "replayvm/boot", "",
           "guests/demo")                      # `recipe.py`: every guest has one


def named_paths(text: str) -> set[str]:
    return {match.group(1) for match in PATH.finditer(text) if "<" not in match.group(1)}


def resolve(name: str) -> Path | None:
    """A path as the doc writes it: from the root, or short (`recorder.py` under replayvm/...)."""
    for folder in FOLDERS:
        candidate = ROOT / folder / name
        if candidate.exists():
            return candidate
    return None


def test_every_path_the_architecture_page_names_exists():
    missing = sorted(name for name in named_paths(DOC.read_text()) if resolve(name) is None)
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_every_function_named_beside_its_file_is_defined_there():
    text = DOC.read_text()
    problems = []
    for match in re.finditer(r"`([\w.]+)` \(`([\w/]+\.py)`\)", text):
        name, file = match.group(1).split(".")[-1], match.group(2)
        path = resolve(file)
        assert path is not None, file
        tree = ast.parse(path.read_text())
        defined = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        defined |= {node.attr for node in ast.walk(tree)                  # self.append = ...
                    if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)}
        if name not in defined:
            problems.append(f"{match.group(1)} in {file}")
    assert not problems, problems


def test_the_readme_links_it():
    assert "(docs/architecture.md)" in (ROOT / "README.md").read_text()
