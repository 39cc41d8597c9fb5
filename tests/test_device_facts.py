"""Devices own their facts, and recording and analysis use them: register names (the `devices`
table), which reads are time, and which sectors a guest's IDE commands move."""

from __future__ import annotations

import re

import pytest

from replayvm import hw
from replayvm.analyze.devices import DEVICE_LAYOUT, device_rows
from replayvm.clock import VirtualClock
from replayvm.devices import cmos, ide, lapic, uart
from replayvm.devices.disk import Disk
from replayvm.devices.ide import IdeChannel, IdeCommandDecoder
from replayvm.devices.irq import IrqLine


# ------------------------------------------------------------------------------- devices table
@pytest.mark.parametrize("space, address, device, register", [
    ("pio", 0x20, "pic", "pic.master.command"), ("pio", 0xA1, "pic", "pic.slave.data"),
    ("pio", 0x23, "imcr", "imcr.data"), ("pio", 0x64, "i8042", "i8042.status"),
    ("pio", 0x71, "cmos", "cmos.data"), ("pio", 0x80, "post", "post"),
    ("pio", 0x1F0, "ide0", "ide0.data"), ("pio", 0x1F2, "ide0", "ide0.count"),
    ("pio", 0x1F7, "ide0", "ide0.status"), ("pio", 0x3F6, "ide0", "ide0.control"),
    ("pio", 0x3F8, "com1", "com1.data"), ("pio", 0x3FD, "com1", "com1.lsr"),
    ("pio", 0x3FF, "com1", "com1.scratch"), ("pio", 0x3D5, "cga", "cga.data"),
    ("pio", 0x8A00, "debug", "debug.exit"), ("pio", 0xE9, "debug", "debug.console"),
    ("mmio", 0xFEE00020, "lapic", "lapic.id"), ("mmio", 0xFEE000B0, "lapic", "lapic.eoi"),
    ("mmio", 0xFEE00390, "lapic", "lapic.timer_current"), ("mmio", 0xFEE003E0, "lapic", "lapic.timer_divide"),
    ("mmio", 0xFEC00000, "ioapic", "ioapic.regsel"), ("mmio", 0xFEC00010, "ioapic", "ioapic.window"),
])
def test_devices_table_keeps_the_names_queries_use(space, address, device, register) -> None:
    assert {"space": space, "address": address, "device": device, "register": register} in device_rows()


def test_devices_table_names_every_lapic_register_the_lapic_has() -> None:
    # The table used to have its own list, which had lost PPR, APR, the thermal LVT and the
    # IRR/ISR/TMR words: a query could not say which of those registers a guest read.
    names = {row["register"]: row["address"] for row in device_rows() if row["device"] == "lapic"}
    assert names["lapic.ppr"] == hw.LAPIC_ADDR + lapic.PPR
    assert names["lapic.lvt_thermal"] == hw.LAPIC_ADDR + lapic.LVT_THERMAL
    assert names["lapic.irr7"] == hw.LAPIC_ADDR + lapic.IRR_BASE + 0x70
    assert len(names) == len(lapic.REGISTERS)


def test_devices_table_is_each_devices_own_register_list() -> None:
    rows = device_rows()
    keys = [(row["space"], row["address"]) for row in rows]
    assert len(keys) == len(set(keys)), "two names for one register"
    assert len({row["register"] for row in rows}) == len(rows), "one name for two registers"
    assert sum(len(registers) for *_, registers in DEVICE_LAYOUT) == len(rows)
    for row in rows:
        assert re.fullmatch(r"[a-z0-9_.]+", row["register"])
    assert {(hw.COM1_PORT + offset, f"com1.{name}") for offset, name in uart.REGISTERS.items()} <= \
        {(row["address"], row["register"]) for row in rows}
    assert {(hw.IDE0_CMD_PORT + offset, f"ide0.{name}") for offset, name in ide.REGISTERS.items()} <= \
        {(row["address"], row["register"]) for row in rows}


# ------------------------------------------------------------------------------- time registers
def test_time_reads_are_decided_by_the_devices() -> None:
    assert lapic.is_time_read(hw.LAPIC_ADDR + lapic.TCCR)
    assert lapic.TIME_REGISTERS == (lapic.TCCR,)
    assert not lapic.is_time_read(hw.LAPIC_ADDR + lapic.TICR)
    assert not lapic.is_time_read(hw.LAPIC_ADDR + lapic.TCCR + 1)   # as every trace was recorded
    assert not lapic.is_time_read(hw.IOAPIC_ADDR + lapic.TCCR)
    for register in cmos.TIME_REGISTERS:
        assert cmos.is_time_read(cmos.DATA, register)
        assert not cmos.is_time_read(cmos.INDEX, register)
    assert not cmos.is_time_read(cmos.DATA, cmos.REG_A)
    device = cmos.Cmos(VirtualClock(), 1 << 20)
    device.write(cmos.INDEX, 1, cmos.REG_MINUTES | cmos.NMI_DISABLE)
    assert device.time_register_selected
    device.write(cmos.INDEX, 1, cmos.REG_B)
    assert not device.time_register_selected


def test_the_emu_engines_c_lapic_id_offset_is_the_lapics() -> None:
    # The one copy outside lapic.py: C cannot import it; this keeps the two equal.
    from replayvm.engines import emu_build
    assert f"lapic_base + {lapic.ID:#x} " in emu_build.SOURCE


# ------------------------------------------------------------------------------- console
@pytest.mark.parametrize("lcr, mcr, offset, sent, looped, received", [
    (0x03, 0x00, 0, True, False, True),
    (0x83, 0x00, 0, False, False, False),          # DLAB: the divisor latch
    (0x03, 0x10, 0, False, True, True),            # loopback: the byte comes back as input
    (0x03, 0x00, 1, False, False, False),
])
def test_console_decoding_is_the_uarts(lcr, mcr, offset, sent, looped, received) -> None:
    assert uart.transmits(offset, lcr, mcr) is sent
    assert uart.loops_back(offset, lcr, mcr) is looped
    assert uart.receives(offset, lcr) is received
    decoder = uart.SerialOutputDecoder()
    decoder.write(uart.LCR, lcr)
    decoder.write(uart.MCR, mcr)
    assert (decoder.write(offset, 0x41) == 0x41) is sent
    assert decoder.loops_back(offset) is looped and decoder.receives(offset) is received


# ------------------------------------------------------------------------------- disk decoding
class LoggingDisk(Disk):
    def __init__(self, name: str) -> None:
        super().__init__(bytes(512 * 64), name)
        self.reads: list[tuple[str, int]] = []
        self.writes: list[tuple[str, int]] = []

    def read_sector(self, lba: int) -> bytes:
        self.reads.append((self.name, lba))
        return super().read_sector(lba)

    def write_sector(self, lba: int, data: bytes) -> None:
        self.writes.append((self.name, lba))
        super().write_sector(lba, data)


def test_ide_command_decoder_names_the_sectors_the_channel_moves() -> None:
    master, slave = LoggingDisk("disk0"), LoggingDisk("disk1")
    channel = IdeChannel(IrqLine(hw.IRQ_IDE0), master, slave)
    decoder = IdeCommandDecoder()
    decoded: list[tuple[str, str, int]] = []

    def out(offset: int, value: int) -> None:
        channel.write_register(offset, 1, value)
        decoder.write(offset, value)

    requests = [(ide.CMD_READ_SECTORS[0], 7, 3, 0), (ide.CMD_WRITE_SECTORS[0], 40, 2, 1),
                (ide.CMD_READ_MULTIPLE, 1, 1, 1), (ide.CMD_IDENTIFY, 0, 1, 0),
                (ide.CMD_WRITE_MULTIPLE, 12, 1, 0)]
    for command, lba, count, drive in requests:
        out(ide.SECTOR_COUNT, count)
        out(ide.LBA_LOW, lba & 0xFF)
        out(ide.LBA_MID, lba >> 8 & 0xFF)
        out(ide.LBA_HIGH, lba >> 16 & 0xFF)
        out(ide.DRIVE_HEAD, 0xE0 | drive << 4 | lba >> 24)
        out(ide.STATUS_COMMAND, command)
        for _ in range(count):
            reading = not decoder.transfers(reading=False)
            if reading:
                channel.read_data_block(512)
            else:
                channel.write_data_block(bytes(512))
            if decoder.transfers(reading=reading):
                decoded.append(("read" if reading else "write", f"disk{decoder.drive}", decoder.take_sector()))
    moved = [("read", *r) for r in master.reads + slave.reads] + \
            [("write", *w) for w in master.writes + slave.writes]
    assert sorted(decoded) == sorted(moved)
    assert ("write", "disk1", 41) in decoded and ("read", "disk1", 1) in decoded
    assert ide.COMMAND_NAMES[ide.CMD_IDENTIFY] == "identify"
    assert ide.READ_COMMANDS == {0x20, 0x21, 0xC4} and ide.WRITE_COMMANDS == {0x30, 0x31, 0xC5}
