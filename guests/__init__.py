"""replayvm's own guest kernels, built from source with the system gcc/ld on first use.

Each guest is a folder here with its sources and a `recipe.py` defining
`build(src: Path, out: Path) -> None`, which compiles into `out`; a guest `replayvm record --guest`
can boot also says how, in a `BOOT` dict: `kernel` (a multiboot artifact) and/or `disks`
(artifacts in IDE order), `symbols` (the ELF for `analyze --symbols`), `long_mode` (a 64-bit
guest, which the kvm engine here can run), `machine` ("pc" for a guest that boots through
replayvm's BIOS; default "mp"). Builds are cached under
`$REPLAYVM_CACHE` (default `~/.cache/replayvm`) in a folder named by a hash of the sources, so
editing a source rebuilds and an unchanged tree is built once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from replayvm.errors import ReplayVMError, UsageError

GUESTS_DIR = Path(__file__).resolve().parent
SOURCE_SUFFIXES = {".c", ".S", ".h", ".ld", ".py", ".rs", ".toml"}


def cache_root() -> Path:
    return Path(os.environ.get("REPLAYVM_CACHE", Path.home() / ".cache" / "replayvm"))


def _source_hash(src: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(src.rglob("*")):
        if path.is_file() and path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _recipe(name: str) -> ModuleType:
    recipe_file = GUESTS_DIR / name / "recipe.py"
    if not name.isidentifier() or not recipe_file.is_file():
        raise ReplayVMError(f"no bundled guest named {name!r}")
    spec = importlib.util.spec_from_file_location(f"replayvm_guest_recipe_{name}", recipe_file)
    assert spec is not None and spec.loader is not None
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def build_guest(name: str) -> Path:
    """Build guest `name` if needed and return the folder holding its artifacts."""
    src = GUESTS_DIR / name
    recipe = _recipe(name)
    out = cache_root() / "guests" / f"{name}-{_source_hash(src)}"
    if (out / ".built").exists():
        return out
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


def bootable_guests() -> list[str]:
    """The bundled guests `record --guest` can boot (their recipe has a BOOT), by name."""
    return sorted(path.parent.name for path in GUESTS_DIR.glob("*/recipe.py")
                  if "BOOT =" in path.read_text())


@dataclass(frozen=True)
class GuestBoot:
    """How to boot a bundled guest: its built artifacts."""

    kernel: Path | None
    disks: list[Path] = field(default_factory=list)
    symbols: Path | None = None
    long_mode: bool = False
    machine: str = "mp"


def guest_boot(name: str) -> GuestBoot:
    """Build bundled guest `name` if needed and say how to boot it."""
    if name not in bootable_guests():
        raise UsageError(f"no bundled guest named {name!r} to boot (choose {', '.join(bootable_guests())})")
    boot = _recipe(name).BOOT
    kernel = boot.get("kernel")
    symbols = boot.get("symbols")
    return GuestBoot(kernel=guest_file(name, kernel) if kernel else None,
                     disks=[guest_file(name, disk) for disk in boot.get("disks", ())],
                     symbols=guest_file(name, symbols) if symbols else None,
                     long_mode=bool(boot.get("long_mode", False)),
                     machine=str(boot.get("machine", "mp")))
