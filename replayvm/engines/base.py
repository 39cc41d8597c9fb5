"""The interface both CPU engines implement, and the CPU state they exchange.

An engine runs the guest's one vCPU over the machine's RAM. Port and MMIO accesses go to the
machine's buses from inside `run()`; `run()` returns only when the machine has to decide something
(the guest halted, shut down, the time budget ran out, or a stop was requested).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, asdict
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from replayvm.bus import Bus, PioBus
    from replayvm.clock import GuestClock
    from replayvm.devices.base import InterruptSource


class StopReason(enum.Enum):
    HALT = "halt"                  # HLT with nothing to do: the machine waits for the next event
    SHUTDOWN = "shutdown"          # triple fault / shutdown: the guest is dead
    BUDGET = "budget"              # the run's time or instruction budget is used up
    STOP_REQUESTED = "stop"        # request_stop() was called (console quit, --until matched, ...)
    UNSUPPORTED = "unsupported"    # this engine cannot go on executing the guest (e.g. paging on PVM)
    DEBUG = "debug"                # a breakpoint or single step the debugger asked for


@dataclass
class Segment:
    """A segment register with its hidden descriptor cache (the fields KVM's kvm_segment has)."""

    selector: int = 0
    base: int = 0
    limit: int = 0xFFFF
    type: int = 3                  # read/write data, accessed (code: 0xB = execute/read, accessed)
    s: int = 1                     # code/data (1) or system (0)
    dpl: int = 0
    present: int = 1
    db: int = 0                    # 32-bit default operand size
    l: int = 0                     # 64-bit code segment
    g: int = 0                     # limit in 4 KiB units
    avl: int = 0
    unusable: int = 0


@dataclass
class CpuState:
    """Everything needed to move the vCPU between engines, dump it, or hash it.

    General registers are 64-bit wide names (rax...r15); 32-bit guests use the low halves.
    """

    regs: dict[str, int] = field(default_factory=dict)      # rax..r15, rip, rflags
    cs: Segment = field(default_factory=lambda: Segment(type=0xB))
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=lambda: Segment(type=0xB, s=0))
    ldtr: Segment = field(default_factory=lambda: Segment(type=2, s=0))
    gdt: tuple[int, int] = (0, 0xFFFF)                      # (base, limit)
    idt: tuple[int, int] = (0, 0x3FF)
    cr0: int = 0x10
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    efer: int = 0

    GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                 "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
    SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CpuState":
        """The inverse of to_dict (e.g. a trace header's initial state)."""
        state = cls()
        state.regs = {str(k): int(v) for k, v in data.get("regs", {}).items()}
        for name in cls.SEGMENT_NAMES:
            if name in data:
                setattr(state, name, Segment(**{k: int(v) for k, v in data[name].items()}))
        state.gdt = tuple(data.get("gdt", state.gdt))
        state.idt = tuple(data.get("idt", state.idt))
        for name in ("cr0", "cr2", "cr3", "cr4", "efer"):
            setattr(state, name, int(data.get(name, getattr(state, name))))
        return state

    def describe(self) -> str:
        """A compact multi-line dump for humans (triple faults, --until)."""
        r = self.regs
        lines = [
            " ".join(f"{n}={r.get(n, 0):#010x}" for n in ("rax", "rbx", "rcx", "rdx")),
            " ".join(f"{n}={r.get(n, 0):#010x}" for n in ("rsi", "rdi", "rsp", "rbp")),
            f"rip={r.get('rip', 0):#010x} rflags={r.get('rflags', 0):#010x} "
            f"cr0={self.cr0:#x} cr2={self.cr2:#x} cr3={self.cr3:#x} cr4={self.cr4:#x}",
            " ".join(f"{n}={getattr(self, n).selector:#06x}" for n in ("cs", "ds", "es", "ss", "fs", "gs")),
            f"gdt={self.gdt[0]:#x}/{self.gdt[1]:#x} idt={self.idt[0]:#x}/{self.idt[1]:#x}",
        ]
        return "\n".join(lines)


def real_mode_state(cs: int, ip: int, **regs: int) -> CpuState:
    """The state firmware leaves for a boot sector: real mode, CS:IP as given, flat 64 KiB segments."""
    state = CpuState()
    state.regs = {name: 0 for name in CpuState.GPR_NAMES}
    state.regs.update(rip=ip, rflags=0x2, **regs)
    state.cs = Segment(selector=cs, base=cs << 4, type=0xB)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(state, name, Segment())
    return state


class MachineView(Protocol):
    """What an engine may use of the machine."""

    ram: memoryview                # guest RAM from physical address 0, shared with the engine
    clock: "GuestClock"            # the only time the guest may observe
    pio: "PioBus"
    mmio: "Bus"
    interrupts: "InterruptSource"

    def poll(self) -> int | None:
        """Advance time-driven device state; return guest ns until the next timed event (or None)."""
        ...

    def read_tsc(self) -> int:
        """The value RDTSC returns now (engines that can trap RDTSC ask the machine)."""
        ...


class Engine(Protocol):
    name: str

    def set_state(self, state: CpuState) -> None: ...

    def get_state(self) -> CpuState: ...

    def run(self, budget_ns: int | None = None) -> StopReason:
        """Run the guest until it halts, dies, the budget (guest ns) passes, or a stop is requested."""
        ...

    def request_stop(self) -> None:
        """Ask a running engine to return soon with STOP_REQUESTED (safe from another thread)."""
        ...

    def close(self) -> None: ...
