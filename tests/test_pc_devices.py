"""The plain PC's devices alone: the 8254 on a clock the test moves, the power-off ports, the 8259
pair taking a timer interrupt the trace recorded, the IDE soft-reset signature, CGA `outw`."""

from __future__ import annotations

from replayvm import hw
from replayvm.devices.cga import CgaCrt
from replayvm.devices.disk import Disk
from replayvm.devices.ide import IdeChannel
from replayvm.devices.irq import IrqLine
from replayvm.devices.pic import Pic8259Pair
from replayvm.devices.pit import CLOCK_SOURCE, Pit8254, PitState, is_time_read
from replayvm.devices.poweroff import PowerOff
from replayvm.devices.state import from_plain, restore_plain, save_plain

PERIOD_COUNTS = 11932                        # pintos: 100 Hz
PERIOD_NS = PERIOD_COUNTS * 10**9 // hw.PIT_HZ


class Clock:
    def __init__(self) -> None:
        self.ns = 0

    def now_ns(self) -> int:
        return self.ns


class Edges:
    def __init__(self) -> None:
        self.rises = 0

    def set_irq(self, pin: int, level: bool) -> None:
        self.rises += level


def programmed_pit(clock: Clock) -> tuple[Pit8254, Edges]:
    edges = Edges()
    pit = Pit8254(clock, IrqLine(0, [edges]))
    pit.write(3, 1, 0x34)                    # channel 0, low then high byte, mode 2
    pit.write(0, 1, PERIOD_COUNTS & 0xFF)
    pit.write(0, 1, PERIOD_COUNTS >> 8)
    return pit, edges


def test_channel_0_in_mode_2_raises_irq0_once_per_period():
    clock = Clock()
    pit, edges = programmed_pit(clock)
    assert pit.next_deadline_ns() in (PERIOD_NS, PERIOD_NS + 1)
    clock.ns = PERIOD_NS - 10
    pit.poll(clock.ns)
    assert edges.rises == 0
    for period in range(1, 6):
        clock.ns = period * PERIOD_NS + 5
        pit.poll(clock.ns)
        assert edges.rises == period
    clock.ns = 50 * PERIOD_NS + 5              # many periods missed: one edge (one IRR bit)
    pit.poll(clock.ns)
    assert edges.rises == 6
    assert clock.ns < pit.next_deadline_ns() <= clock.ns + PERIOD_NS


def test_a_latched_count_reads_low_then_high_and_counts_down_with_time():
    clock = Clock()
    pit, _ = programmed_pit(clock)
    clock.ns = PERIOD_NS // 2
    pit.write(3, 1, 0x00)                    # latch channel 0
    clock.ns += PERIOD_NS // 4               # the latched value does not move
    count = pit.read(0, 1) | pit.read(0, 1) << 8
    assert abs(count - PERIOD_COUNTS // 2) <= 2
    assert all(is_time_read(offset) for offset in (0, 1, 2)) and not is_time_read(3)
    assert CLOCK_SOURCE == "pit"


def test_channel_2_mode_3_and_port_b_keep_the_speaker_bits_only():
    clock = Clock()
    pit, edges = programmed_pit(clock)
    pit.write(3, 1, 0xB6)                    # channel 2, word, mode 3
    pit.write(2, 1, 0x34)
    pit.write(2, 1, 0x12)
    pit.port_b.write(0, 1, 0xF3)
    assert pit.port_b.read(0, 1) == 0x03     # no refresh toggle or OUT2: no read of it is time
    assert pit.channels[2].reload == 0x1234 and pit.channels[2].mode == 3
    clock.ns = 3 * PERIOD_NS
    pit.poll(clock.ns)
    assert edges.rises == 1                  # channel 2 never interrupts; channel 0 did, once


def test_replay_fires_irq0_only_when_the_trace_says_and_state_survives_a_round_trip():
    clock = Clock()
    pit, edges = programmed_pit(clock)
    pit.follows_trace = True
    clock.ns = 10 * PERIOD_NS
    pit.poll(clock.ns)
    assert edges.rises == 0
    assert pit.fire_recorded() and edges.rises == 1
    other, _ = programmed_pit(Clock())
    restore_plain(other, save_plain(pit))
    assert other.state() == pit.state()
    assert from_plain(PitState, save_plain(pit)) == pit.state()


def test_the_pic_pair_fires_the_recorded_timer_before_acknowledging():
    """While recording, IRQ0 was latched when IRQ4 also waited: the 8259 gave IRQ0 first. On replay
    the timer follows the trace, so it must fire before the chips choose, or IRQ4 would win."""
    pic = Pic8259Pair()
    for port, value in ((0, 0x11), (1, 0x20), (1, 0x04), (1, 0x01), (1, 0x00)):
        pic.master.write(port, 1, value)
    fired = []
    line = IrqLine(0, [pic])
    pic.trace_timers[0] = lambda: (fired.append(1), line.pulse())
    pic.set_irq(4, True)
    assert pic.take_recorded(0x20) is True and fired == [1]
    pic.master.write(0, 1, 0x20)             # EOI
    assert pic.take_recorded(0x24) is True and fired == [1]      # IRQ4 was pending: no firing
    assert pic.irq_of_vector(0x76) == 14 and pic.irq_of_vector(0x22) is None     # slave: BIOS base


def test_power_off_ports_end_the_run_with_the_guests_status():
    ends: list[tuple[str, int]] = []
    power = PowerOff(lambda why, status: ends.append((why, status)))
    power.acpi.write(0, 2, 0x1234)
    for byte in b"ShutShutdown":
        power.bochs.write(0, 1, byte)
    power.debug_exit.write(0, 1, 0x31)
    power.acpi.write(0, 2, hw.POWER_OFF_VALUE)
    assert [status for _, status in ends] == [0, 99, 0]
    assert "Shutdown" in ends[0][0] and "0xb004" in ends[2][0]


def test_ide_soft_reset_leaves_the_signature_pintos_looks_for():
    disk = Disk(bytes(512 * 4), "disk0")
    ide = IdeChannel(IrqLine(14), disk, None)
    ide.write_register(2, 1, 0x55)
    ide.write_register(3, 1, 0xAA)
    ide.write_control(0x04)
    ide.write_control(0x00)
    read = ide.read_register
    assert (read(1, 1), read(2, 1), read(3, 1), read(4, 1), read(5, 1)) == (1, 1, 1, 0, 0)
    assert read(7, 1) & 0x40 and not read(7, 1) & 0x80          # ready, not busy
    ide.write_register(6, 1, 0xB0)                               # the slave: absent
    assert read(2, 1) == 0 and read(3, 1) == 0


def test_cga_cursor_written_with_one_outw_reads_back():
    cga = CgaCrt()
    cga.write(0, 2, 0x0E | (0x07 << 8))
    cga.write(0, 2, 0x0F | (0xD0 << 8))
    assert cga.cursor == 0x07D0 < 2000 + 1


def test_uart_enabling_the_thr_empty_interrupt_with_thr_empty_raises_irq4():
    """pintos's serial driver queues output and enables IER bit 1 to be told the THR is empty:
    without that interrupt its 64-byte queue fills and the kernel stalls."""
    from replayvm.devices.uart import Uart16550

    edges = Edges()
    out: list[int] = []
    uart = Uart16550(IrqLine(4, [edges]), out.append)
    uart.write(1, 1, 0x01)                   # receive interrupts only: nothing to say
    assert edges.rises == 0
    uart.write(1, 1, 0x03)                   # + THR empty, and it is empty: IRQ4
    assert edges.rises == 1 and uart.read(2, 1) & 0x0F == 0x02
    uart.write(0, 1, ord("x"))               # the byte goes, THR empty again: a new edge
    assert out == [ord("x")] and edges.rises == 2
