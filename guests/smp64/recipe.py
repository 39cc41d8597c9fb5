"""Build the smp64 test guest: kernel.elf, an ELF64 multiboot kernel for two CPUs that PVM's KVM
can run (see kernel.S): the BSP starts the AP by INIT and STARTUP IPIs through a real-mode
trampoline, and both CPUs print, take a spinlock and race on a counter.

It is linked at 1 MiB with physical = virtual addresses; its multiboot header carries the
a.out kludge, so loaders that only take 32-bit ELF files load it too.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

BOOT = {"kernel": "kernel.elf", "symbols": "kernel.elf", "long_mode": True}   # `record --guest smp64 --cpus 2`


def _run(command: list) -> None:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"building the smp64 guest failed: {' '.join(map(str, command))}\n{result.stderr}")


def build(src: Path, out: Path) -> None:
    src, out = src.resolve(), out.resolve()
    _run(["gcc", "-m64", "-c", src / "kernel.S", "-o", out / "kernel.o"])
    _run(["ld", "-m", "elf_x86_64", "-N", "-T", src / "kernel.ld", "-o", out / "kernel.elf", out / "kernel.o"])
