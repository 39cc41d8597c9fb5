"""Small ports guests touch for debugging: Bochs/QEMU's shutdown port, the 0xE9 console, POST codes."""

from __future__ import annotations

from typing import Callable

SHUTDOWN_SEQUENCE = (0x8A00, 0x8AE0)   # xv6's loader writes these to port 0x8A00 when it fails


class DebugExitPort:
    """Port 0x8A00: the write sequence 0x8A00, 0x8AE0 asks the emulator to shut down."""

    name = "debug.exit"

    def __init__(self, on_shutdown: Callable[[str], None]) -> None:
        self.on_shutdown = on_shutdown
        self.last = 0

    def read(self, offset: int, size: int) -> int:
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and (self.last, value) == SHUTDOWN_SEQUENCE:
            self.on_shutdown("debug port 0x8A00 shutdown sequence")
        self.last = value if offset == 0 else 0


class DebugConsolePort:
    """Port 0xE9: each byte written goes to the console (Bochs's debug console)."""

    name = "debug.console"

    def __init__(self, on_output: Callable[[int], None]) -> None:
        self.on_output = on_output

    def read(self, offset: int, size: int) -> int:
        return 0xE9                            # the "port present" answer Bochs gives

    def write(self, offset: int, size: int, value: int) -> None:
        self.on_output(value & 0xFF)


class PostPort:
    """Port 0x80: POST codes and I/O delays. Keeps the last code written."""

    name = "post"

    def __init__(self) -> None:
        self.last = 0

    def read(self, offset: int, size: int) -> int:
        return self.last

    def write(self, offset: int, size: int, value: int) -> None:
        self.last = value & 0xFF
