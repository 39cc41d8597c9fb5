"""Chaos recording: perturb what a guest must not rely on, so timing bugs show up more often.

With a seed, the machine
- stalls the guest's CPU at random moments (exponentially distributed gaps, mean
  `mean_gap_ns` of guest time the CPU is busy, not halted, with the timer running and unmasked):
  guest time jumps ahead to the timer's next programmed deadline, so that tick lands right
  there, at whatever instruction the guest was at -- as on a host that deschedules a virtual
  CPU. The timer is whichever is due first: the local APIC's (xv6) or, on the plain PC, the
  8254's (pintos). A halted CPU is never stalled (idle time would only fly by). A tick
  then interrupts the guest, on average, every `mean_gap_ns` of its work instead of every timer
  period: a kernel with a race around preemption points meets it far more often;
- gives the IDE disk and the UART transmitter random completion latencies (`DeviceLatency`):
  a disk command stays busy, and its interrupt waits, for an exponentially distributed time; the
  transmit register stays full for a while after each byte. A driver that assumes completion
  is immediate (as under QEMU or our own default devices) meets real-hardware timing.

Guest time stays honest. Every tick is a programmed tick at its programmed guest time; none is
added: the guest's tick count, its TSC, the RTC and the LAPIC current count all agree, and a
guest second holds exactly the ticks the guest asked for (`sleep(10)` sleeps ten ticks of
guest time, `uptime` keeps pace with the RTC). What changes is how much the guest gets done per
guest second: a CPU that is often stalled is a slow CPU, which no correct kernel may rely on.
The price: guest time runs ahead of the host's (about timer period / mean gap times as fast
while the guest is busy: some sixty times for a 10 ms timer), so the guest's RTC runs ahead of
the wall; `--timeout` leaves the stalled time out (`Machine.running_ns`). (Extra timer interrupts, as earlier versions raised, would keep guest
time on the host's pace but make every kernel that counts ticks think time flies: xv6's uptime
ran about sixty times too fast. Preemption and timekeeping both ride on the tick, so a denser
stream of preemptions must either be a faster guest clock or a lying one; chaos picks the
honest clock.)

A stall never jumps over a deadline, nor brings a tick while the last one still waits in the
IRR (either would merge two ticks into one IRR bit and lose one), and never lasts more than
`MAX_STALL_NS` (a one-shot timer set far ahead is left alone). Everything still enters through
the devices and the interrupt controller, so the recorder logs each clock read, status read and
interrupt at its exact position and replay reproduces the run exactly; the seed goes into the
trace header.

This module sits beside `machine.py`, not under `record/`: the machine wires it into its clock,
LAPIC and devices, and a module of the machine layer never imports from the layers above it
(`tests/test_layers.py`).
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from replayvm import hw
from replayvm.clock import GuestClock
from replayvm.devices.lapic import LVT_TIMER, Lapic
from replayvm.devices.pic import Pic8259
from replayvm.devices.pit import Pit8254

DEFAULT_MEAN_GAP_NS = 150_000            # a tick every ~150 us of guest work: ~60 per 10 ms period
MAX_STALL_NS = 20_000_000                # the longest stall: two periods of a 100 Hz timer
IDE_MEAN_LATENCY_NS = 100_000            # a fast disk's command completion
UART_MEAN_LATENCY_NS = 20_000            # how long the transmit register stays full per byte
# What matters to interleavings is how many instructions run between perturbations. On the
# host's clock the emulator runs some 20 instructions per microsecond; the virtual clock counts
# 1,000 (one per ns). Under the virtual clock every chaos time is this many times shorter, so a
# virtual-clock chaos run perturbs the guest about as densely, per instruction, as a wall-clock
# one (and a disk poll loop spins as many times, not fifty times more).
VIRTUAL_CLOCK_SCALE = 50
SEED_BITS = 32                           # a seed printed for a person to type back: short


def new_seed() -> int:
    """A seed for a chaos run that was given none (printed, so the run can be made again)."""
    return secrets.randbelow(1 << SEED_BITS)


@dataclass(frozen=True)
class ChaosTimes:
    """Mean guest ns between stalls, and of the disk's and the serial port's latencies."""

    stall_gap_ns: int = DEFAULT_MEAN_GAP_NS
    ide_latency_ns: int = IDE_MEAN_LATENCY_NS
    uart_latency_ns: int = UART_MEAN_LATENCY_NS

    @classmethod
    def for_clock(cls, virtual: bool) -> "ChaosTimes":
        if not virtual:
            return cls()
        return cls(DEFAULT_MEAN_GAP_NS // VIRTUAL_CLOCK_SCALE, IDE_MEAN_LATENCY_NS // VIRTUAL_CLOCK_SCALE,
                   UART_MEAN_LATENCY_NS // VIRTUAL_CLOCK_SCALE)


class LapicTimerSource:
    """The local APIC's timer, as chaos sees it (xv6, the demo, the 64-bit guests)."""

    def __init__(self, lapic: Lapic) -> None:
        self.lapic = lapic

    def next_deadline_ns(self) -> int | None:
        return self.lapic.next_deadline_ns()             # None while masked

    def tick_waiting(self) -> bool:
        return bool(self.lapic.irr >> (self.lapic.lvt[LVT_TIMER] & 0xFF) & 1)


class PitTimerSource:
    """The 8254's channel 0 behind the master 8259's IRQ 0, as chaos sees it (the plain PC:
    pintos ticks with it and never starts its local APIC's timer)."""

    IRQ_BIT = 1 << hw.IRQ_TIMER

    def __init__(self, pit: Pit8254, pic: Pic8259) -> None:
        self.pit = pit
        self.pic = pic

    def next_deadline_ns(self) -> int | None:
        if self.pic.imr & self.IRQ_BIT:                   # masked: a tick brought forward shows nothing
            return None
        return self.pit.next_deadline_ns()

    def tick_waiting(self) -> bool:
        return bool(self.pic.irr & self.IRQ_BIT)


class TimerSource(Protocol):
    def next_deadline_ns(self) -> int | None: ...
    def tick_waiting(self) -> bool: ...


class TimerChaos:
    """Seeded CPU stalls that bring the next programmed timer tick forward in the guest's work
    (see the module docstring). With several timers (the plain PC has the 8254 and a local
    APIC), a stall brings forward whichever tick is due first."""

    def __init__(self, timers: Sequence[TimerSource], clock: GuestClock, seed: int,
                 mean_gap_ns: int = DEFAULT_MEAN_GAP_NS) -> None:
        self.timers = list(timers)
        self.clock = clock
        self.seed = seed
        self.random = random.Random(seed)
        self.mean_gap_ns = mean_gap_ns
        self.next_ns: int | None = None
        self.stalls = 0
        self.stalled_ns = 0

    def _next_tick(self) -> tuple[int, TimerSource] | None:
        due = [(deadline, timer) for timer in self.timers
               if (deadline := timer.next_deadline_ns()) is not None]
        return min(due, key=lambda pair: pair[0]) if due else None

    def poll(self, now_ns: int) -> int | None:
        """Stall if one is due (the clock jumps to the next tick); return ns until the next
        stall (None: every timer is off or masked, nothing to bring forward)."""
        next_tick = self._next_tick()
        if next_tick is None:
            self.next_ns = None
            return None
        deadline, timer = next_tick
        if self.next_ns is None:
            self.next_ns = now_ns + self._gap()
        if now_ns >= self.next_ns:
            stall = deadline - now_ns
            if 0 < stall <= MAX_STALL_NS and not timer.tick_waiting():
                self.clock.advance(stall)
                self.stalls += 1
                self.stalled_ns += stall
                now_ns = deadline
            self.next_ns = now_ns + self._gap()
        return self.next_ns - now_ns

    def idle(self, ns: int) -> None:
        """The guest was halted for `ns`: the next stall waits for as much more work."""
        if self.next_ns is not None:
            self.next_ns += ns

    def _gap(self) -> int:
        return max(1, int(self.random.expovariate(1.0 / self.mean_gap_ns)))


class DeviceLatency:
    """Seeded random completion delays for one device (its own stream, so that one device's
    activity does not shift another's delays)."""

    def __init__(self, seed: int, device: str, mean_ns: int) -> None:
        self.random = random.Random(f"{seed}:{device}")
        self.mean_ns = mean_ns
        self.delays = 0

    def __call__(self) -> int:
        self.delays += 1
        return max(1, int(self.random.expovariate(1.0 / self.mean_ns)))
