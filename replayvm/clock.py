"""The one clock the guest can observe. Devices ask it for time; nothing else reads host time.

While recording, guest time follows the host's monotonic clock (so a person at the console sees
real timing); the recorder logs every value handed out and replay feeds the same values back.
A `VirtualClock` only moves when the machine advances it, for fully deterministic runs.
"""

from __future__ import annotations

import time
from typing import Callable


class GuestClock:
    """Nanoseconds since the machine was created, from the host's monotonic clock."""

    def __init__(self) -> None:
        self._start_ns = time.monotonic_ns()
        self._offset_ns = 0                 # stalls (chaos): guest time ahead of the host's
        self.epoch_s = time.time()          # wall-clock time at guest time 0 (for the CMOS RTC)

    def now_ns(self) -> int:
        return time.monotonic_ns() - self._start_ns + self._offset_ns

    def advance(self, ns: int) -> None:
        """Jump guest time ahead by `ns` (a stalled CPU: the guest sees the time pass at once)."""
        self._offset_ns += ns

    def start(self) -> None:
        """Guest time 0 is now: the moment the guest starts running, not when it was built."""
        self._start_ns = time.monotonic_ns()
        self._offset_ns = 0
        self.epoch_s = time.time()

    def resume_at(self, ns: int) -> None:
        """Guest time is `ns` now and runs on with the host's (a replay going live)."""
        self._start_ns = time.monotonic_ns()
        self._offset_ns = ns

    def wall_time_s(self) -> float:
        """Seconds since the Unix epoch at the current guest time (what the CMOS RTC shows)."""
        return self.epoch_s + self.now_ns() / 1e9


class VirtualClock(GuestClock):
    """Deterministic time: an instruction counter (1 ns per instruction) plus explicit advances.

    The emulating engine attaches its instruction counter as `source`; halted time is added with
    `advance(ns)`. Without a source, time moves only through `advance`.
    """

    DEFAULT_EPOCH_S = 1_700_000_000.0

    def __init__(self, epoch_s: float = DEFAULT_EPOCH_S) -> None:
        self._offset_ns = 0
        self.epoch_s = epoch_s
        self.source: Callable[[], int] | None = None

    def now_ns(self) -> int:
        source = self.source
        return self._offset_ns + (source() if source is not None else 0)

    def advance(self, ns: int) -> None:
        self._offset_ns += ns

    def resume_at(self, ns: int) -> None:
        """Guest time is `ns` now (a replay going live); the engine's count drives it on."""
        source = self.source
        self._offset_ns = ns - (source() if source is not None else 0)

    def start(self) -> None:
        """Virtual time does not depend on when the guest starts."""
