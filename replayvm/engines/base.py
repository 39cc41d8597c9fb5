"""The interface both CPU engines implement, and the CPU state they exchange.

An engine runs the guest's one vCPU over the machine's RAM. Port and MMIO accesses go to the
machine's buses from inside `run()`; `run()` returns only when the machine has to decide something
(the guest halted, shut down, the time budget ran out, or a stop was requested).

Every engine is an `Engine`. What only some engines can do is a separate protocol, checked with
`isinstance` (they are `runtime_checkable`), never with `getattr` or the engine's name:

- `SnapshotEngine`: the whole vCPU saved and restored (`EngineSnapshot`), for checkpoints: emu.
- `DebugEngine`: breakpoints and watchpoints that stop at an exact position, for the timeline
  and gdb: emu.
- `HardwareDebugEngine`: single-step and hardware execution breakpoints, which replay uses to find
  an interrupt that landed between two exits (an interrupt landmark): kvm.

One more fact callers need is a class attribute of every engine, `exact_positions`: True when a
position is an instruction count and a run can stop at any one (emu); False when a position counts
exits, so a run can stop only at an exit and an interrupt between exits is found by its landmark
(kvm). Trace headers name it as `position_unit` ("instructions" or "exits").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, asdict, fields
from typing import TYPE_CHECKING, Callable, ClassVar, Protocol, runtime_checkable

from replayvm.engines.x86_delivery import EFER_LMA

if TYPE_CHECKING:
    from replayvm.bus import Bus, PioBus
    from replayvm.clock import GuestClock
    from replayvm.devices.base import InterruptSource


# What a CPU of several is doing (both engines' `_cpu_mode`, EngineSnapshot.cpus, a branch
# trace's start_cpus `modes`).
CPU_RUNNING = 0
CPU_WAIT_SIPI = 1                   # after reset or INIT: nothing runs until a STARTUP IPI
CPU_STARTING = 2                    # a STARTUP IPI came: starts at its vector when next switched to



class CpuModes:
    """What each of several CPUs is doing, as both engines keep it: its mode (running, waiting for
    a STARTUP IPI, starting at its STARTUP vector), that vector, and whether it halted (with IF
    set: an interrupt can wake it). The engines add how they hold each CPU's registers."""

    cpus: int
    machine: "MachineView"

    def _init_cpu_modes(self) -> None:
        self._cpu_mode = [CPU_RUNNING] + [CPU_WAIT_SIPI] * (self.cpus - 1)
        self._cpu_vector = [0] * self.cpus
        self._cpu_halted = [False] * self.cpus
        self._cpu_halted_if = [False] * self.cpus

    def cpu_init(self, cpu: int) -> None:
        """An INIT IPI (from inside a device access): the CPU waits for a STARTUP IPI; only the
        mode changes here, the engine starts the CPU when it is next switched to."""
        self._cpu_mode[cpu] = CPU_WAIT_SIPI
        self._cpu_halted[cpu] = False

    def cpu_startup(self, cpu: int, vector: int) -> None:
        """A STARTUP IPI: a CPU waiting for one starts in real mode at vector * 4096 when it is
        next switched to (a second one, as xv6 sends, finds it started and is ignored, as on
        hardware)."""
        if self._cpu_mode[cpu] == CPU_WAIT_SIPI:
            self._cpu_mode[cpu] = CPU_STARTING
            self._cpu_vector[cpu] = vector & 0xFF

    def cpu_started(self, cpu: int) -> bool:
        """Whether `cpu` runs (or is about to: a STARTUP IPI came), rather than waiting for one."""
        return self.cpus == 1 or self._cpu_mode[cpu] != CPU_WAIT_SIPI

    def _runnable(self, cpu: int) -> bool:
        mode = self._cpu_mode[cpu]
        if mode != CPU_RUNNING:
            return mode == CPU_STARTING
        if not self._cpu_halted[cpu]:
            return True
        return self._cpu_halted_if[cpu] and self.machine.lapics[cpu].has_pending()  # type: ignore[attr-defined]

    def any_cpu_runnable(self) -> bool:
        """Several CPUs: can any of them run (one halted waits for an interrupt it can take)?"""
        return any(self._runnable(cpu) for cpu in range(self.cpus))

    def _cpu_mode_fields(self) -> dict:
        """The modes, vectors and halts, as a snapshot and a branch's start_cpus keep them."""
        return {"modes": list(self._cpu_mode), "vectors": list(self._cpu_vector),
                "halted": list(self._cpu_halted), "halted_if": list(self._cpu_halted_if)}

    def _load_cpu_modes(self, saved: dict) -> None:
        self._cpu_mode = [int(mode) for mode in saved["modes"]]
        self._cpu_vector = [int(vector) for vector in saved["vectors"]]
        self._cpu_halted = [bool(halted) for halted in saved["halted"]]
        self._cpu_halted_if = [bool(halted_if) for halted_if in saved["halted_if"]]

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
        if self.efer & EFER_LMA:          # long mode: the other eight registers, and EFER
            lines[3:3] = [" ".join(f"{n}={r.get(n, 0):#010x}" for n in ("r8", "r9", "r10", "r11")),
                          " ".join(f"{n}={r.get(n, 0):#010x}" for n in ("r12", "r13", "r14", "r15"))]
            lines[-1] += f" efer={self.efer:#x}"
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


class GuestAddressFault(Exception):
    """A guest-virtual address that does not translate to RAM (not mapped, or past RAM's end):
    what `DebugEngine.read_linear` raises, so a debugger can show what is mapped and stop there."""


class DebugStop(enum.IntEnum):
    """Why a `DebugEngine` stopped (`DebugHit.kind`); the values are the C hook's DEBUG_*."""

    NONE = 0
    BREAK = 1                      # before executing an instruction at a breakpoint
    WATCH = 2                      # after an instruction accessed a watched range


@dataclass(frozen=True)
class DebugHit:
    kind: DebugStop
    address: int = 0               # WATCH: the data address accessed (BREAK: see linear_pc())


@dataclass(frozen=True)
class EngineSnapshot:
    """The whole vCPU of a `SnapshotEngine` at one position (not RAM: checkpoints keep that).

    The emu engine's fields: `context` is Unicorn's copy of QEMU's CPU state (registers, the
    segment caches, FPU/SSE, pending-exception state; a few of its bytes are pointers into the
    process that made it, which replay.checkpoint_file fixes up); `counters` is the engine's own
    C-side state (`struct emu_state`: the instruction count, the current stop target, the
    interrupt-window and STI-shadow tracking, the LAPIC ID read tally), restored whole except
    the debugger's breakpoints and watchpoints, which belong to the debugger, not the guest.

    Several CPUs (`cpus`, None with one): `context` and `counters` are those of the CPU running
    at the snapshot; `cpus` holds the rest of the machine's CPUs, as plain lists indexed by CPU:
    `current` (the CPU running), `contexts` (each other started CPU's saved context; None for the
    running one and for a CPU not started), `modes` (running / waiting for its STARTUP IPI /
    starting at `vectors`), `halted` and `halted_if` (in HLT, and whether it can be woken). The
    schedule's place is the replay's place in the trace (its SWITCH records); the local APICs
    are devices, which a checkpoint keeps with the others.
    """

    engine: str                                  # the engine that made it (and alone restores it)
    context: bytes
    counters: bytes
    pending_fault: tuple[int, int | None, int] | None   # (vector, error code, EIP) to deliver next
    halted: bool                                 # the guest was in HLT
    interrupts_delivered: int
    exceptions_delivered: int
    cpus: dict | None = None                     # several CPUs: the others (see above)

    def to_dict(self) -> dict:
        """Named fields of plain types (msgpack-able): what a checkpoint file stores."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["pending_fault"] = list(self.pending_fault) if self.pending_fault is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "EngineSnapshot":
        """The inverse of to_dict, for data read from a file: every field must be there and of
        its type (ValueError otherwise)."""
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise ValueError(f"snapshot lacks {', '.join(missing)}")
        fault = data["pending_fault"]
        if fault is not None:
            if not isinstance(fault, (list, tuple)) or len(fault) != 3 or \
                    not all(v is None or type(v) is int for v in fault):
                raise ValueError("snapshot's pending_fault is not (vector, error, eip)")
            fault = (fault[0], fault[1], fault[2])
        snapshot = cls(engine=data["engine"], context=data["context"], counters=data["counters"],
                       pending_fault=fault, halted=data["halted"],
                       interrupts_delivered=data["interrupts_delivered"],
                       exceptions_delivered=data["exceptions_delivered"],
                       cpus=_checked_cpus(data["cpus"]))
        for name, kind in (("engine", str), ("context", bytes), ("counters", bytes), ("halted", bool),
                           ("interrupts_delivered", int), ("exceptions_delivered", int)):
            if type(getattr(snapshot, name)) is not kind:
                raise ValueError(f"snapshot's {name} is not {kind.__name__}")
        return snapshot


def _checked_cpus(data: object) -> dict | None:
    """EngineSnapshot.cpus read from a file: None, or lists of one length and of their types."""
    if data is None:
        return None
    if not isinstance(data, dict) or type(data.get("current")) is not int:
        raise ValueError("snapshot's cpus is not a map with the current CPU")
    kinds = {"contexts": (bytes, type(None)), "modes": (int,), "vectors": (int,), "halted": (bool,),
             "halted_if": (bool,)}
    count = len(data.get("modes") or ())
    for name, allowed in kinds.items():
        values = data.get(name)
        if not isinstance(values, list) or len(values) != count or \
                not all(type(v) in allowed for v in values):
            raise ValueError(f"snapshot's cpus.{name} is not a list of {count}")
    if not 0 <= data["current"] < count:
        raise ValueError("snapshot's current CPU is not one of its CPUs")
    return {"current": data["current"], **{name: list(data[name]) for name in kinds}}


class Engine(Protocol):
    """What every engine offers, and all that callers outside `replayvm.engines` may use (plus
    the optional protocols below, checked with isinstance). tests/test_engine_interface.py checks
    that both engines have every member and that callers do not probe engines with getattr."""

    name: ClassVar[str]
    """"emu" or "kvm": what trace headers name, and what `replay --engine` compares."""

    exact_positions: ClassVar[bool]
    """True (emu): a position is an instruction count; `run(until_position=N)` stops exactly at N,
    and an asynchronous event is logged and replayed at its exact count. False (kvm): a position
    counts synchronous exits (port, MMIO, HLT); a run can stop only at an exit, and an interrupt
    that lands between exits carries a landmark (`interrupt_landmark`) that replay finds with a
    `HardwareDebugEngine`."""

    position_unit: ClassVar[str]
    """What a position counts, as trace headers say it: "instructions" (emu) or "exits" (kvm)."""

    cpuid_table: list[tuple[int, int, int, int, int, int]]
    """(leaf, subleaf, eax, ebx, ecx, edx) the guest sees, for the trace header."""

    last_error: str
    """Why the last run ended with SHUTDOWN or UNSUPPORTED, in one line ("" when it did not)."""

    on_interrupt: Callable[[int, int], None] | None
    """Called with (vector, position) as an external interrupt is taken (the recorder logs it).
    emu: the count of the instruction about to be interrupted; kvm: the exits so far, as the
    interrupt is injected."""

    @property
    def position(self) -> int:
        """Where the guest is, in the unit of this engine's traces: on emu instructions begun
        (a `rep` iteration and each attempt of a faulting instruction count); on kvm synchronous
        exits so far (kicks and interrupt-window exits do not count: they depend on host timing).
        During a device access from inside run(), the access's own instruction/exit is counted."""
        ...

    @property
    def icount(self) -> int | None:
        """Instructions executed so far (emu: the same as position); None when the engine cannot
        count instructions (kvm: no PMU under PVM)."""
        ...

    @property
    def pure_reads(self) -> int:
        """Reads the engine answered itself without the bus, so never logged (emu serves LAPIC ID
        reads in C); 0 when every read goes to the bus (kvm)."""
        ...

    def pure_read_sites(self) -> dict[int, int]:
        """Those pure reads counted by the EIP that made them (for the trace's PURE_READS record);
        {} on kvm."""
        ...

    def set_state(self, state: CpuState) -> None:
        """Load the vCPU from `state` (boot, a trace header's initial state), between runs."""
        ...

    def get_state(self) -> CpuState:
        """The vCPU now, in the engine-neutral form (for dumps, hashes, footers, gdb)."""
        ...

    def run(self, budget_ns: int | None = None, until_position: int | None = None) -> StopReason:
        """Run the guest until it halts, dies, the budget (guest ns) passes, a stop is requested,
        or it reaches `until_position` (BUDGET). emu stops exactly there, after delivering what is
        due at that count (interrupts, faults); kvm stops at the first exit boundary at or past it,
        before entering the guest again (an interrupt due there is injected by the next run)."""
        ...

    def request_stop(self) -> None:
        """Ask a running engine to return soon with STOP_REQUESTED (safe from another thread)."""
        ...

    def stop_here(self) -> None:
        """From inside a device access: run() returns STOP_REQUESTED before the guest goes on
        (emu: before the next instruction; kvm: before the next KVM_RUN)."""
        ...

    def move_stop(self, position: int) -> None:
        """From inside a device access: the run under way is to end (BUDGET) at `position`, earlier
        or later than it was asked to -- unless something already stopped it here (a fault, a
        debugger hit, a stop request). A position already passed means: stop now (on kvm, at
        this exit). Replay uses it to bound each run by the next recorded event."""
        ...

    def exit_context(self) -> tuple[int, int]:
        """(RIP, CPL) of the instruction making the current device access, for trace records.
        kvm gives CPL -1 (not fetched: it would cost a KVM_GET_SREGS per exit)."""
        ...

    def address_space(self) -> int:
        """The running CPU's CR3 now (during a device access: at the instruction or exit making
        it), for the trace's ASPACE records. Cheap, since the recorder asks at every event: emu
        reads it from Unicorn; kvm from the registers KVM copies into the run page at each exit."""
        ...

    def interrupt_landmark(self) -> dict | None:
        """Where the interrupt being injected lands, when its position alone does not say (kvm,
        after a kick between exits): the general registers, RIP, RFLAGS and CR3. None when the
        position is exact (always on emu; on kvm when the interrupt is taken at an exit)."""
        ...

    def use_clock(self, clock: "GuestClock") -> None:
        """Keep time with `clock` from now on (a replay going live). emu: an instruction clock
        (VirtualClock) counts this engine's instructions; kvm: the kicker's deadlines use it."""
        ...

    def start_at_position(self, position: int) -> None:
        """Count positions from `position` (a branch trace starts where its parent went live)."""
        ...

    def close(self) -> None:
        """Release the engine (its view of RAM first: the machine may unmap RAM afterwards)."""
        ...


@runtime_checkable
class SnapshotEngine(Engine, Protocol):
    """An engine whose whole vCPU can be saved and put back (emu): replay checkpoints."""

    def save_cpu(self) -> EngineSnapshot:
        """The vCPU now (registers, caches, counters, a fault in flight); RAM is the caller's."""
        ...

    def restore_cpu(self, snapshot: EngineSnapshot) -> None:
        """Back to a save_cpu() point of this engine; breakpoints and watchpoints stay as set."""
        ...


@runtime_checkable
class DebugEngine(Engine, Protocol):
    """Breakpoints and watchpoints that stop a run at an exact position (emu): the timeline and gdb.

    A hit ends run() with StopReason.DEBUG; `take_debug_hit()` then says which."""

    def set_breakpoints(self, addresses: list[int]) -> None:
        """Stop before executing an instruction at any of these linear addresses (the set replaces
        the previous one; [] clears)."""
        ...

    def set_watchpoints(self, watches: list[tuple[int, int, int]]) -> None:
        """Stop after an instruction reads (access & 1) or writes (access & 2) one of these
        (linear address, length, access) ranges ([] clears)."""
        ...

    def take_debug_hit(self) -> DebugHit:
        """Why the last run stopped for the debugger (DebugStop.NONE: it did not), and forget it."""
        ...

    def linear_pc(self) -> int:
        """CS base + EIP: the address breakpoints compare with."""
        ...

    def resume_here(self) -> None:
        """The next run must not stop at a breakpoint on the instruction it starts with."""
        ...

    def resume_anywhere(self) -> None:
        """Undo resume_here(): a breakpoint on the first instruction stops the next run too."""
        ...

    def read_memory(self, address: int, length: int) -> bytes:
        """Guest-virtual memory through the guest's page tables, with no side effect on the guest;
        raises GuestAddressFault where an address does not translate to RAM."""
        ...


@runtime_checkable
class HardwareDebugEngine(Engine, Protocol):
    """Single-step and hardware execution breakpoints (kvm): how replay finds an interrupt
    landmark between two exits."""

    def set_guest_debug(self, single_step: bool = False, hw_breakpoints: list[int] = ()) -> None:
        """Single-step and/or up to four execution breakpoints (linear addresses); a hit ends
        run() with StopReason.DEBUG. No arguments: both off."""
        ...

    def place_interrupts(self, on: bool) -> None:
        """On while recording: the engine chooses where an interrupt lands between exits, only
        where replay can find it again (see engines/kvm.py). A replay turns it off: the trace
        says where each interrupt lands."""
        ...

    def deferred_interrupts(self) -> int:
        """Interrupts that arrived while native ring-3 code ran and were placed later."""
        ...
