"""Build the small test guests PVM's KVM can run: flat binaries, no C, no paging.

realmode.bin is linked at 0x7C00 (a boot sector's place, entered in real mode at 0:7C00);
pm32.bin at 0x1000 (entered in flat 32-bit protected mode by the VMM).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

GUESTS = {"realmode": 0x7C00, "pm32": 0x1000}


def _run(command: list) -> None:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"building a kvm test guest failed: {' '.join(map(str, command))}\n{result.stderr}")


def build(src: Path, out: Path) -> None:
    src, out = src.resolve(), out.resolve()
    for name, base in GUESTS.items():
        _run(["gcc", "-m32", "-c", src / f"{name}.S", "-o", out / f"{name}.o"])
        _run(["ld", "-m", "elf_i386", "-N", "-e", "start", "-Ttext", hex(base), "-o", out / f"{name}.elf",
              out / f"{name}.o"])
        _run(["objcopy", "-O", "binary", "-j", ".text", out / f"{name}.elf", out / f"{name}.bin"])
