"""The I/O APIC: turns device interrupt lines into interrupt messages for the local APIC.

Each of its 24 input pins has a 64-bit redirection entry saying which vector to send, to
which destination, whether the pin is edge- or level-triggered, and whether it is masked.
The guest reaches the registers indirectly: it writes a register index to IOREGSEL, then reads
or writes the 32-bit register through IOWIN, e.g. xv6's

    ioapicwrite(REG_TABLE+2*irq, T_IRQ0 + irq);      // vector 32+irq, edge, unmasked
    ioapicwrite(REG_TABLE+2*irq+1, cpunum << 24);    // destination: APIC ID cpunum

Trigger modes, as the 82093AA behaves:
- edge: a rising edge on an unmasked pin sends one message; edges on a masked pin are lost.
- level: while the pin is asserted and the entry's remote IRR is clear, send a message and
  set remote IRR; the local APIC's EOI for that vector clears it (`end_of_interrupt`), and a
  pin still asserted then sends again. Unmasking an asserted level pin sends at once.

Line levels are the logical "asserted" state reported by IrqLine; the polarity bit is kept for
the guest to read back but does not invert them (ISA devices here signal by raising the line).

Only the fixed and lowest-priority delivery modes deliver: fixed to every local APIC the
destination names (xv6 sends IRQ14 to its last CPU), lowest priority to the first of them (the
BSP first); NMI, SMI, INIT and ExtINT entries are accepted as configuration but send nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from replayvm import hw
from replayvm.devices.state import U8, U32, Ints, uint

if TYPE_CHECKING:
    from replayvm.devices.lapic import Lapic

# MMIO offsets.
IOREGSEL = 0x00
IOWIN = 0x10

# Register indexes behind IOREGSEL.
REG_ID = 0x00
REG_VER = 0x01
REG_ARB = 0x02
REG_TABLE = 0x10          # pin n: low dword at 0x10 + 2n, high dword at 0x11 + 2n

VERSION_VALUE = hw.IOAPIC_VERSION | ((hw.IOAPIC_PINS - 1) << 16)   # bits 16-23: highest pin
ID_MASK = 0x0F000000      # the 82093AA has a 4-bit ID in bits 24-27

# Redirection entry bits (low dword; the destination is the high dword's bits 24-31).
VECTOR = 0xFF
DELIVERY_MODE = 0x700
DEST_LOGICAL = 0x800
DELIVERY_STATUS = 0x1000  # read-only, always 0: delivery is instant
POLARITY_LOW = 0x2000
REMOTE_IRR = 0x4000       # read-only
TRIGGER_LEVEL = 0x8000
MASKED = 0x10000
LOW_WRITABLE = VECTOR | DELIVERY_MODE | DEST_LOGICAL | POLARITY_LOW | TRIGGER_LEVEL | MASKED
HIGH_WRITABLE = 0xFF000000
DM_FIXED = 0
DM_LOWEST_PRIORITY = 1

# Register names by MMIO offset, as the `devices` table of analyze shows them (`ioapic.window`).
REGISTERS = {IOREGSEL: "regsel", IOWIN: "window"}


@dataclass(frozen=True)
class IoapicState:
    """Everything the IOAPIC needs to go on as it would have: its ID, the selected register,
    the redirection table (low and high dwords per pin, remote IRR included) and the pin levels."""
    id: uint(4)
    regsel: U8
    low: Ints(hw.IOAPIC_PINS, U32)
    high: Ints(hw.IOAPIC_PINS, U32)
    levels: uint(hw.IOAPIC_PINS)


class Ioapic:
    """An IOAPIC at hw.IOAPIC_ADDR delivering to one local APIC; an IrqSink for pins 0-23.

    It registers itself for the LAPIC's level-triggered EOIs, which is how remote IRR clears.
    """

    name = "ioapic"
    state_type = IoapicState

    def __init__(self, lapic: Lapic, ioapic_id: int = hw.IOAPIC_ID,
                 others: list[Lapic] | None = None) -> None:
        self.lapic = lapic
        # Several CPUs: every local APIC on the bus, the BSP's first (a message goes to each one
        # its destination names; lowest priority to the first of them).
        self.lapics = [lapic, *(others or [])]
        self._reset_id = ioapic_id
        self.reset()
        for each in self.lapics:
            each.on_level_eoi(self.end_of_interrupt)

    def reset(self) -> None:
        """Power-on state: every entry masked, edge-triggered, vector 0; all pins low."""
        self.id = self._reset_id & 0xF
        self.regsel = 0
        self.low = [MASKED] * hw.IOAPIC_PINS     # redirection entries, low and high dwords
        self.high = [0] * hw.IOAPIC_PINS
        self.levels = 0                           # bit n = pin n asserted

    # --- register access -------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == IOREGSEL and size in (1, 2, 4):
            return self.regsel
        if offset == IOWIN and size == 4:
            return self._read_register(self.regsel)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == IOREGSEL and size in (1, 2, 4):
            self.regsel = value & 0xFF
        elif offset == IOWIN and size == 4:
            self._write_register(self.regsel, value & 0xFFFFFFFF)

    def _read_register(self, index: int) -> int:
        if index == REG_ID:
            return self.id << 24
        if index == REG_VER:
            return VERSION_VALUE
        if index == REG_ARB:
            return self.id << 24      # arbitration ID: loaded from the ID, as after a reset
        pin, high = self._pin_of(index)
        if pin is None:
            return 0
        return self.high[pin] if high else self.low[pin]

    def _write_register(self, index: int, value: int) -> None:
        if index == REG_ID:
            self.id = (value & ID_MASK) >> 24
            return
        pin, high = self._pin_of(index)
        if pin is None:
            return                    # VER, ARB and unknown indexes are read-only / absent
        if high:
            self.high[pin] = value & HIGH_WRITABLE
            self._deliver_level(pin)  # a new destination may accept a waiting level interrupt
            return
        old = self.low[pin]
        entry = (value & LOW_WRITABLE) | (old & REMOTE_IRR)
        if not entry & TRIGGER_LEVEL:
            entry &= ~REMOTE_IRR      # remote IRR means nothing for an edge-triggered pin
        self.low[pin] = entry
        self._deliver_level(pin)      # an unmasked, asserted level pin fires now

    @staticmethod
    def _pin_of(index: int) -> tuple[int | None, bool]:
        """Register index -> (pin, is the high dword), or (None, False) outside the table."""
        pin = (index - REG_TABLE) >> 1
        if index < REG_TABLE or pin >= hw.IOAPIC_PINS:
            return None, False
        return pin, bool(index & 1)

    # --- interrupt lines in ------------------------------------------------------------------
    def set_irq(self, pin: int, level: bool) -> None:
        if not 0 <= pin < hw.IOAPIC_PINS:
            return
        bit = 1 << pin
        was_asserted = bool(self.levels & bit)
        if not level:
            self.levels &= ~bit
            return
        self.levels |= bit
        entry = self.low[pin]
        if entry & TRIGGER_LEVEL:
            self._deliver_level(pin)
        elif not was_asserted and not entry & MASKED:
            self._send(pin)

    def _deliver_level(self, pin: int) -> None:
        """Send for a level pin if it is asserted, unmasked and not awaiting an EOI."""
        entry = self.low[pin]
        if (entry & (TRIGGER_LEVEL | MASKED | REMOTE_IRR)) == TRIGGER_LEVEL and self.levels >> pin & 1:
            if self._send(pin):
                self.low[pin] |= REMOTE_IRR

    def _send(self, pin: int) -> bool:
        """Send pin's interrupt message; True if our local APIC accepted it."""
        entry = self.low[pin]
        mode = (entry & DELIVERY_MODE) >> 8
        if mode not in (DM_FIXED, DM_LOWEST_PRIORITY):
            return False
        accepted = False
        for lapic in self.lapics:
            if lapic.accepts_destination(self.high[pin] >> 24, bool(entry & DEST_LOGICAL)):
                accepted = lapic.accept_interrupt(entry & VECTOR, bool(entry & TRIGGER_LEVEL)) or accepted
                if mode == DM_LOWEST_PRIORITY:
                    break
        return accepted

    def end_of_interrupt(self, vector: int) -> None:
        """The LAPIC retired a level-triggered `vector`: clear remote IRR, re-send if still high."""
        for pin in range(hw.IOAPIC_PINS):
            entry = self.low[pin]
            if entry & REMOTE_IRR and entry & VECTOR == vector:
                self.low[pin] = entry & ~REMOTE_IRR
                self._deliver_level(pin)

    # --- snapshots -------------------------------------------------------------------------
    def state(self) -> IoapicState:
        return IoapicState(id=self.id, regsel=self.regsel, low=tuple(self.low), high=tuple(self.high),
                           levels=self.levels)

    def restore(self, state: IoapicState) -> None:
        self.id = state.id
        self.regsel = state.regsel
        self.low = list(state.low)
        self.high = list(state.high)
        self.levels = state.levels
