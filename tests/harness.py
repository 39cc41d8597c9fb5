"""A minimal real machine for engine tests: RAM, real buses, recording test devices, and an
interrupt source the test controls (now, or at a guest-time deadline). Engines are never mocked."""

from __future__ import annotations

import mmap
from pathlib import Path

from replayvm.bus import Bus, PioBus
from replayvm.clock import GuestClock, VirtualClock
from replayvm.engines.base import CpuState, Segment, StopReason, real_mode_state

# Deadlines that only detect a hang: a test fails on them only if something never ends, never
# because the host was slow (2 cores shared by many processes can stall a run for seconds).
HANG_S = 120
HANG_BUDGET_NS = HANG_S * 10**9      # an engine budget on the wall clock (GuestClock)


class PortLog:
    """Test ports: remembers writes (offset, size, value) and answers reads from a script."""

    def __init__(self, answers: dict[int, int] | None = None) -> None:
        self.writes: list[tuple[int, int, int]] = []
        self.answers = answers or {}
        self.strings_in = bytearray(b"\x34\x12\x78\x56")
        self.on_write = {}

    def read(self, offset: int, size: int) -> int:
        if offset == 7:                                  # port 0x87: insw source
            value = int.from_bytes(self.strings_in[:size], "little")
            del self.strings_in[:size]
            return value
        return self.answers.get(offset, 0x5A)

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))
        action = self.on_write.get(offset)
        if action is not None:
            action()


class MmioLog:
    def __init__(self, value: int) -> None:
        self.value = value
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return self.value & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


class Interrupts:
    """Pending vectors the test raises; `timer_at_ns` makes one pending at a guest time."""

    def __init__(self, clock: GuestClock) -> None:
        self.clock = clock
        self.pending: list[int] = []
        self.timer_at_ns: int | None = None
        self.timer_vector = 0x30
        self.acknowledged: list[int] = []

    def poll(self) -> int | None:
        if self.timer_at_ns is None:
            return None
        now = self.clock.now_ns()
        if now >= self.timer_at_ns:
            self.pending.append(self.timer_vector)
            self.timer_at_ns = None
            return None
        return self.timer_at_ns - now

    def has_pending(self) -> bool:
        return bool(self.pending)

    def acknowledge(self) -> int:
        vector = self.pending.pop(0)
        self.acknowledged.append(vector)
        return vector


class TestMachine:
    __test__ = False

    def __init__(self, ram_bytes: int = 0x80000, virtual_clock: bool = False) -> None:
        self._map = mmap.mmap(-1, ram_bytes)
        self.ram = memoryview(self._map)
        self.pio = PioBus()
        self.mmio = Bus("mmio")
        self.clock = VirtualClock() if virtual_clock else GuestClock()
        self.interrupts = Interrupts(self.clock)
        self.ports = PortLog({1: 0x5A})
        self.pio.register(0x80, 16, self.ports, "test")

    def poll(self) -> int | None:
        return self.interrupts.poll()

    def read_tsc(self) -> int:
        return self.clock.now_ns()


def flat_protected_state(entry: int, gdt_addr: int, ram: memoryview) -> CpuState:
    """Flat 32-bit protected mode without paging, with a GDT written at gdt_addr."""
    gdt = (0).to_bytes(8, "little") + (0x00CF9A000000FFFF).to_bytes(8, "little") \
        + (0x00CF92000000FFFF).to_bytes(8, "little")
    ram[gdt_addr:gdt_addr + len(gdt)] = gdt
    state = CpuState()
    state.regs = {name: 0 for name in CpuState.GPR_NAMES}
    state.regs.update(rip=entry, rflags=2, rsp=0x8000)
    state.cr0 = 0x11
    state.gdt = (gdt_addr, len(gdt) - 1)
    state.cs = Segment(selector=0x08, limit=0xFFFFFFFF, type=0xB, db=1, g=1)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(state, name, Segment(selector=0x10, limit=0xFFFFFFFF, type=3, db=1, g=1))
    return state


def load_realmode_guest(machine: TestMachine, image: bytes) -> CpuState:
    machine.ram[0x7C00:0x7C00 + len(image)] = image
    return real_mode_state(0, 0x7C00)


class RecordableMachine(TestMachine):
    """What the recorder needs of a machine besides buses and an engine."""

    def __init__(self) -> None:
        super().__init__()
        self.input_observers: list = []
        self.disks: list = []
        self.cmos = type("NoCmos", (), {"index": 0})()

    def interrupt_source(self, vector: int) -> str:
        return "test"


def record_kvm_realmode_guest(trace: Path) -> RecordableMachine:
    """Record the real-mode test guest on kvm (I/O, interrupts at exits, one after a kick) into a
    complete trace; returns the machine, its engine still open."""
    import hashlib

    from replayvm.engines.kvm import KvmEngine
    from replayvm.guests import guest_file
    from replayvm.record.recorder import Recorder, initial_ram_pages, ram_digest
    from replayvm.trace import Kind, TraceWriter

    machine = RecordableMachine()
    machine.ports.on_write[8] = lambda: machine.interrupts.pending.append(0x30)
    machine.ports.on_write[9] = lambda: setattr(machine.interrupts, "timer_at_ns",
                                                machine.clock.now_ns() + 20_000_000)
    state = load_realmode_guest(machine, guest_file("kvmtests", "realmode.bin").read_bytes())
    machine.engine = KvmEngine(machine)
    machine.engine.set_state(state)
    writer = TraceWriter(trace, {"engine": "kvm", "position_unit": "exits", "ram_bytes": len(machine.ram),
                                 "initial_state": state.to_dict()})
    for number, page in initial_ram_pages(machine.ram):
        writer.append((Kind.RAM_PAGE, number, page))
    recorder = Recorder(machine, writer)
    reason = machine.engine.run(budget_ns=HANG_BUDGET_NS)
    assert reason is StopReason.HALT, reason                     # ends with the guest's HLT
    recorder.halted()
    recorder.finish()
    writer.close({"position": machine.engine.position, "final_state": machine.engine.get_state().to_dict(),
                  "ram_sha256": ram_digest(machine.ram), "console_sha256": hashlib.sha256(b"").hexdigest()})
    return machine
