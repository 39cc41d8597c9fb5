"""Chaos recording: perturb what a guest must not rely on, so timing bugs show up more often.

With a seed, the machine raises extra LAPIC timer interrupts at random moments (exponentially
distributed gaps, mean `mean_gap_ns` of guest time) on top of the programmed periodic ones, while
the guest has the timer running and unmasked. A correct kernel treats them as early ticks; a
kernel with a race around preemption points meets it far more often. Everything still enters
through the interrupt controller, so the recorder logs each one at its exact position and replay
reproduces the run exactly; the seed goes into the trace header.
"""

from __future__ import annotations

import random

from replayvm.devices.lapic import LVT_MASKED, LVT_TIMER, Lapic

DEFAULT_MEAN_GAP_NS = 150_000            # about sixty extra ticks per 10 ms timer period


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
