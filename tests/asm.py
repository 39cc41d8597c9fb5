"""Assemble small test guests with the system toolchain (GNU as via gcc, objcopy)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path


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
