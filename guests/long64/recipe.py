"""Build the long64 test guest: ELF64 multiboot kernels from kernel.S: kernel.elf, and
kernel-syscall.elf (-DWITH_SYSCALL: also system calls by `syscall`/`sysretq`, which PVM cannot
run from user mode) and kernel-pvm.elf (-DFOR_PVM: waits for its ticks with HLT, ticks every 5 ms;
kernel.elf records and replays exactly on kvm too, see kernel.S).

It is linked at 1 MiB with physical = virtual addresses; its multiboot header carries the
a.out kludge, so loaders that only take 32-bit ELF files load it too.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

BOOT = {"kernel": "kernel.elf", "symbols": "kernel.elf"}   # `record --guest long64` (emu: see kernel-pvm.elf)


def _run(command: list) -> None:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"building the long64 guest failed: {' '.join(map(str, command))}\n{result.stderr}")


def build(src: Path, out: Path) -> None:
    src, out = src.resolve(), out.resolve()
    for name, defines in (("kernel", []), ("kernel-syscall", ["-DWITH_SYSCALL"]), ("kernel-pvm", ["-DFOR_PVM"])):
        _run(["gcc", "-m64", *defines, "-c", src / "kernel.S", "-o", out / f"{name}.o"])
        _run(["ld", "-m", "elf_x86_64", "-N", "-T", src / "kernel.ld", "-o", out / f"{name}.elf",
              out / f"{name}.o"])
