"""The IMCR (Interrupt Mode Configuration Register) of the MP specification, at ports 0x22/0x23.

On boards that implement "PIC mode", the 8259's INTR goes straight to the CPU until the OS sets
IMCR bit 0, which reroutes it to the local APIC (and through it, the APIC world). An MP table
whose floating pointer has the IMCRP bit makes xv6 do exactly that:

    outb(0x22, 0x70);            // select the IMCR
    outb(0x23, inb(0x23) | 1);   // route interrupts through the APIC

Our machine is a virtual-wire board (the PIC output always reaches the LAPIC's LINT0), so the
register changes nothing in the wiring; it is kept, readable and snapshotted so a guest that
uses it reads back what it wrote, and `apic_mode` lets the machine report or act on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from replayvm.devices.state import U8, uint

SELECT = 0             # port 0x22: which chipset register port 0x23 reaches
DATA = 1               # port 0x23
IMCR_INDEX = 0x70      # the one register behind the pair that we implement
APIC_MODE = 0x01       # IMCR bit 0: 0 = PIC mode, 1 = symmetric I/O (through the APIC)

# Register names by offset from hw.IMCR_PORT, as the `devices` table of analyze shows them.
REGISTERS = {SELECT: "select", DATA: "data"}


@dataclass(frozen=True)
class ImcrState:
    """The selected chipset register and the IMCR's one bit."""
    selected: U8
    value: uint(1)


class Imcr:
    """A Device at two ports (offset 0 = select, 1 = data); one byte of state that matters."""

    name = "imcr"
    state_type = ImcrState

    def __init__(self) -> None:
        self.selected = 0
        self.value = 0             # reset: PIC mode

    @property
    def apic_mode(self) -> bool:
        """True once the guest has routed external interrupts through the APIC."""
        return bool(self.value & APIC_MODE)

    def read(self, offset: int, size: int) -> int:
        if size != 1:
            return 0
        if offset == SELECT:
            return self.selected
        if offset == DATA and self.selected == IMCR_INDEX:
            return self.value
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1:
            return
        if offset == SELECT:
            self.selected = value & 0xFF
        elif offset == DATA and self.selected == IMCR_INDEX:
            self.value = value & APIC_MODE       # the other bits are reserved

    def state(self) -> ImcrState:
        return ImcrState(selected=self.selected, value=self.value)

    def restore(self, state: ImcrState) -> None:
        self.selected = state.selected
        self.value = state.value
