"""Names for the machine's ports and MMIO registers, for the `devices` lookup table.

Derived from `replayvm.hw` (base addresses) plus each device's register layout, so a query can
say `ide0.status` instead of 0x1f7.
"""

from __future__ import annotations

from replayvm import hw

PIO_REGISTERS: dict[int, str] = {
    hw.PIC_MASTER_PORT: "pic.master.command", hw.PIC_MASTER_PORT + 1: "pic.master.data",
    hw.PIC_SLAVE_PORT: "pic.slave.command", hw.PIC_SLAVE_PORT + 1: "pic.slave.data",
    hw.IMCR_PORT: "imcr.select", hw.IMCR_PORT + 1: "imcr.data",
    hw.I8042_DATA_PORT: "i8042.data", hw.I8042_STATUS_PORT: "i8042.status",
    hw.CMOS_PORT: "cmos.index", hw.CMOS_PORT + 1: "cmos.data",
    hw.POST_PORT: "post",
    hw.IDE0_CMD_PORT: "ide0.data", hw.IDE0_CMD_PORT + 1: "ide0.error", hw.IDE0_CMD_PORT + 2: "ide0.count",
    hw.IDE0_CMD_PORT + 3: "ide0.lba_low", hw.IDE0_CMD_PORT + 4: "ide0.lba_mid",
    hw.IDE0_CMD_PORT + 5: "ide0.lba_high", hw.IDE0_CMD_PORT + 6: "ide0.drive",
    hw.IDE0_CMD_PORT + 7: "ide0.status", hw.IDE0_CTRL_PORT: "ide0.control",
    hw.COM1_PORT: "com1.data", hw.COM1_PORT + 1: "com1.ier", hw.COM1_PORT + 2: "com1.iir",
    hw.COM1_PORT + 3: "com1.lcr", hw.COM1_PORT + 4: "com1.mcr", hw.COM1_PORT + 5: "com1.lsr",
    hw.COM1_PORT + 6: "com1.msr", hw.COM1_PORT + 7: "com1.scratch",
    hw.CGA_CRT_PORT: "cga.index", hw.CGA_CRT_PORT + 1: "cga.data",
    hw.DEBUG_EXIT_PORT: "debug.exit", hw.DEBUG_CON_PORT: "debug.console",
}

LAPIC_REGISTERS = {0x20: "id", 0x30: "version", 0x80: "tpr", 0xB0: "eoi", 0xD0: "ldr", 0xE0: "dfr",
                   0xF0: "svr", 0x280: "esr", 0x300: "icr_low", 0x310: "icr_high", 0x320: "lvt_timer",
                   0x340: "lvt_pcint", 0x350: "lvt_lint0", 0x360: "lvt_lint1", 0x370: "lvt_error",
                   0x380: "timer_initial", 0x390: "timer_current", 0x3E0: "timer_divide"}
IOAPIC_REGISTERS = {0x00: "regsel", 0x10: "window"}


def device_rows() -> list[dict]:
    rows = [{"space": "pio", "address": port, "device": name.split(".")[0], "register": name}
            for port, name in sorted(PIO_REGISTERS.items())]
    rows += [{"space": "mmio", "address": hw.LAPIC_ADDR + off, "device": "lapic", "register": f"lapic.{name}"}
             for off, name in sorted(LAPIC_REGISTERS.items())]
    rows += [{"space": "mmio", "address": hw.IOAPIC_ADDR + off, "device": "ioapic", "register": f"ioapic.{name}"}
             for off, name in sorted(IOAPIC_REGISTERS.items())]
    return rows


def register_at(space: str, address: int) -> str | None:
    """The register's name at `address` in `space` ("pio" or "mmio"), e.g. "com1.lsr"."""
    if space == "pio":
        return PIO_REGISTERS.get(address)
    if hw.LAPIC_ADDR <= address < hw.LAPIC_ADDR + hw.LAPIC_SIZE:
        name = LAPIC_REGISTERS.get(address - hw.LAPIC_ADDR)
        return f"lapic.{name}" if name else None
    if hw.IOAPIC_ADDR <= address < hw.IOAPIC_ADDR + hw.IOAPIC_SIZE:
        name = IOAPIC_REGISTERS.get(address - hw.IOAPIC_ADDR)
        return f"ioapic.{name}" if name else None
    return None
