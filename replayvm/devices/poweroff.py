"""The ports through which a guest of the plain PC switches the machine off.

pintos's `shutdown_power_off` tries three in turn, as emulators have offered them over the years:
`outw(0xB004, 0x2000)` (Bochs's and old QEMU's ACPI PM1a control: sleep type 0, enable), the
string "Shutdown" written byte by byte to 0x8900 (Bochs's APM shutdown port), and a byte to 0x501
(QEMU's isa-debug-exit, which exits with status 2 * value + 1). The first one the guest writes
ends the run: a power-off is a clean end with status 0, the debug exit's status is the guest's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from replayvm import hw
from replayvm.devices.state import U8

SHUTDOWN_STRING = b"Shutdown"

# Each of these is one port, named after the device in the `devices` table of analyze.
REGISTERS = {0: ""}


@dataclass(frozen=True)
class PowerOffState:
    """How much of "Shutdown" has been written to 0x8900 so far."""
    matched: U8


class PowerOff:
    """One device object behind the three ports (registered three times, one port each)."""

    name = "poweroff"
    state_type = PowerOffState

    def __init__(self, on_power_off: Callable[[str, int], None]) -> None:
        self.on_power_off = on_power_off          # (why, exit status)
        self.matched = 0
        self.acpi = _Port(self._acpi)
        self.bochs = _Port(self._bochs)
        self.debug_exit = _Port(self._debug_exit)

    def _acpi(self, size: int, value: int) -> None:
        if value == hw.POWER_OFF_VALUE:
            self.on_power_off(f"the guest powered off ({value:#06x} to port {hw.POWER_OFF_PORT:#x})", 0)

    def _bochs(self, size: int, value: int) -> None:
        byte = value & 0xFF
        if byte == SHUTDOWN_STRING[self.matched]:
            self.matched += 1
        else:
            self.matched = 1 if byte == SHUTDOWN_STRING[0] else 0
        if self.matched == len(SHUTDOWN_STRING):
            self.matched = 0
            self.on_power_off(f"the guest powered off (\"Shutdown\" to port {hw.BOCHS_SHUTDOWN_PORT:#x})", 0)

    def _debug_exit(self, size: int, value: int) -> None:
        status = ((value & 0xFF) << 1 | 1) & 0xFF
        self.on_power_off(f"the guest exited with status {status} ({value & 0xFF:#04x} to port "
                          f"{hw.ISA_DEBUG_EXIT_PORT:#x})", status)

    def state(self) -> PowerOffState:
        return PowerOffState(matched=self.matched)

    def restore(self, state: PowerOffState) -> None:
        self.matched = min(state.matched, len(SHUTDOWN_STRING) - 1)


class _Port:
    """One of the ports: reads float high, writes go to the PowerOff's handler."""

    def __init__(self, on_write: Callable[[int, int], None]) -> None:
        self.on_write = on_write

    def read(self, offset: int, size: int) -> int:
        return (1 << 8 * size) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.on_write(size, value)
