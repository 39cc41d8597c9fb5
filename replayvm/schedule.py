"""Which CPU runs when, on a machine with several (`--cpus N`): turns of a fixed length in
positions (instructions on emu, synchronous exits on kvm) while recording; on replay the trace's
SWITCH records say it instead.

The engine runs one CPU at a time (the vCPUs share one emulator and its translated code) and asks
its machine's scheduler, between runs, whether to switch: `choose(position, current, runnable)`
returns the CPU to run from this position on, or None to go on with the current one. Every
switch is a SWITCH record, so a replay runs the same interleaving without asking this module.

The quantum: DEFAULT_QUANTUM instructions of the whole machine (positions are one count over all
CPUs). 50,000 is short enough that a CPU spinning on a lock another CPU holds (xv6's spinlocks,
its `startothers` wait) wastes at most 50 us of guest time at the virtual clock's one instruction
per ns, so xv6's 10 ms tick sees some 200 switches; and long enough that a switch (saving and
loading the CPU context and flushing the TLB: some 10-30 us here) costs a few percent of the
time the quantum runs at the engine's 100-500 MIPS. A halted CPU is skipped until an interrupt
can wake it; a CPU waiting for its STARTUP IPI is not runnable.

The kvm engine's positions count exits, not instructions: its quantum is KVM_QUANTUM exits. A
switch there costs next to nothing (each vCPU keeps its own state in the kernel: the engine just
runs another vCPU's file descriptor), while one exit costs ~10 us of Python, so 50 exits is about
a millisecond of a guest that exits often. A CPU that runs without exits (a spinlock's waiter)
ends its turn by time instead (engines/kvm.py, TURN_TIME_NS): the engine then asks `expire()`.

Under `--chaos` the quanta are drawn from the seed, as rr's chaos mode does for threads: mostly
normal slices, some very short ones (a switch right inside a critical section), and now and then
a long one that starves the other CPUs (a CPU that holds a lock while the others wait for it).
"""

from __future__ import annotations

import random
from collections.abc import Callable

DEFAULT_QUANTUM = 50_000
KVM_QUANTUM = 50                     # the kvm engine's turns, in synchronous exits
SHORT_SLICE_DIVISOR = 25             # a "very short" slice: 1..quantum/25 (2,000 instructions on emu)
STARVE_FACTOR = 10                   # a starving slice: this many quanta
SHORT_CHANCE = 0.5
STARVE_CHANCE = 0.05
CHAOS_SALT = 0x5C4ED                  # the schedule's random stream differs from the latencies'


class QuantumScheduler:
    """Round robin over the runnable CPUs, each for a quantum of positions (see the module
    docstring); under chaos, quanta drawn from `chaos_seed`."""

    def __init__(self, cpus: int, quantum: int = DEFAULT_QUANTUM, chaos_seed: int | None = None,
                 start_position: int = 0) -> None:
        self.cpus = cpus
        self.quantum = quantum
        self._random = random.Random(chaos_seed ^ CHAOS_SALT) if chaos_seed is not None else None
        self.end = start_position + self._slice()

    def _slice(self) -> int:
        if self._random is None:
            return self.quantum
        draw = self._random.random()
        if draw < SHORT_CHANCE:
            return self._random.randint(1, max(1, self.quantum // SHORT_SLICE_DIVISOR))
        if draw < SHORT_CHANCE + STARVE_CHANCE:
            return self.quantum * STARVE_FACTOR
        return self._random.randint(self.quantum // 2, self.quantum * 3 // 2)

    def woken(self, position: int) -> int:
        """Another CPU was woken (an IPI) at `position`: under chaos the current turn is drawn
        again from here, so that the turn a woken CPU waits for is as random as any (a CPU that ran
        alone drew turn after turn, and is nearly always inside a long one by then). Returns where
        the current turn ends."""
        if self._random is not None:
            self.end = position + self._slice()
        return self.end

    def expire(self, position: int) -> None:
        """The current turn is over at `position`, whatever its length (kvm: the CPU ran its
        time without an exit while another CPU waited); the next `choose` picks the next CPU."""
        self.end = position

    def next_switch_position(self) -> int | None:
        """Where the current turn ends (the engine stops its run there)."""
        return self.end

    def choose(self, position: int, current: int, runnable: Callable[[int], bool]) -> int | None:
        """The CPU to run from `position` on, or None to go on with `current` (also when no CPU
        can run: the engine then says the machine halts)."""
        if position < self.end and runnable(current):
            return None
        for step in range(1, self.cpus + 1):
            cpu = (current + step) % self.cpus
            if runnable(cpu):
                self.end = position + self._slice()
                return None if cpu == current else cpu
        return None
