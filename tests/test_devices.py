"""Device models driven with the exact register sequences xv6's drivers and loader use."""

from __future__ import annotations

import struct

import pytest

from replayvm.clock import VirtualClock
from replayvm.devices.cga import CgaCrt, render_text_screen
from replayvm.devices.cmos import Cmos
from replayvm.devices.debugport import DebugExitPort
from replayvm.devices.disk import Disk
from replayvm.devices.i8042 import I8042, ascii_to_scancodes
from replayvm.devices.ide import IdeChannel
from replayvm.devices.irq import IrqLine
from replayvm.devices.uart import Uart16550


class EdgeCounter:
    """An IrqSink counting rising edges, like xv6's edge-triggered IOAPIC pins."""

    def __init__(self) -> None:
        self.edges = 0
        self.level = False

    def set_irq(self, pin: int, level: bool) -> None:
        if level and not self.level:
            self.edges += 1
        self.level = level


def line() -> tuple[IrqLine, EdgeCounter]:
    sink = EdgeCounter()
    return IrqLine(0, [sink]), sink


# ------------------------------------------------------------------------------- UART
def uart_init(uart: Uart16550) -> None:
    """xv6 uart.c: uartinit."""
    uart.write(2, 1, 0)           # FIFO off
    uart.write(3, 1, 0x80)        # DLAB
    uart.write(0, 1, 115200 // 9600)
    uart.write(1, 1, 0)
    uart.write(3, 1, 0x03)        # 8N1, DLAB off
    uart.write(4, 1, 0)
    uart.write(1, 1, 0x01)        # RX interrupt


def test_uart_probe_output_and_input_one_byte_at_a_time():
    irq, sink = line()
    out = bytearray()
    uart = Uart16550(irq, out.append)
    uart_init(uart)
    assert uart.read(5, 1) != 0xFF                         # xv6: "no serial port" if 0xFF
    assert uart.divisor == 12
    uart.read(2, 1), uart.read(0, 1)
    for ch in b"hi":                                       # uartputc polls LSR bit 5
        assert uart.read(5, 1) & 0x20
        uart.write(0, 1, ch)
    assert bytes(out) == b"hi"
    uart.feed_input(b"ab")
    assert sink.edges == 1 and uart.read(2, 1) & 0x0F == 0x04
    got = []
    while uart.read(5, 1) & 1:                             # uartgetc loop in the interrupt handler
        got.append(uart.read(0, 1))
    assert bytes(got) == b"ab"                             # nothing overwritten, nothing lost
    assert sink.edges == 2 and not sink.level              # the second byte was a new edge
    assert uart.read(2, 1) & 0x01                          # no interrupt pending


def test_uart_state_round_trip():
    irq, _ = line()
    uart = Uart16550(irq, lambda b: None)
    uart_init(uart)
    uart.feed_input(b"xyz")
    copy = Uart16550(IrqLine(0), lambda b: None)
    copy.restore(uart.state())
    assert [copy.read(0, 1) for _ in range(3)] == list(b"xyz")


# ------------------------------------------------------------------------------- IDE
def make_disk(sectors: int = 64, name: str = "disk0") -> Disk:
    data = b"".join(bytes([i & 0xFF]) * 512 for i in range(sectors))
    return Disk(data, name)


def select(ide: IdeChannel, lba: int, count: int = 1, slave: bool = False) -> None:
    cmd = ide.command_block
    cmd.write(2, 1, count)
    cmd.write(3, 1, lba & 0xFF)
    cmd.write(4, 1, (lba >> 8) & 0xFF)
    cmd.write(5, 1, (lba >> 16) & 0xFF)
    cmd.write(6, 1, 0xE0 | (0x10 if slave else 0) | ((lba >> 24) & 0x0F))


def idewait(ide: IdeChannel) -> int:
    for _ in range(10):
        status = ide.command_block.read(7, 1)
        if status & 0xC0 == 0x40:
            return status
    raise AssertionError("drive never ready")


def test_ide_disk1_probe_sees_a_slave_only_when_present():
    for slave, expected in ((None, False), (make_disk(name="disk1"), True)):
        ide = IdeChannel(line()[0], make_disk(), slave)
        idewait(ide)
        ide.command_block.write(6, 1, 0xE0 | 0x10)
        present = any(ide.command_block.read(7, 1) != 0 for _ in range(1000))
        ide.command_block.write(6, 1, 0xE0)
        assert present is expected


def test_ide_read_and_write_a_block_like_xv6_iderw():
    irq, sink = line()
    disk = make_disk()
    ide = IdeChannel(irq, disk, None)
    cmd = ide.command_block
    idewait(ide)
    ide.control_block.write(0, 1, 0)
    select(ide, 7)
    cmd.write(7, 1, 0x20)
    assert sink.edges == 1                                  # IRQ 14 on completion
    assert idewait(ide) & 0x08                              # DRQ: data ready
    data = b"".join(cmd.read(0, 4).to_bytes(4, "little") for _ in range(128))
    assert data == bytes([7]) * 512
    assert not ide.command_block.read(7, 1) & 0x08
    select(ide, 9)
    cmd.write(7, 1, 0x30)
    for i in range(128):
        cmd.write(0, 4, 0xA5A5A5A5)
    assert sink.edges == 2
    assert disk.read_sector(9) == b"\xA5" * 512
    assert disk.written_sectors() == [9] and ide.sectors_written == 1


def test_ide_boot_loader_polling_read_of_several_sectors_with_string_io():
    ide = IdeChannel(line()[0], make_disk(), None)
    select(ide, 1, count=3)
    ide.command_block.write(7, 1, 0x20)
    blocks = []
    for _ in range(3):
        idewait(ide)
        blocks.append(ide.command_block.read_string(0, 4, 128))
    assert blocks == [bytes([1]) * 512, bytes([2]) * 512, bytes([3]) * 512]


def test_ide_out_of_range_and_unknown_commands_fail_cleanly():
    irq, sink = line()
    ide = IdeChannel(irq, make_disk(16), None)
    select(ide, 16)
    ide.command_block.write(7, 1, 0x20)
    assert ide.command_block.read(7, 1) & 0x01 and ide.command_block.read(1, 1) == 0x10   # ERR, IDNF
    ide.command_block.write(7, 1, 0x99)
    assert ide.command_block.read(1, 1) == 0x04                                          # ABRT
    assert len(ide.errors) == 2 and sink.edges == 2


def test_ide_identify_reports_lba_capacity():
    ide = IdeChannel(line()[0], make_disk(100), None)
    ide.command_block.write(7, 1, 0xEC)
    words = struct.unpack("<256H", ide.command_block.read_string(0, 2, 256))
    assert words[60] | words[61] << 16 == 100 and words[49] & 0x200


def test_disk_overlay_never_touches_the_image(tmp_path):
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1000))                          # padded to two sectors
    disk = Disk(image, "d")
    assert disk.sector_count == 2
    disk.write_sector(1, b"\x01" * 512)
    assert disk.read_sector(1) == b"\x01" * 512
    assert image.read_bytes() == bytes(1000)
    with pytest.raises(IndexError):
        disk.read_sector(2)


# ------------------------------------------------------------------------------- i8042
def test_a20_gate_sequence_and_keyboard_scancodes():
    irq, sink = line()
    kbd = I8042(irq, lambda: None)
    assert not kbd.a20_enabled
    while kbd.read(4, 1) & 0x02:
        pass
    kbd.write(4, 1, 0xD1)
    kbd.write(0, 1, 0xDF)
    assert kbd.a20_enabled
    kbd.feed_scancodes(ascii_to_scancodes("A"))
    assert sink.edges == 1
    codes = []
    while kbd.read(4, 1) & 0x01:
        codes.append(kbd.read(0, 1))
    assert codes == [0x2A, 0x1E, 0x9E, 0xAA]                # shift, a, a released, shift released


def test_i8042_reset_command_calls_the_machine():
    resets = []
    kbd = I8042(line()[0], lambda: resets.append(1))
    kbd.write(4, 1, 0xFE)
    assert resets == [1]


# ------------------------------------------------------------------------------- CMOS
def cmostime(cmos: Cmos) -> dict:
    """xv6 lapic.c cmostime(): wait for UIP clear, read all fields twice until equal."""
    def reg(r):
        cmos.write(0, 1, r)
        return cmos.read(1, 1)
    while reg(0x0A) & 0x80:
        pass
    fields = {name: reg(r) for name, r in (("second", 0), ("minute", 2), ("hour", 4), ("day", 7),
                                           ("month", 8), ("year", 9))}
    bcd = not reg(0x0B) & 0x04
    if bcd:
        fields = {k: (v >> 4) * 10 + (v & 0xF) for k, v in fields.items()}
    return fields


def test_cmos_time_comes_from_the_guest_clock():
    clock = VirtualClock(epoch_s=1_700_000_000)            # 2023-11-14 22:13:20 UTC
    cmos = Cmos(clock, 256 << 20)
    assert cmostime(cmos) == {"second": 20, "minute": 13, "hour": 22, "day": 14, "month": 11, "year": 23}
    clock.advance(61 * 10**9)
    assert cmostime(cmos)["minute"] == 14


def test_cmos_memory_size_and_shutdown_byte():
    cmos = Cmos(VirtualClock(), 256 << 20)
    cmos.write(0, 1, 0x34)
    low = cmos.read(1, 1)
    cmos.write(0, 1, 0x35)
    assert (cmos.read(1, 1) << 8 | low) << 16 == (256 - 16) << 20
    cmos.write(0, 1, 0x8F)                                 # NMI-disable bit masked off the index
    cmos.write(1, 1, 0x0A)
    assert cmos.ram[0x0F] == 0x0A


# ------------------------------------------------------------------------------- CGA
def test_cga_cursor_handshake_and_screen():
    crt = CgaCrt()
    crt.write(0, 1, 14)
    crt.write(1, 1, 0x01)
    crt.write(0, 1, 15)
    crt.write(1, 1, 0x40)
    crt.write(0, 1, 14)
    pos = crt.read(1, 1) << 8
    crt.write(0, 1, 15)
    assert pos | crt.read(1, 1) == 0x140 == crt.cursor
    ram = bytearray(0xC0000)
    ram[0xB8000:0xB8004] = b"h\x07i\x07"
    assert render_text_screen(ram)[0] == "hi"


def test_debug_exit_sequence_asks_for_shutdown():
    calls = []
    port = DebugExitPort(calls.append)
    port.write(0, 2, 0x8A00)
    port.write(0, 2, 0x8AE0)
    assert len(calls) == 1
