"""Assemble small test guests with the system toolchain (GNU as via gcc, objcopy)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

# A boot sector's way into flat 32-bit protected mode without paging (runs on kvm and emu):
# ENTER_FLAT_PM32 first, then the guest's 32-bit code continues at `pm` with DS, ES and SS
# loaded; FLAT_GDT (the GDT and its descriptor) goes at the end of the source.
ENTER_FLAT_PM32 = """
    cli
    lgdt gdtdesc
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmp $8, $pm
.code32
pm:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
"""
FLAT_GDT = """
.p2align 3
gdt: .quad 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF
gdtdesc: .word 23
    .long gdt
"""


def assemble(source: str, base: int, bits: int = 32) -> bytes:
    """Assemble GNU-as `source` linked at `base` into a flat binary."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "t.S").write_text(f".code{bits}\n.text\n.globl _start\n_start:\n{source}\n")
        for command in (["gcc", "-m32", "-c", "-o", d / "t.o", d / "t.S"],
                        ["ld", "-m", "elf_i386", "-Ttext", hex(base), "-e", "_start", "-o", d / "t.elf", d / "t.o"],
                        ["objcopy", "-O", "binary", "-j", ".text", d / "t.elf", d / "t.bin"]):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"{command[0]} failed: {result.stderr}")
        return (d / "t.bin").read_bytes()
