"""Device state is typed, complete and safe to load: for each device, a state taken mid-activity,
sent through to_plain -> msgpack -> from_plain and restored into a fresh device, makes that device
answer every following register access and raise every interrupt exactly as the original does;
and from_plain refuses values of the wrong type or size, naming the field."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import msgpack
import pytest

from replayvm import hw
from replayvm.clock import VirtualClock
from replayvm.devices import lapic as lapic_regs
from replayvm.devices.cga import CgaCrt, CgaState
from replayvm.devices.cmos import REG_C, REG_SECONDS, Cmos, CmosState
from replayvm.devices.debugport import (DebugConsolePort, DebugConsoleState, DebugExitPort,
                                        DebugExitState, PostPort, PostState)
from replayvm.devices.disk import Disk
from replayvm.devices.i8042 import I8042, I8042State
from replayvm.devices.ide import IdeChannel, IdeState
from replayvm.devices.imcr import Imcr, ImcrState
from replayvm.devices.ioapic import IOREGSEL, IOWIN, REG_TABLE, Ioapic, IoapicState
from replayvm.devices.irq import IrqLine
from replayvm.devices.lapic import Lapic, LapicState
from replayvm.devices.pic import Pic8259Pair, PicPairState, PicState
from replayvm.devices.state import from_plain, to_plain
from replayvm.devices.uart import Uart16550, UartState

Op = Callable[[Any], Any]


class Log(list):
    """What a device did besides answering: interrupt line changes, bytes sent, resets."""

    def sink(self, tag: str):
        log = self

        class Sink:
            def set_irq(self, pin: int, level: bool) -> None:
                log.append((tag, pin, level))
        return Sink()

    def line(self, pin: int) -> IrqLine:
        return IrqLine(pin, [self.sink("irq")])


def through_msgpack(state: Any) -> Any:
    """What a checkpoint file or a trace header does to a state: plain values, packed with
    msgpack's strict defaults, unpacked, checked and typed again."""
    packed = msgpack.packb(to_plain(state), use_bin_type=True, strict_types=True)
    return from_plain(type(state), msgpack.unpackb(packed, raw=False, strict_map_key=True))


def check_twins(build: Callable[[Log], Any], before: list[Op], after: list[Op]) -> tuple[Any, Any]:
    """Drive a device with `before`, move its state into a fresh one, then run `after` on both:
    every answer and every interrupt / output event must be the same, and so the final states."""
    original_log, copy_log = Log(), Log()
    original = build(original_log)
    for op in before:
        op(original)
    state = original.state()
    assert isinstance(state, type(original).state_type)
    restored = through_msgpack(state)
    assert restored == state
    copy = build(copy_log)
    copy.restore(restored)
    assert copy.state() == state
    original_log.clear()
    for step, op in enumerate(after):
        got, expected = op(copy), op(original)
        assert got == expected, f"step {step}: the restored device answered {got!r}, the original {expected!r}"
        assert copy_log == original_log, f"step {step}: events differ"
    assert copy.state() == original.state()
    return original, copy


def rd(offset: int, size: int = 1) -> Op:
    return lambda device: device.read(offset, size)


def wr(offset: int, value: int, size: int = 1) -> Op:
    return lambda device: device.write(offset, size, value)


# ------------------------------------------------------------------------------- UART
def test_uart_continues_with_its_unread_input_and_busy_transmitter() -> None:
    clock = VirtualClock()

    def build(log: Log) -> Uart16550:
        return Uart16550(log.line(hw.IRQ_COM1), lambda byte: log.append(("out", byte)),
                         latency=lambda: 3_000, now_ns=clock.now_ns)

    before = [wr(3, 0x80), wr(0, 6), wr(1, 0), wr(3, 0x03), wr(2, 0x01), wr(7, 0x5A),
              lambda u: u.feed_input(b"hello"), rd(0), wr(1, 0x03), wr(0, ord("A"))]
    after = [rd(5), rd(2), rd(0), rd(0), lambda u: clock.advance(3_500), rd(5), rd(2), rd(2),
             wr(0, ord("B")), rd(5), lambda u: clock.advance(3_000), lambda u: u.poll(clock.now_ns()),
             rd(2), rd(0), rd(0), rd(0), rd(5), rd(7), wr(3, 0x80), rd(0), rd(1), rd(6)]
    original, _ = check_twins(build, before, after)
    assert original.rx_pending() == 0


# ------------------------------------------------------------------------------- IDE
def disk(sectors: int = 16) -> Disk:
    return Disk(b"".join(bytes([i]) * 256 + bytes([0xFF - i]) * 256 for i in range(sectors)), "disk0")


def ide_select(lba: int, count: int) -> list[Op]:
    return [wr(2, count), wr(3, lba & 0xFF), wr(4, lba >> 8 & 0xFF), wr(5, lba >> 16 & 0xFF),
            wr(6, 0xE0 | lba >> 24 & 0x0F)]


def ide_data(length: int) -> Op:
    return lambda block: block.channel.read_data_block(length)


def test_ide_continues_a_multi_sector_read_mid_sector() -> None:
    def build(log: Log) -> Any:
        return IdeChannel(log.line(hw.IRQ_IDE0), disk(), None).command_block

    before = [*ide_select(3, 3), wr(7, 0x20), lambda b: b.read_string(0, 2, 100)]   # IRQ 14 still up
    after = [rd(7), rd(2), rd(3), lambda b: b.read_string(0, 2, 156), rd(7),
             lambda b: b.read_string(0, 4, 128), rd(7), lambda b: b.read_string(0, 2, 256), rd(7),
             rd(1), *ide_select(9, 1), wr(7, 0x30), rd(7),
             lambda b: b.write_string(0, 2, bytes(range(256)) * 2), rd(7),
             lambda b: b.channel.drives[0].read_sector(9), wr(7, 0xEC), rd(7), ide_data(512), rd(7)]
    check_twins(lambda log: _IdeWindow(build(log)), [_on_block(op) for op in before],
                [_on_block(op) for op in after])


class _IdeWindow:
    """The IDE command block, with the channel's state()/restore(), for check_twins."""

    state_type = IdeState

    def __init__(self, block) -> None:
        self.block = block

    def state(self) -> IdeState:
        return self.block.channel.state()

    def restore(self, state: IdeState) -> None:
        self.block.channel.restore(state)


def _on_block(op: Op) -> Op:
    return lambda window: op(window.block)


def test_ide_keeps_a_command_completing_later() -> None:
    clock = VirtualClock()

    def build(log: Log) -> Any:
        return _IdeWindow(IdeChannel(log.line(hw.IRQ_IDE0), disk(), None, latency=lambda: 10_000,
                                     now_ns=clock.now_ns).command_block)

    before = [*ide_select(5, 2), wr(7, 0xC4)]
    after = [rd(7), lambda b: clock.advance(9_999), rd(7), lambda b: clock.advance(1), rd(7),
             lambda b: b.read_string(0, 2, 256), rd(7), lambda b: clock.advance(10_000),
             lambda b: b.channel.poll(clock.now_ns()), rd(7), lambda b: b.read_string(0, 2, 256), rd(7)]
    original, copy = check_twins(build, [_on_block(op) for op in before], [_on_block(op) for op in after])
    assert original.block.channel.sectors_read == copy.block.channel.sectors_read == 2


# ------------------------------------------------------------------------------- LAPIC
def lapic_write(register: int, value: int) -> Op:
    return lambda lapic: lapic.write(register, 4, value)


def lapic_read(register: int) -> Op:
    return lambda lapic: lapic.read(register, 4)


def test_lapic_continues_its_timer_priorities_and_error_latch() -> None:
    clock = VirtualClock()

    def build(log: Log) -> Lapic:
        lapic = Lapic(clock)
        lapic.on_level_eoi(lambda vector: log.append(("level eoi", vector)))
        return lapic

    def taken(lapic: Lapic) -> tuple:
        return lapic.has_pending(), lapic.acknowledge()

    r = lapic_regs
    before = [lapic_write(r.SVR, 0x13F), lapic_write(r.TDCR, 0x0B), lapic_write(r.LVT_TIMER, 0x20020),
              lapic_write(r.TICR, 1_000_000), lapic_write(r.LVT_ERROR, 0x33),
              lambda l: l.accept_interrupt(0x61, level_triggered=True), taken,
              lambda l: l.accept_interrupt(0x45), lapic_write(r.TPR, 0x30), lapic_read(0x2F0),
              lambda l: clock.advance(1_500_000), lambda l: l.poll(clock.now_ns())]
    after = [lapic_read(r.TCCR), lapic_read(r.PPR), lapic_read(r.IRR_BASE + 0x10), lapic_read(r.ISR_BASE + 0x30),
             lambda l: l.next_deadline_ns(), taken, lapic_write(r.EOI, 0), taken, taken, lapic_write(r.EOI, 0),
             lapic_write(r.ESR, 0), lapic_read(r.ESR), lambda l: clock.advance(700_000),
             lambda l: l.poll(clock.now_ns()), taken, lapic_read(r.TCCR), lapic_write(r.TDCR, 0x03),
             lambda l: l.next_deadline_ns(), lambda l: clock.advance(20_000_000),
             lambda l: l.poll(clock.now_ns()), lapic_read(r.TCCR), taken, lapic_write(r.EOI, 0),
             lapic_write(r.EOI, 0), lapic_write(r.EOI, 0), lambda l: l.timer_interrupts_raised,
             lapic_write(r.ICR_LOW, 0x40055), taken, lapic_read(r.APR)]
    check_twins(build, before, after)


# ------------------------------------------------------------------------------- IOAPIC
def test_ioapic_keeps_remote_irr_and_pin_levels() -> None:
    clock = VirtualClock()

    class Pair:
        """An IOAPIC and its LAPIC, moved together."""

        def __init__(self, log: Log) -> None:
            self.lapic = Lapic(clock)
            self.lapic.write(lapic_regs.SVR, 4, 0x1FF)
            self.ioapic = Ioapic(self.lapic)
            self.lapic.on_level_eoi(lambda vector: log.append(("level eoi", vector)))

        def state(self):
            return PairState(self.lapic.state(), self.ioapic.state())

        def restore(self, state) -> None:
            self.lapic.restore(state.lapic)
            self.ioapic.restore(state.ioapic)

    @dataclasses.dataclass(frozen=True)
    class PairState:
        lapic: LapicState
        ioapic: IoapicState

    Pair.state_type = PairState

    def io_write(index: int, value: int) -> Op:
        return lambda p: (p.ioapic.write(IOREGSEL, 4, index), p.ioapic.write(IOWIN, 4, value))

    def io_read(index: int) -> Op:
        return lambda p: (p.ioapic.write(IOREGSEL, 4, index), p.ioapic.read(IOWIN, 4))

    def taken(p) -> tuple:
        return p.lapic.has_pending(), p.lapic.acknowledge()

    before = [io_write(REG_TABLE + 2 * 9, 0x8000 | 0x49), io_write(REG_TABLE + 2 * 9 + 1, 0),
              io_write(REG_TABLE + 2 * 4, 0x24), lambda p: p.ioapic.set_irq(9, True), taken,
              lambda p: p.ioapic.set_irq(4, True), lambda p: p.ioapic.write(IOREGSEL, 4, 0x13)]
    after = [lambda p: p.ioapic.read(IOREGSEL, 4), io_read(REG_TABLE + 2 * 9), taken,
             lambda p: p.lapic.write(lapic_regs.EOI, 4, 0), lambda p: p.lapic.write(lapic_regs.EOI, 4, 0),
             taken, io_read(REG_TABLE + 2 * 9), lambda p: p.ioapic.set_irq(4, True),
             lambda p: p.ioapic.set_irq(4, False), lambda p: p.ioapic.set_irq(4, True), taken,
             lambda p: p.ioapic.set_irq(9, False), lambda p: p.lapic.write(lapic_regs.EOI, 4, 0),
             lambda p: p.lapic.write(lapic_regs.EOI, 4, 0), io_read(REG_TABLE + 2 * 9), io_read(0)]
    check_twins(Pair, before, after)


# ------------------------------------------------------------------------------- PIC
def test_pic_pair_continues_mid_initialisation_with_requests_in_service() -> None:
    def build(log: Log) -> Pic8259Pair:
        return Pic8259Pair()

    def on(chip: str, op: Op) -> Op:
        return lambda pair: op(getattr(pair, chip))

    def taken(pair) -> tuple:
        return pair.has_pending(), pair.acknowledge()

    init = [on("master", wr(0, 0x11)), on("master", wr(1, 0x20)), on("master", wr(1, 0x04)),
            on("master", wr(1, 0x01)), on("slave", wr(0, 0x19)), on("slave", wr(1, 0x28)),
            on("slave", wr(1, 0x02)), on("slave", wr(1, 0x01)), on("master", wr(1, 0x00)),
            on("slave", wr(1, 0x00))]
    before = [*init, lambda p: p.set_irq(3, True), taken, lambda p: p.set_irq(5, True),
              lambda p: p.set_irq(10, True), on("master", wr(0, 0x0B)), on("slave", wr(0, 0x11))]
    after = [on("master", rd(0)), taken, on("slave", wr(1, 0x38)), on("slave", wr(1, 0x02)),
             on("slave", wr(1, 0x01)), on("slave", wr(1, 0x00)), lambda p: p.set_irq(12, True), taken,
             on("slave", wr(0, 0x20)), on("master", wr(0, 0x20)), taken, on("master", wr(0, 0x20)),
             on("master", wr(0, 0x20)), taken, on("master", rd(0)), on("master", rd(1)),
             on("master", wr(0, 0x0C)), on("master", rd(0))]
    check_twins(build, before, after)


# ------------------------------------------------------------------------------- CMOS
def test_cmos_keeps_its_index_and_ram() -> None:
    clock = VirtualClock()
    before = [wr(0, 0x8B), wr(1, 0x06), wr(0, 0x40), wr(1, 0x77), wr(0, REG_SECONDS), rd(1), wr(0, 0x40)]
    after = [rd(0), rd(1), wr(0, 0x40), rd(1), wr(0, 0x0B), rd(1), wr(0, REG_C), rd(1),
             lambda c: clock.advance(3_000_000_000), wr(0, REG_SECONDS), rd(1), wr(0, 0x04), rd(1),
             lambda c: c.time_reads]
    check_twins(lambda log: Cmos(clock, 64 << 20), before, after)


# ------------------------------------------------------------------------------- i8042
def test_i8042_keeps_scancodes_replies_and_a_command_awaiting_data() -> None:
    def build(log: Log) -> I8042:
        return I8042(log.line(hw.IRQ_KEYBOARD), lambda: log.append(("reset",)))

    before = [lambda k: k.feed_scancodes(b"\x1e\x9e\x30\xb0"), rd(0), wr(4, 0xD1)]
    after = [rd(4), wr(0, 0x03), rd(4), lambda k: k.a20_enabled, rd(0), wr(4, 0x20), rd(4), rd(0),
             rd(0), rd(0), rd(4), wr(4, 0xAD), lambda k: k.feed_scancodes(b"\x1f"), rd(4), wr(4, 0xAE),
             rd(4), rd(0), wr(4, 0xFE)]
    original, _ = check_twins(build, before, after)
    assert original.a20_enabled


# ------------------------------------------------------------------------------- small ones
def test_cga_imcr_and_debug_ports_keep_what_they_latched() -> None:
    check_twins(lambda log: CgaCrt(), [wr(0, 0x0E), wr(1, 0x07), wr(0, 0x0F), wr(1, 0xD0)],
                [rd(0), rd(1), wr(0, 0x0E), rd(1), lambda c: c.cursor])
    check_twins(lambda log: Imcr(), [wr(0, 0x70), wr(1, 0x01)], [rd(1), rd(0), wr(1, 0), rd(1)])
    check_twins(lambda log: DebugExitPort(lambda why: log.append(("shutdown", why))),
                [wr(0, 0x8A00, 2)], [wr(0, 0x8AE0, 2), wr(0, 0x8AE0, 2)])
    check_twins(lambda log: PostPort(), [wr(0, 0x42)], [rd(0), wr(0, 0x43), rd(0)])
    check_twins(lambda log: DebugConsolePort(lambda byte: log.append(("out", byte))), [wr(0, 0x41)],
                [wr(0, 0x42), rd(0)])


def test_every_device_states_its_state_type() -> None:
    for device_class, state_class in ((Uart16550, UartState), (IdeChannel, IdeState), (Lapic, LapicState),
                                      (Ioapic, IoapicState), (Pic8259Pair, PicPairState), (Cmos, CmosState),
                                      (I8042, I8042State), (CgaCrt, CgaState), (Imcr, ImcrState),
                                      (DebugExitPort, DebugExitState), (PostPort, PostState),
                                      (DebugConsolePort, DebugConsoleState)):
        assert device_class.state_type is state_class
        assert dataclasses.is_dataclass(state_class)


# ------------------------------------------------------------------------------- untrusted input
def plain_state(device: Any) -> dict:
    return msgpack.unpackb(msgpack.packb(to_plain(device.state())), raw=False)


def fresh_lapic() -> Lapic:
    return Lapic(VirtualClock())


def fresh_uart() -> Uart16550:
    return Uart16550(IrqLine(4), lambda byte: None)


def fresh_ide() -> IdeChannel:
    return IdeChannel(IrqLine(14), disk(), None)


@pytest.mark.parametrize("make, field, value, message", [
    (fresh_uart, "ier", "1", "UartState.ier: expected an int"),
    (fresh_uart, "ier", True, "UartState.ier: expected an int"),
    (fresh_uart, "ier", 256, "UartState.ier: 256 is outside"),
    (fresh_uart, "rbr", -1, "UartState.rbr: -1 is outside"),
    (fresh_uart, "tx_interrupt_pending", 1, "UartState.tx_interrupt_pending: expected a bool"),
    (fresh_uart, "pending", "abc", "UartState.pending: expected bytes"),
    (fresh_uart, "pending", b"x" * ((1 << 24) + 1), "UartState.pending: length"),
    (fresh_uart, "divisor", 1 << 64, "UartState.divisor"),
    (fresh_uart, "tx_busy_until", 1 << 63, "UartState.tx_busy_until"),
    (fresh_lapic, "irr", bytes(33), "LapicState.irr: length 33, expected 32"),
    (fresh_lapic, "irr", bytes(31), "LapicState.irr: length 31"),
    (fresh_lapic, "lvt", [0] * 7, "LapicState.lvt: length 7, expected 6"),
    (fresh_lapic, "lvt", [0, 0, 0, 0, 0, 1 << 32], "LapicState.lvt[5]: 4294967296 is outside"),
    (fresh_lapic, "lvt", {"0": 1}, "LapicState.lvt: expected an array"),
    (fresh_lapic, "timer_deadline_ns", 5, "LapicState.timer_deadline_ns: a running timer"),
    (fresh_lapic, "apic_id", None, "LapicState.apic_id: expected an int"),
    (fresh_ide, "transfer", "erase", "IdeState.transfer: 'erase' is not one of"),
    (fresh_ide, "buffer", bytes(513), "IdeState.buffer: length 513"),
    (fresh_ide, "lba", [1, 2], "IdeState.lba: length 2, expected 3"),
    (fresh_ide, "completion", "write_done", "IdeState.completion: a completion needs both"),
    (lambda: Cmos(VirtualClock(), 1 << 20), "index", 0x80, "CmosState.index: 128 is outside"),
    (lambda: Cmos(VirtualClock(), 1 << 20), "ram", bytes(127), "CmosState.ram: length 127"),
    (lambda: Ioapic(fresh_lapic()), "low", [0] * 23, "IoapicState.low: length 23, expected 24"),
    (lambda: Ioapic(fresh_lapic()), "levels", 1 << 24, "IoapicState.levels"),
    (Imcr, "value", 2, "ImcrState.value: 2 is outside"),
])
def test_from_plain_refuses_a_bad_field_naming_it(make, field, value, message) -> None:
    device = make()
    data = plain_state(device)
    data[field] = value
    with pytest.raises(ValueError) as refused:
        from_plain(type(device).state_type, data)
    assert message in str(refused.value)


def test_from_plain_refuses_missing_unknown_and_nested_bad_fields() -> None:
    pic = Pic8259Pair()
    data = plain_state(pic)
    data["slave"]["init_step"] = 1
    with pytest.raises(ValueError, match=r"PicPairState\.slave\.init_step: 1 is not one of"):
        from_plain(PicPairState, data)
    data = plain_state(pic)
    data["master"] = [1, 2]
    with pytest.raises(ValueError, match=r"PicPairState\.master: expected a map"):
        from_plain(PicPairState, data)
    data = plain_state(fresh_uart())
    del data["lcr"]
    with pytest.raises(ValueError, match=r"UartState\.lcr: missing"):
        from_plain(UartState, data)
    data = plain_state(fresh_uart())
    data["extra"] = 1
    with pytest.raises(ValueError, match=r"UartState: unknown field 'extra'"):
        from_plain(UartState, data)
    with pytest.raises(ValueError, match=r"PicState: expected a map"):
        from_plain(PicState, [0] * 14)
    with pytest.raises(ValueError, match=r"UartState: unknown field"):
        from_plain(UartState, {1: 2})


def test_save_plain_and_restore_plain_move_a_device() -> None:
    from replayvm.devices.state import restore_plain, save_plain
    source = Imcr()
    source.write(0, 1, 0x70)
    source.write(1, 1, 0x01)
    copy = Imcr()
    restore_plain(copy, msgpack.unpackb(msgpack.packb(save_plain(source))))
    assert copy.apic_mode and copy.state() == source.state()
    with pytest.raises(ValueError, match=r"ImcrState\.selected: expected an int"):
        restore_plain(copy, {"selected": b"\x70", "value": 1})
