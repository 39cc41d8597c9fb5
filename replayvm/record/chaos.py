"""Chaos recording: perturb what a guest must not rely on, so timing bugs show up more often.

With a seed, the machine
- raises extra LAPIC timer interrupts at random moments (exponentially distributed gaps, mean
  `mean_gap_ns` of guest time) on top of the programmed periodic ones, while the guest has the
  timer running and unmasked. A correct kernel treats them as early ticks; a kernel with a race
  around preemption points meets it far more often;
- gives the IDE disk and the UART transmitter random completion latencies (`DeviceLatency`):
  a disk command stays busy, and its interrupt waits, for an exponentially distributed time; the
  transmit register stays full for a while after each byte. A driver that assumes completion
  is immediate (as under QEMU or our own default devices) meets real-hardware timing.
Everything still enters through the devices and the interrupt controller, so the recorder logs
each status read and interrupt at its exact position and replay reproduces the run exactly; the
seed goes into the trace header.
"""

from __future__ import annotations

import random

from replayvm.devices.lapic import LVT_MASKED, LVT_TIMER, Lapic

DEFAULT_MEAN_GAP_NS = 150_000            # about sixty extra ticks per 10 ms timer period
IDE_MEAN_LATENCY_NS = 100_000            # a fast disk's command completion
UART_MEAN_LATENCY_NS = 20_000            # how long the transmit register stays full per byte


class TimerChaos:
    def __init__(self, lapic: Lapic, seed: int, mean_gap_ns: int = DEFAULT_MEAN_GAP_NS) -> None:
        self.lapic = lapic
        self.seed = seed
        self.random = random.Random(seed)
        self.mean_gap_ns = mean_gap_ns
        self.next_ns: int | None = None
        self.injected = 0

    def poll(self, now_ns: int) -> int | None:
        """Raise an extra tick if one is due; return ns until the next one (None: timer off)."""
        entry = self.lapic.lvt[LVT_TIMER]
        if entry & LVT_MASKED or not self.lapic.next_deadline_ns():
            self.next_ns = None
            return None
        if self.next_ns is None:
            self.next_ns = now_ns + self._gap()
        if now_ns >= self.next_ns:
            if self.lapic.accept_interrupt(entry & 0xFF):
                self.injected += 1
            self.next_ns = now_ns + self._gap()
        return self.next_ns - now_ns

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
