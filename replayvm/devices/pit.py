"""The 8254 programmable interval timer (channels 0 and 2) and port 0x61, on the machine's clock.

Channel 0 drives IRQ0 (through the 8259 pair on the plain PC); channel 2 drives the speaker,
gated by port 0x61 bit 0. Modelled modes: 0 (interrupt on terminal count, one shot), 2 (rate
generator) and 3 (square wave), which are what PC kernels program (pintos: channel 0 mode 2 at
100 Hz, channel 2 mode 3 for its bell); the other modes count like mode 0. Channel 1 (DRAM
refresh on old PCs) answers but never interrupts. Counts are binary (the BCD bit is kept but
ignored).

Time: a counter's value is computed from the guest clock (`GuestClock`) at 1.193182 MHz since the
count was loaded, so every read of a counter is a time value: the recorder logs it as a CLOCK
record (`is_time_read`) and replay hands back the recorded value. IRQ0 is an edge at each period's
end, raised by `poll` as the clock passes it; on replay `follows_trace` is set and the timer
fires only when the trace took its interrupt (`fire_recorded`), as the LAPIC timer does.

Port 0x61 keeps its gate and speaker bits; its refresh toggle (bit 4) and OUT2 (bit 5) read as 0,
so that no read of it is a time value.
"""

from __future__ import annotations

from dataclasses import dataclass

from replayvm import hw
from replayvm.devices.irq import IrqLine
from replayvm.devices.state import NS, U8, U16, Choice

COMMAND = 3                       # offset of the mode/command register
CHANNELS = 3
TIMER_CHANNEL, SPEAKER_CHANNEL = 0, 2
READ_BACK = 3                     # channel field 3 in a command: read-back
ACCESS_LATCH, ACCESS_LOW, ACCESS_HIGH, ACCESS_WORD = 0, 1, 2, 3
MODE_TERMINAL_COUNT, MODE_RATE, MODE_SQUARE = 0, 2, 3
FULL_COUNT = 0x10000              # a count of 0 means 65536
NS_PER_S = 1_000_000_000
PORT_B_WRITABLE = 0x0F            # gate 2, speaker data, parity/channel check enables
CLOCK_SOURCE = "pit"              # the source name of counter reads in a trace

# Register names by offset, as the `devices` table of analyze shows them (`pit.counter0`).
REGISTERS = {0: "counter0", 1: "counter1", 2: "counter2", COMMAND: "command"}
PORT_B_REGISTERS = {0: ""}        # `port61`


def is_time_read(offset: int) -> bool:
    """Does a read at `offset` return a time value (a counter or its latched status)?"""
    return 0 <= offset < CHANNELS


@dataclass(frozen=True)
class PitChannelState:
    """One counter: how it was programmed, when its count was loaded, the read/write byte
    toggles and any latched count or status."""
    mode: Choice(0, 1, 2, 3, 4, 5)
    access: Choice(1, 2, 3)
    reload: U16
    loaded: bool
    start_ns: NS
    next_irq_ns: NS | None
    write_high: bool
    read_high: bool
    latched: U16 | None
    status_latched: U8 | None
    partial: U8


@dataclass(frozen=True)
class PitState:
    """The three counters and port 0x61's writable bits."""
    channel0: PitChannelState
    channel1: PitChannelState
    channel2: PitChannelState
    port_b: U8


class _Channel:
    def __init__(self) -> None:
        self.mode = MODE_SQUARE
        self.access = ACCESS_WORD
        self.reload = 0
        self.loaded = False               # a count has been written since the mode was set
        self.start_ns = 0
        self.next_irq_ns: int | None = None
        self.write_high = False           # word access: the next byte written is the high one
        self.read_high = False
        self.latched: int | None = None   # a latched count waiting to be read (16 bits)
        self.status_latched: int | None = None
        self.partial = 0                  # the low byte of a word being written

    @property
    def period(self) -> int:
        return self.reload or FULL_COUNT

    def ticks(self, now_ns: int) -> int:
        return max(0, now_ns - self.start_ns) * hw.PIT_HZ // NS_PER_S

    def count(self, now_ns: int) -> int:
        """The counting element now."""
        if not self.loaded:
            return self.reload
        elapsed = self.ticks(now_ns)
        if self.mode in (MODE_RATE, MODE_SQUARE):
            step = 2 if self.mode == MODE_SQUARE else 1
            return (self.period - (elapsed * step) % self.period) % FULL_COUNT
        return (self.period - elapsed) % FULL_COUNT

    def output(self, now_ns: int) -> bool:
        if not self.loaded:
            return self.mode != MODE_TERMINAL_COUNT
        elapsed = self.ticks(now_ns)
        if self.mode == MODE_SQUARE:
            return elapsed % self.period < (self.period + 1) // 2
        if self.mode == MODE_RATE:
            return elapsed % self.period != self.period - 1
        return elapsed >= self.period

    def time_of_tick(self, ticks: int) -> int:
        """The first guest ns at which `ticks` input clocks have passed since the load."""
        return self.start_ns - (-ticks * NS_PER_S // hw.PIT_HZ)

    def state(self) -> PitChannelState:
        return PitChannelState(mode=self.mode, access=self.access, reload=self.reload,
                               loaded=self.loaded, start_ns=self.start_ns, next_irq_ns=self.next_irq_ns,
                               write_high=self.write_high, read_high=self.read_high,
                               latched=self.latched, status_latched=self.status_latched,
                               partial=self.partial)

    def restore(self, state: PitChannelState) -> None:
        self.mode, self.access, self.reload, self.loaded = state.mode, state.access, state.reload, state.loaded
        self.start_ns, self.next_irq_ns = state.start_ns, state.next_irq_ns
        self.write_high, self.read_high = state.write_high, state.read_high
        self.latched, self.status_latched, self.partial = state.latched, state.status_latched, state.partial


class Pit8254:
    """Ports 0x40-0x43 (a Device); `port_b` is the device at 0x61."""

    name = "pit"
    state_type = PitState

    def __init__(self, clock, irq: IrqLine) -> None:
        self.clock = clock
        self.irq = irq
        self.follows_trace = False        # replay: IRQ0 fires when the trace says (fire_recorded)
        self.port_b = PortB(self)
        self.interrupts_raised = 0
        self.reset()

    def reset(self) -> None:
        self.channels = [_Channel() for _ in range(CHANNELS)]
        self.port_b_value = 0

    # ---------------------------------------------------------------- registers
    def read(self, offset: int, size: int) -> int:
        if not is_time_read(offset):
            return 0xFF                   # the command register is write-only
        channel = self.channels[offset]
        if channel.status_latched is not None:
            status, channel.status_latched = channel.status_latched, None
            return status
        if channel.latched is not None:
            value = channel.latched
        else:
            value = channel.count(self.clock.now_ns())
        if channel.access == ACCESS_LOW:
            channel.latched = None
            return value & 0xFF
        if channel.access == ACCESS_HIGH:
            channel.latched = None
            return value >> 8 & 0xFF
        if channel.read_high:
            channel.read_high = False
            channel.latched = None
            return value >> 8 & 0xFF
        channel.read_high = True
        if channel.latched is None:
            channel.latched = value       # the high byte read next belongs to this count
        return value & 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == COMMAND:
            self._command(value)
        elif 0 <= offset < CHANNELS:
            self._write_count(offset, value)

    def _command(self, value: int) -> None:
        select = value >> 6
        now = self.clock.now_ns()
        if select == READ_BACK:
            for index in range(CHANNELS):
                if not value & (2 << index):
                    continue
                channel = self.channels[index]
                if not value & 0x20 and channel.latched is None:
                    channel.latched = channel.count(now)
                if not value & 0x10 and channel.status_latched is None:
                    channel.status_latched = (channel.output(now) << 7 | (not channel.loaded) << 6
                                              | channel.access << 4 | channel.mode << 1)
            return
        channel = self.channels[select]
        access = value >> 4 & 3
        if access == ACCESS_LATCH:
            if channel.latched is None:
                channel.latched = channel.count(now)
            return
        self._catch_up(now)
        mode = value >> 1 & 7
        channel.mode = mode - 4 if mode >= 6 else mode       # 6 and 7 are 2 and 3
        channel.access = access
        channel.loaded = False
        channel.next_irq_ns = None
        channel.write_high = channel.read_high = False
        channel.latched = None

    def _write_count(self, index: int, value: int) -> None:
        channel = self.channels[index]
        if channel.access == ACCESS_LOW:
            reload = value
        elif channel.access == ACCESS_HIGH:
            reload = value << 8
        elif not channel.write_high:
            channel.partial = value
            channel.write_high = True
            return
        else:
            channel.write_high = False
            reload = channel.partial | value << 8
        now = self.clock.now_ns()
        self._catch_up(now)
        channel.reload = reload
        channel.loaded = True
        channel.start_ns = now
        if index == TIMER_CHANNEL:
            channel.next_irq_ns = channel.time_of_tick(channel.period)

    # ---------------------------------------------------------------- IRQ0
    def _catch_up(self, now_ns: int) -> None:
        """Let what was due before a reprogramming happen first."""
        if not self.follows_trace:
            self.poll(now_ns)

    def poll(self, now_ns: int) -> None:
        """Raise IRQ0 if a period of channel 0 ended by `now_ns` (several missed: one edge, as
        the 8259's one IRR bit would see them)."""
        channel = self.channels[TIMER_CHANNEL]
        due = channel.next_irq_ns
        if due is None or now_ns < due or self.follows_trace:
            return
        self._advance(channel, now_ns)
        self._edge()

    def _advance(self, channel: _Channel, now_ns: int) -> None:
        if channel.mode in (MODE_RATE, MODE_SQUARE):
            periods = channel.ticks(now_ns) // channel.period + 1
            channel.next_irq_ns = channel.time_of_tick(periods * channel.period)
        else:
            channel.next_irq_ns = None

    def _edge(self) -> None:
        self.interrupts_raised += 1
        self.irq.pulse()

    def next_deadline_ns(self) -> int | None:
        return self.channels[TIMER_CHANNEL].next_irq_ns

    def fire_recorded(self) -> bool:
        """Replay: the recording took IRQ0's interrupt here; raise it now. False when channel 0
        is not counting (the replayed timer could not have fired)."""
        channel = self.channels[TIMER_CHANNEL]
        if not channel.loaded:
            return False
        if channel.next_irq_ns is not None:
            self._advance(channel, max(channel.next_irq_ns, self.clock.now_ns()))
        self._edge()
        return True

    # ---------------------------------------------------------------- port 0x61
    def read_port_b(self) -> int:
        return self.port_b_value

    def write_port_b(self, value: int) -> None:
        self.port_b_value = value & PORT_B_WRITABLE

    # ---------------------------------------------------------------- snapshots
    def state(self) -> PitState:
        first, second, third = (channel.state() for channel in self.channels)
        return PitState(channel0=first, channel1=second, channel2=third, port_b=self.port_b_value)

    def restore(self, state: PitState) -> None:
        for channel, saved in zip(self.channels, (state.channel0, state.channel1, state.channel2)):
            channel.restore(saved)
        self.port_b_value = state.port_b


class PortB:
    """Port 0x61 (system control port B): the speaker's gate and data bits, kept by the PIT."""

    name = "port61"

    def __init__(self, pit: Pit8254) -> None:
        self.pit = pit

    def read(self, offset: int, size: int) -> int:
        return self.pit.read_port_b()

    def write(self, offset: int, size: int, value: int) -> None:
        self.pit.write_port_b(value)
