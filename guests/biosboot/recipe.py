"""Build biosboot: a disk image that boots through replayvm's BIOS (`--machine pc`).

One assembly file linked at 0x7C00: the boot sector, then stage 2, which the boot sector loads
with int 0x13 AH=0x42. disk.img is padded to 16 sectors.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

SECTOR = 512
DISK_SECTORS = 16
BOOT = {"disks": ["disk.img"], "machine": "pc"}      # how `record --guest biosboot` boots it


def _run(command: list) -> None:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"building biosboot failed: {' '.join(map(str, command))}\n{result.stderr}")


def build(src: Path, out: Path) -> None:
    src, out = src.resolve(), out.resolve()
    # Assemble once to learn stage 2's size, then with the sector count the boot sector loads.
    _run(["gcc", "-m32", "-c", "-DSTAGE2_SECTORS=1", src / "boot.S", "-o", out / "boot.o"])
    _run(["ld", "-m", "elf_i386", "-N", "-e", "start", "-Ttext", "0x7C00", "-o", out / "boot.elf", out / "boot.o"])
    _run(["objcopy", "-O", "binary", "-j", ".text", out / "boot.elf", out / "boot.bin"])
    sectors = (len((out / "boot.bin").read_bytes()) + SECTOR - 1) // SECTOR - 1
    _run(["gcc", "-m32", "-c", f"-DSTAGE2_SECTORS={sectors}", src / "boot.S", "-o", out / "boot.o"])
    _run(["ld", "-m", "elf_i386", "-N", "-e", "start", "-Ttext", "0x7C00", "-o", out / "boot.elf", out / "boot.o"])
    _run(["objcopy", "-O", "binary", "-j", ".text", out / "boot.elf", out / "boot.bin"])
    image = (out / "boot.bin").read_bytes()
    if len(image) > DISK_SECTORS * SECTOR:
        raise RuntimeError("biosboot grew past its disk")
    (out / "disk.img").write_bytes(image.ljust(DISK_SECTORS * SECTOR, b"\0"))
