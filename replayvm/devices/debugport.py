"""Small ports guests touch for debugging: Bochs/QEMU's shutdown port, the 0xE9 console, POST codes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from replayvm.devices.state import U8, U32

SHUTDOWN_SEQUENCE = (0x8A00, 0x8AE0)   # xv6's loader writes these to port 0x8A00 when it fails

# Each of these devices is one port; its register is named after the device in the `devices`
# table of analyze (`debug.exit`, `debug.console`, `post`), hence the empty name.
REGISTERS = {0: ""}


@dataclass(frozen=True)
class DebugExitState:
    """The last value written (the shutdown sequence is two writes)."""
    last: U32


@dataclass(frozen=True)
class DebugConsoleState:
    """Nothing: each byte goes out as it is written."""


@dataclass(frozen=True)
class PostState:
    """The last POST code written (what a read returns)."""
    last: U8


class DebugExitPort:
    """Port 0x8A00: the write sequence 0x8A00, 0x8AE0 asks the emulator to shut down."""

    name = "debug.exit"
    state_type = DebugExitState

    def __init__(self, on_shutdown: Callable[[str], None]) -> None:
        self.on_shutdown = on_shutdown
        self.last = 0

    def read(self, offset: int, size: int) -> int:
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and (self.last, value) == SHUTDOWN_SEQUENCE:
            self.on_shutdown("debug port 0x8A00 shutdown sequence")
        self.last = value if offset == 0 else 0

    def state(self) -> DebugExitState:
        return DebugExitState(last=self.last)

    def restore(self, state: DebugExitState) -> None:
        self.last = state.last


class DebugConsolePort:
    """Port 0xE9: each byte written goes to the console (Bochs's debug console)."""

    name = "debug.console"
    state_type = DebugConsoleState

    def __init__(self, on_output: Callable[[int], None]) -> None:
        self.on_output = on_output

    def read(self, offset: int, size: int) -> int:
        return 0xE9                            # the "port present" answer Bochs gives

    def write(self, offset: int, size: int, value: int) -> None:
        self.on_output(value & 0xFF)

    def state(self) -> DebugConsoleState:
        return DebugConsoleState()

    def restore(self, state: DebugConsoleState) -> None:
        pass


class PostPort:
    """Port 0x80: POST codes and I/O delays. Keeps the last code written."""

    name = "post"
    state_type = PostState

    def __init__(self) -> None:
        self.last = 0

    def read(self, offset: int, size: int) -> int:
        return self.last

    def write(self, offset: int, size: int, value: int) -> None:
        self.last = value & 0xFF

    def state(self) -> PostState:
        return PostState(last=self.last)

    def restore(self, state: PostState) -> None:
        self.last = state.last
