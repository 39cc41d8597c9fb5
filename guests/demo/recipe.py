"""Build the demo guest: a boot sector and a kernel ELF on a 1 MiB disk image.

Disk layout (512-byte sectors): sector 0 boot sector; sectors 1.. the kernel ELF; sector 2000
is the scratch sector the kernel's disk test writes and reads back; 2048 sectors in all.
Artifacts: disk.img, kernel.elf (with symbols, for analysis and gdb), boot.elf.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

SECTOR = 512
DISK_SECTORS = 2048
SCRATCH_SECTOR = 2000
BOOT = {"disks": ["disk.img"], "symbols": "kernel.elf"}      # how `record --guest demo` boots it
CFLAGS = ["-m32", "-ffreestanding", "-fno-pic", "-fno-pie", "-fno-stack-protector", "-nostdlib",
          "-fno-builtin", "-fno-omit-frame-pointer", "-O2", "-Wall", "-g", "-mno-sse", "-mno-mmx"]


class GuestBuildError(RuntimeError):
    pass


def _run(command: list, cwd: Path) -> None:
    result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise GuestBuildError(f"building the demo guest failed: {' '.join(map(str, command))}\n"
                              f"{result.stderr.strip()}")


def build(src: Path, out: Path) -> None:
    src, out = src.resolve(), out.resolve()
    _run(["gcc", *CFLAGS, "-c", src / "boot.S", "-o", out / "boot.o"], out)
    _run(["ld", "-m", "elf_i386", "-N", "-e", "start", "-Ttext", "0x7C00", "-o", out / "boot.elf",
          out / "boot.o"], out)
    _run(["objcopy", "-S", "-O", "binary", "-j", ".text", out / "boot.elf", out / "boot.bin"], out)
    boot = (out / "boot.bin").read_bytes()
    if len(boot) > 510:
        raise GuestBuildError(f"demo boot sector is {len(boot)} bytes; it must fit in 510")
    for name in ("entry.S", "kernel.c"):
        _run(["gcc", *CFLAGS, "-c", src / name, "-o", out / (name.split(".")[0] + ".o")], out)
    _run(["ld", "-m", "elf_i386", "-T", src / "kernel.ld", "-o", out / "kernel.elf",
          out / "entry.o", out / "kernel.o"], out)
    kernel = (out / "kernel.elf").read_bytes()
    if 1 + (len(kernel) + SECTOR - 1) // SECTOR >= SCRATCH_SECTOR:
        raise GuestBuildError("demo kernel too large for its disk layout")
    image = bytearray(DISK_SECTORS * SECTOR)
    image[:len(boot)] = boot
    image[510:512] = b"\x55\xAA"
    image[SECTOR:SECTOR + len(kernel)] = kernel
    (out / "disk.img").write_bytes(bytes(image))
