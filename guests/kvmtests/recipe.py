"""Build the small test guests PVM's KVM can run: flat binaries, no C, no paging.

realmode.bin is linked at 0x7C00 (a boot sector's place, entered in real mode at 0:7C00);
pm32.bin at 0x1000 (entered in flat 32-bit protected mode by the VMM); long64.bin at 0x1000
(entered in 64-bit long mode with identity-mapped 2 MiB pages).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

GUESTS = {"realmode": 0x7C00, "pm32": 0x1000, "long64": 0x1000}


def _run(command: list) -> None:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"building a kvm test guest failed: {' '.join(map(str, command))}\n{result.stderr}")


def build(src: Path, out: Path) -> None:
    src, out = src.resolve(), out.resolve()
    for name, base in GUESTS.items():
        bits, emulation = ("-m64", "elf_x86_64") if name == "long64" else ("-m32", "elf_i386")
        _run(["gcc", bits, "-c", src / f"{name}.S", "-o", out / f"{name}.o"])
        _run(["ld", "-m", emulation, "-N", "-e", "start", "-Ttext", hex(base), "-o", out / f"{name}.elf",
              out / f"{name}.o"])
        _run(["objcopy", "-O", "binary", "-j", ".text", out / f"{name}.elf", out / f"{name}.bin"])
