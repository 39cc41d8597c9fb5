"""Names for the machine's ports and MMIO registers, for the `devices` lookup table.

Built from `replayvm.hw` (base addresses) and each device module's `REGISTERS` (names by offset),
so a query can say `ide0.status` instead of 0x1f7 and nothing here repeats an offset.
"""

from __future__ import annotations

from replayvm import hw
from replayvm.boot import bios
from replayvm.devices import cga, cmos, debugport, i8042, ide, imcr, ioapic, lapic, pic, pit, poweroff, uart

# (space, base address, name prefix, the device's register names by offset). A register named ""
# is the whole device (one-port devices: `post`).
DEVICE_LAYOUT: tuple[tuple[str, int, str, dict[int, str]], ...] = (
    ("pio", hw.PIC_MASTER_PORT, "pic.master", pic.REGISTERS),
    ("pio", hw.PIC_SLAVE_PORT, "pic.slave", pic.REGISTERS),
    ("pio", hw.IMCR_PORT, "imcr", imcr.REGISTERS),
    ("pio", hw.I8042_DATA_PORT, "i8042", i8042.REGISTERS),
    ("pio", hw.CMOS_PORT, "cmos", cmos.REGISTERS),
    ("pio", hw.POST_PORT, "post", debugport.REGISTERS),
    ("pio", hw.IDE0_CMD_PORT, "ide0", ide.REGISTERS),
    ("pio", hw.IDE0_CTRL_PORT, "ide0", ide.CONTROL_REGISTERS),
    ("pio", hw.COM1_PORT, "com1", uart.REGISTERS),
    ("pio", hw.CGA_CRT_PORT, "cga", cga.REGISTERS),
    ("pio", hw.DEBUG_EXIT_PORT, "debug.exit", debugport.REGISTERS),
    ("pio", hw.DEBUG_CON_PORT, "debug.console", debugport.REGISTERS),
    # the plain PC's (`--machine pc`)
    ("pio", hw.PIT_PORT, "pit", pit.REGISTERS),
    ("pio", hw.BIOS_CALL_PORT, "bios", bios.REGISTERS),
    ("pio", hw.IDE1_CMD_PORT, "ide1", ide.REGISTERS),
    ("pio", hw.IDE1_CTRL_PORT, "ide1", ide.CONTROL_REGISTERS),
    ("pio", hw.POWER_OFF_PORT, "poweroff.acpi", poweroff.REGISTERS),
    ("pio", hw.BOCHS_SHUTDOWN_PORT, "poweroff.bochs", poweroff.REGISTERS),
    ("pio", hw.ISA_DEBUG_EXIT_PORT, "poweroff.debug_exit", poweroff.REGISTERS),
    ("mmio", hw.LAPIC_ADDR, "lapic", lapic.REGISTERS),
    ("mmio", hw.IOAPIC_ADDR, "ioapic", ioapic.REGISTERS),
)


def device_rows() -> list[dict]:
    """One row per named register: space, address, device (the prefix's first part), register.
    Ports in address order, then each MMIO device's registers in address order."""
    pio, mmio = [], []
    for space, base, prefix, registers in DEVICE_LAYOUT:
        device = prefix.split(".")[0]
        (pio if space == "pio" else mmio).extend(
            {"space": space, "address": base + offset, "device": device,
             "register": f"{prefix}.{name}" if name else prefix}
            for offset, name in sorted(registers.items()))
    return sorted(pio, key=lambda row: row["address"]) + mmio


_NAMES = {(row["space"], row["address"]): row["register"] for row in device_rows()}


def register_at(space: str, address: int) -> str | None:
    """The register's name at `address` in `space` ("pio" or "mmio"), e.g. "com1.lsr"."""
    return _NAMES.get((space, address))
