"""Running a guest session: the Python API behind `replayvm record`.

Until the trace writer lands (recording issue), a session runs the guest with its console and
reports how it ended; `-o FILE` is accepted and refused with a clear message.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from replayvm import hw
from replayvm.console import Console
from replayvm.machine import Machine, MachineConfig, RunOutcome


@dataclass
class SessionOptions:
    disks: list[Path] = field(default_factory=list)
    kernel: Path | None = None
    ram_mib: int = hw.DEFAULT_RAM_MIB
    engine: str = "emu"                  # already resolved: "kvm" or "emu"
    script: bytes | None = None          # --input, escapes decoded
    prompt: bytes = b"$ "
    until: bytes | None = None
    timeout_s: float | None = None
    interactive: bool = False
    virtual_clock: bool = False


def bundled_demo_disk() -> Path:
    """The demo guest's disk image, built from `guests/demo` on first use."""
    from replayvm.guests import guest_file

    return guest_file("demo", "disk.img")


def run_session(options: SessionOptions, output: BinaryIO | None = None) -> tuple[RunOutcome, Machine]:
    """Boot the guest, run it until the session ends, and return how it ended."""
    console = Console(output if output is not None else sys.stdout.buffer, script=options.script,
                      prompt=options.prompt, until=options.until, interactive=options.interactive)
    disks = list(options.disks)
    if not disks and options.kernel is None:
        disks = [bundled_demo_disk()]
    config = MachineConfig(disks=disks, kernel=options.kernel, ram_mib=options.ram_mib,
                           engine=options.engine, virtual_clock=options.virtual_clock)
    try:
        machine = Machine(config, console)
    except BaseException:
        console.close()
        raise
    try:
        outcome = machine.run(timeout_s=options.timeout_s)
    finally:
        machine.close()
    return outcome, machine
