"""Tiny guests for whole-session tests: a boot sector (real mode) or a multiboot kernel (flat
32-bit protected mode, no paging), assembled from a snippet, recorded through the real session
code (`run_session`) on either engine. Both kinds run on kvm here (PVM) and on emu.

Snippets end the session with `SHUTDOWN` (the debug exit port's two-write sequence) so that a
recording ends at a point the guest chose, not at a host-timed timeout.
"""

from __future__ import annotations

import io
import subprocess
import tempfile
from pathlib import Path

from replayvm import hw
from replayvm.errors import GuestFault
from replayvm.record.session import SessionOptions, run_session
from tests.asm import assemble

SHUTDOWN = f"""
    movw    ${hw.DEBUG_EXIT_PORT:#x}, %dx
    movw    $0x8A00, %ax
    outw    %ax, %dx
    movw    $0x8AE0, %ax
    outw    %ax, %dx
1:  jmp     1b
"""

MULTIBOOT_HEADER = """
    .align 4
    .long 0x1BADB002, 0, -0x1BADB002
"""


def boot_disk(directory: Path, source: str, name: str = "boot.img") -> Path:
    """A one-sector disk whose boot sector is `source` (16-bit code at 0:7C00)."""
    code = assemble(source, hw.BOOT_SECTOR_ADDR, bits=16)
    if len(code) > 510:
        raise ValueError(f"boot sector code is {len(code)} bytes (at most 510)")
    path = directory / name
    path.write_bytes(code.ljust(510, b"\0") + b"\x55\xAA")
    return path


def multiboot_kernel(directory: Path, source: str, name: str = "kernel.elf") -> Path:
    """A multiboot ELF linked at 1 MiB whose entry runs `source` (32-bit flat protected mode)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "k.S").write_text(f".code32\n.text\n.globl _start\n{MULTIBOOT_HEADER}\n_start:\n{source}\n")
        elf = directory / name
        for command in (["gcc", "-m32", "-c", "-o", d / "k.o", d / "k.S"],
                        ["ld", "-m", "elf_i386", "-N", "-Ttext", "0x100000", "-e", "_start", "-o", elf,
                         d / "k.o"]):
            result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"{command[0]} failed: {result.stderr}")
    return elf


def record(trace: Path, engine: str, disk: Path | None = None, kernel: Path | None = None,
           timeout_s: float = 20, **options) -> tuple[str, bytes]:
    """Record a session of the guest; returns (how it ended, console output). A guest fault is
    an ending too ("fault"): its trace is complete."""
    out = io.BytesIO()
    virtual = engine == "emu"
    try:
        outcome, _ = run_session(SessionOptions(engine=engine, disks=[disk] if disk else [], kernel=kernel,
                                                trace=trace, timeout_s=timeout_s, virtual_clock=virtual,
                                                ram_mib=options.pop("ram_mib", 4), **options), output=out)
        reason = outcome.reason
    except GuestFault:
        reason = "fault"
    return reason, out.getvalue()
