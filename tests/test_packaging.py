"""A non-editable install must ship every package: pyproject.toml lists them by hand."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "replayvm").rglob("__init__.py")}
    assert found <= listed, f"missing from pyproject.toml: {sorted(found - listed)}"
    assert "replayvm.guests" in listed


def test_every_guest_source_is_package_data():
    """`pip install .` must ship what a bundled guest builds from (its recipe's sources: C,
    assembly, Rust, Cargo.toml, .cargo/config.toml, linker scripts), or it cannot be built."""
    import fnmatch

    from replayvm.guests import SOURCE_SUFFIXES

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["replayvm.guests"]
    guests = ROOT / "guests"
    sources = [path.relative_to(guests).as_posix() for path in guests.rglob("*")
               if path.is_file() and path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts
               and path.parent != guests]
    assert any(s.endswith(".rs") for s in sources) and "rustos/.cargo/config.toml" in sources
    unshipped = [s for s in sources if not any(fnmatch.fnmatchcase(s, p) and s.count("/") == p.count("/")
                                               for p in patterns)]
    assert not unshipped, f"guest sources missing from package-data: {unshipped}"
