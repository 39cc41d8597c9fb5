"""Build rustos, the Rust teaching kernel: a multiboot kernel ELF (64-bit, with symbols) and a
small IDE disk for its `disk` command.

The toolchain is Debian's packaged Rust with its library sources (`apt-get install rustc-web
cargo-web rust-web-src`): `core` is built from those sources for the soft-float
`x86_64-unknown-none` target (build-std; PVM cannot run SSE in kernel code, and the prebuilt
cores of rustup toolchains use it), offline, with the crates `core` needs taken from the
sources' `library/vendor`. rustup's toolchains (no rust-src here) are deliberately not used:
the build names /usr/bin/rustc and /usr/bin/cargo. It runs in a copy of the sources with its
own CARGO_HOME and target folder, so nothing outside `out` is written.

Artifacts: kernel.elf (boot it with `record --kernel`), disk.img (sector 1 holds DISK_TEXT).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from replayvm.errors import ReplayVMError

RUSTC = "/usr/bin/rustc"           # REPLAYVM_RUSTC / REPLAYVM_CARGO override them
CARGO = "/usr/bin/cargo"
PACKAGES = "apt-get install rustc-web cargo-web rust-web-src"
SOURCES = ("Cargo.toml", ".cargo/config.toml", "kernel.ld", "src")
SECTOR = 512
DISK_SECTORS = 64
DISK_TEXT = b"hello from the IDE disk, sector 1"
BUILD_TIMEOUT_S = 900
# How `record --guest rustos` boots it: by multiboot, its disk for the `disk` command; 64-bit.
BOOT = {"kernel": "kernel.elf", "disks": ["disk.img"], "symbols": "kernel.elf", "long_mode": True}


class GuestBuildError(ReplayVMError):
    """rustos could not be built (the toolchain is missing, or the build failed)."""


def toolchain() -> tuple[Path, Path, Path]:
    """(rustc, cargo, library/vendor) of the Debian toolchain, or a one-line error naming the
    packages that provide them."""
    missing = f"building the rustos guest needs Debian's Rust toolchain and its sources: {PACKAGES}"
    rustc = Path(os.environ.get("REPLAYVM_RUSTC", RUSTC))
    cargo = Path(os.environ.get("REPLAYVM_CARGO", CARGO))
    if not (rustc.is_file() and cargo.is_file()):
        raise GuestBuildError(f"{missing} (no {rustc if not rustc.is_file() else cargo})")
    try:
        sysroot = subprocess.run([str(rustc), "--print", "sysroot"], capture_output=True, text=True,
                                 check=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        raise GuestBuildError(f"{missing} ({rustc} does not run: {error})") from None
    library = Path(sysroot) / "lib" / "rustlib" / "src" / "rust" / "library"
    vendor = library / "vendor"
    if not (library / "core").is_dir() or not vendor.is_dir():
        raise GuestBuildError(f"{missing} (no Rust library sources under {library})")
    return rustc, cargo, vendor


def _readable_symbols(kernel: Path, work: Path) -> None:
    """Give the kernel's functions their Rust paths (`rustos::ide::read_sector`) instead of their
    mangled names, so that `analyze --symbols` and gdb show them as written. Names with spaces
    (trait impls, generics) keep their mangled form: objcopy's rename list is space-separated."""
    def names(*flags: str) -> list[str]:
        result = subprocess.run(["nm", "--defined-only", *flags, str(kernel)], capture_output=True,
                                text=True)
        if result.returncode:
            raise GuestBuildError(f"building the rustos guest failed: nm: {result.stderr.strip()}")
        return [line.split(" ", 2)[2] for line in result.stdout.splitlines() if line.count(" ") >= 2]

    mangled, demangled = names(), names("--demangle")
    renames = {old: new for old, new in zip(mangled, demangled) if old != new and " " not in new}
    if len(renames) != len(set(renames.values())) or len(mangled) != len(demangled):
        return                                           # ambiguous: keep the mangled names
    rename_file = work / "symbols.txt"
    rename_file.write_text("".join(f"{old} {new}\n" for old, new in renames.items()))
    result = subprocess.run(["objcopy", f"--redefine-syms={rename_file}", str(kernel)],
                            capture_output=True, text=True)
    if result.returncode:
        raise GuestBuildError(f"building the rustos guest failed: objcopy: {result.stderr.strip()}")


def build(src: Path, out: Path) -> None:
    rustc, cargo, vendor = toolchain()
    src, out = src.resolve(), out.resolve()
    work = out / "build"
    for name in SOURCES:
        if (src / name).is_dir():
            shutil.copytree(src / name, work / name)
        else:
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, work / name)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CARGO", "RUST"))}
    env.update(RUSTC=str(rustc), RUSTC_BOOTSTRAP="1",        # build-std is a nightly feature
               CARGO_HOME=str(work / "cargo-home"), CARGO_TARGET_DIR=str(work / "target"))
    command = [str(cargo), "build", "--release", "--offline",
               "--config", f"source.vendored.directory={str(vendor)!r}".replace("'", '"')]
    try:
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True,
                                timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as error:
        raise GuestBuildError(f"building the rustos guest failed: {error}") from None
    if result.returncode:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
        raise GuestBuildError(f"building the rustos guest failed: {' '.join(command)}: "
                              f"{errors[0] if errors else result.stderr.strip()[-300:]}")
    kernel = out / "kernel.elf"
    shutil.copy2(work / "target" / "x86_64-unknown-none" / "release" / "rustos", kernel)
    _readable_symbols(kernel, work)
    image = bytearray(DISK_SECTORS * SECTOR)
    image[SECTOR:SECTOR + len(DISK_TEXT)] = DISK_TEXT
    (out / "disk.img").write_bytes(bytes(image))
    shutil.rmtree(work)
