"""replayvm's own guest kernels, built from source with the system gcc/ld on first use.

Each guest is a folder here with its sources and a `recipe.py` defining
`build(src: Path, out: Path) -> None`, which compiles into `out`. Builds are cached under
`$REPLAYVM_CACHE` (default `~/.cache/replayvm`) in a folder named by a hash of the sources, so
editing a source rebuilds and an unchanged tree is built once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from replayvm.errors import ReplayVMError

GUESTS_DIR = Path(__file__).resolve().parent
SOURCE_SUFFIXES = {".c", ".S", ".h", ".ld", ".py"}


def cache_root() -> Path:
    return Path(os.environ.get("REPLAYVM_CACHE", Path.home() / ".cache" / "replayvm"))


def _source_hash(src: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(src.rglob("*")):
        if path.is_file() and path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_guest(name: str) -> Path:
    """Build guest `name` if needed and return the folder holding its artifacts."""
    src = GUESTS_DIR / name
    recipe_file = src / "recipe.py"
    if not recipe_file.is_file():
        raise ReplayVMError(f"no bundled guest named {name!r}")
    out = cache_root() / "guests" / f"{name}-{_source_hash(src)}"
    if (out / ".built").exists():
        return out
    spec = importlib.util.spec_from_file_location(f"replayvm_guest_recipe_{name}", recipe_file)
    assert spec is not None and spec.loader is not None
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        recipe.build(src, tmp)
        (tmp / ".built").touch()
        try:
            tmp.rename(out)
        except OSError:            # built concurrently by another process: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def guest_file(name: str, artifact: str) -> Path:
    """Path of one built artifact of a bundled guest, e.g. guest_file('demo', 'disk.img')."""
    path = build_guest(name) / artifact
    if not path.exists():
        raise ReplayVMError(f"bundled guest {name!r} has no artifact {artifact!r}")
    return path
