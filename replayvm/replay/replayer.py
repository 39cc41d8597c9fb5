"""Replay: re-execute a recorded session from its trace alone, and prove it went the same way.

Replay runs the machine that was recorded: `Machine`, with the same devices, buses, interrupt
controllers and engine. Only its input side differs. The inputs that came from the world while
recording come from the trace: typed bytes reach the UART at their recorded positions, the disks
hand out the sectors the trace says they did (DISK_READ records; replay needs no image), time
values (CMOS clock, LAPIC current count, RDTSC) are the recorded ones, and each interrupt is
taken at exactly its recorded position (the emu engine stops at that instruction count; on kvm at
the recorded exit, or at the registers of its landmark) -- the LAPIC timer fires when the trace
says it did. Everything else is computed by the device models and checked: every port and MMIO
read the devices answer must equal the recorded value (a mismatch is a divergence naming the
device and register), every write must be the recorded one, and an interrupt the trace takes must
be one the replayed devices raised. The console is what the replayed UART prints. At the end the
CPU state and a hash of RAM must match the footer. `replay()` reads the whole trace once before it
runs anything, validating every record and the record digest: a trace altered after recording is
reported as altered (TraceAlteredError, exit status 2) and never run, so a divergence (exit status
1) always means the replay went another way than the recording.

Because the devices are real, a replay can stop anywhere and go live (replay.live): the machine
is in the state it had at that point, devices included.

Records arrive validated by the TraceReader (replayvm.trace.records has their layouts), so fields
are used here without further checks.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from replayvm import hw
from replayvm.analyze.devices import register_at
from replayvm.bus import Bus, Mapping
from replayvm.console import Console
from replayvm.devices import ide, uart
from replayvm.devices.disk import MISSING_SECTOR_END, TraceDisk
from replayvm.devices.lapic import is_pure_id_read, is_time_read as is_lapic_time_read
from replayvm.engines.registry import engine_class
from replayvm.engines.base import CpuState, StopReason
from replayvm.errors import ReplayVMError
from replayvm.machine import Machine, MachineConfig, engine_stop_end, is_engine_stop_end
from replayvm.trace.format import DISK_READ_MINOR, FEATURE_PC, FEATURE_X86_64, POSITIONED, Kind, TraceFormatError
from replayvm.trace.reader import TraceReader, check_unaltered
from replayvm.trace.records import (ACCESS, ASPACE, CLOCK, DISK_READ, DPOS_INDEX, FOOTER, FOOTER_VERIFIED_BY,
                                    INPUT, INTERRUPT, RAM_PAGE, RUN, SECTOR, SWITCH)

TYPED_SOURCE = "com1"            # the only device console input reaches (replayvm.machine)
COMPARED_REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "rip", "rflags")
RECENT = 5
GUEST_ENDS = ("fault", "shutdown", "poweroff", "unsupported")   # footer ends the guest brought about itself
RFLAGS_RF = 1 << 16
LANDMARK_TRIES = 1_000_000          # breakpoint hits whose registers do not match, at most
END_LANDMARK_TRIES = 10_000         # ... for the recording's end (~0.1 ms a hit: ~1 s at most)
# kvm positions count exits, so code that runs without exiting cannot be bounded by position: a
# replayed kvm guest that runs this long without a port, MMIO or HLT exit has diverged (a
# recording's exit-free stretches end at its timer kicks, each an interrupt with a landmark, or at
# the end of the session). Generous and guest-independent; checked once a watch tick.
KVM_EXIT_FREE_LIMIT_S = 60.0
KVM_WATCH_TICK_NS = 1_000_000_000
# Registers that show a command's completion, by bus mapping: under --chaos they reflect random
# latencies replay does not draw again, so there the recorded values are inputs.
LATENCY_REGISTERS = {"ide0": (ide.STATUS_COMMAND,), "ide0.control": (0,), "com1": (uart.LSR, uart.IIR_FCR)}


# The events a kvm recording may place between exits, by a landmark.
LANDMARK_KINDS = (Kind.INTERRUPT, Kind.SWITCH)
# The events the replay stops at, by kind number (Kind(n) would cost a call through the enum
# machinery per event); typed INPUT is positioned too, but handed to the UART on the way.
EVENT_KINDS_BUT_INPUT: dict[int, Kind] = {int(kind): kind for kind in POSITIONED if kind != Kind.INPUT}


class RecordedEnd(Exception):
    """The replay reached the point where the recording could not go on (a live continuation
    that read a sector no one had): the end, as recorded."""


class Divergence(ReplayVMError):
    """The replayed guest did something the recording did not: exit status 1."""

    exit_status = 1


@dataclass(slots=True)
class Event:
    index: int
    kind: Kind
    position: int
    record: list
    cr3: int | None = None      # the address space the recording made it in (ASPACE), if it says

    def describe(self) -> str:
        r = self.record
        name = self.kind.name.lower()
        if self.kind in (Kind.PIO_READ, Kind.PIO_WRITE):
            return (f"{name} port {r[ACCESS.port]:#x} size {r[ACCESS.size]} value {r[ACCESS.value]:#x} "
                    f"rip {r[ACCESS.rip]:#x}")
        if self.kind in (Kind.MMIO_READ, Kind.MMIO_WRITE):
            return (f"{name} addr {r[ACCESS.port]:#x} size {r[ACCESS.size]} value {r[ACCESS.value]:#x} "
                    f"rip {r[ACCESS.rip]:#x}")
        if self.kind in (Kind.PIO_READ_RUN, Kind.PIO_WRITE_RUN):
            return f"{name} port {r[RUN.port]:#x} size {r[RUN.size]} count {r[RUN.count]} rip {r[RUN.rip]:#x}"
        if self.kind == Kind.INTERRUPT:
            return f"interrupt vector {r[INTERRUPT.vector]} ({r[INTERRUPT.source]})"
        if self.kind == Kind.CLOCK:
            return f"clock read {r[CLOCK.source]} value {r[CLOCK.value]}"
        if self.kind == Kind.INPUT:
            return f"input {bytes(r[INPUT.data])!r}"
        if self.kind == Kind.SWITCH:
            return f"switch to CPU {r[SWITCH.cpu]}" + (" between exits" if SWITCH.get(r, "landmark") else "")
        return name


def _landmark_value(name: str, value: int | None) -> int | None:
    """A register as landmarks compare it: RFLAGS without RF, which says whether an instruction
    was resumed halfway (PVM sets it after emulating some instructions) and which a breakpoint
    stop does not reproduce."""
    return value & ~RFLAGS_RF if name == "rflags" and value is not None else value


def event_landmark(event: Event) -> dict | None:
    """Where a kvm interrupt injected between exits, or a kvm switch of CPUs made between exits,
    happened: the registers of its landmark (INTERRUPT's or SWITCH's `landmark`); None when its
    position alone says where."""
    if event.kind == Kind.INTERRUPT:
        return INTERRUPT.get(event.record, "landmark")
    if event.kind == Kind.SWITCH:
        return SWITCH.get(event.record, "landmark")
    return None


def has_landmark(event: Event) -> bool:
    """An event placed by its registers between exits (see event_landmark)."""
    return event_landmark(event) is not None


@dataclass
class ReplayResult:
    events: int
    instructions: int
    state_hash: str
    verified: bool
    truncated: bool
    console: bytes = b""
    mismatches: list[str] = field(default_factory=list)
    stopped_early: bool = False
    cpu: str = ""
    guest_end: str = ""        # how the guest ended the recording itself (fault, shutdown), replayed
    position_unit: str = "instructions"    # what `instructions` counts: exits on the kvm engine


class CheckingBus:
    """The bus the engine sees during replay: the machine's own bus behind it computes every
    access with the real devices, and the replayer checks it against the trace."""

    def __init__(self, bus: Bus, replayer: "Replayer", mmio: bool) -> None:
        self.bus = bus
        self.replayer = replayer
        self.mmio = mmio
        self.kind = bus.kind
        # The engine's accesses go straight to the replayer (one Python frame less per access).
        self.read: Callable[[int, int], int] = partial(replayer.read, mmio)
        self.write: Callable[[int, int, int], None] = partial(replayer.write, mmio)

    def mappings(self) -> list[Mapping]:
        return self.bus.mappings()

    def lookup(self, addr: int) -> Mapping | None:
        return self.bus.lookup(addr)

    def read_string(self, addr: int, size: int, count: int) -> bytes:
        return self.replayer.read_string(addr, size, count)

    def write_string(self, addr: int, size: int, data: bytes) -> None:
        self.replayer.write_string(addr, size, data)

    def write_run(self, addr: int, size: int, data: bytes) -> None:
        self.replayer.write_run(addr, size, data)

    def read_run(self, addr: int, size: int, count: int) -> bytes:
        return self.replayer.read_run(addr, size, count)

    def string_budget(self, addr: int, size: int, write: bool) -> int:
        return self.replayer.string_budget(addr, size, write)


class RecordLog:
    """The trace's records in order behind a cursor. A seekable log keeps every record it has
    read, so that a checkpoint can put the cursor back; a plain replay streams and keeps none."""

    def __init__(self, records: Iterator[list], keep: bool) -> None:
        self._source = records
        self._kept: list[list] | None = [] if keep else None
        self.cursor = 0

    def next(self) -> list | None:
        kept = self._kept
        if kept is not None and self.cursor < len(kept):
            record = kept[self.cursor]
        else:
            record = next(self._source, None)
            if record is None:
                return None
            if kept is not None:
                kept.append(record)
        self.cursor += 1
        return record

    def rewind(self, cursor: int, skipped: Callable[[list], None] | None = None) -> None:
        """Put the cursor at `cursor`. One past what has been read (a checkpoint loaded from a
        file) reads on to it, handing each record read on the way to `skipped`."""
        kept = self._kept
        if kept is None:
            raise ValueError("this record log streams: it cannot go back")
        while len(kept) < cursor:
            record = next(self._source, None)
            if record is None:
                raise ValueError(f"record {cursor} is past the end of the trace")
            kept.append(record)
            if skipped is not None:
                skipped(record)
        self.cursor = cursor


@dataclass
class DueInput:
    """Typed bytes the recording handed the UART at `position`: replay hands them over there."""

    index: int
    position: int
    data: bytes


@dataclass
class ReplayPlace:
    """Where a replay stands (a checkpoint keeps it): its place in the trace, the inputs read
    from it but not handed to the machine yet, and the machine's device state."""

    cursor: int
    position: int
    index: int
    next: Event | None
    recent: tuple[Event, ...]
    run_data: bytes | None
    run_offset: int
    run_event: Event | None
    console: int
    inputs: int
    mismatches: int
    landmark_reached: bool
    stopped_early: bool
    due_inputs: tuple[DueInput, ...]
    disk_reads: tuple[tuple[int, int, bytes], ...]
    latest_tsc: int
    devices: dict
    trace_cpu: int = 0                              # the CPU whose records the cursor reads
    trace_cr3: tuple[tuple[int, int], ...] = ()     # (cpu, CR3) the ASPACE records read gave


class Replayer:
    """The trace input side of a `Machine`: the recorded machine, rebuilt from the trace header,
    runs its real devices; this class gives it what came from the world while recording (typed
    bytes, time values, disk sectors, interrupt positions) and checks every device access against
    the trace (see the module docstring)."""

    def __init__(self, trace: Path, output: BinaryIO | None = None, keep_going: bool = False,
                 until_event: int | None = None, until_position: int | None = None,
                 seekable: bool = False, exit_free_limit_s: float = KVM_EXIT_FREE_LIMIT_S) -> None:
        self.reader = TraceReader(trace)
        header = self.reader.header                # validated: engine, ram_bytes, initial_state typed
        missing = [name for name in ("engine", "ram_bytes", "initial_state") if name not in header]
        if missing:
            self.reader.close()
            raise TraceFormatError(f"{trace}: the header lacks {', '.join(missing)}: nothing to replay from")
        self.header = header
        self.output = output
        self.keep_going = keep_going
        self.until_event = until_event
        self.until_position = until_position
        self.stopped_early = False
        self.mismatches: list[str] = []
        # Before format 1.2 the trace did not say which sectors the disks handed out: the disk
        # controller's data reads are then the disk input, taken from the trace as recorded.
        self.disk_reads_logged = (self.reader.major, self.reader.minor) >= (1, DISK_READ_MINOR)
        # Under --chaos the disk and UART completed after random latencies, which replay does not
        # draw again: the registers that show completion are then inputs too.
        self.latencies_recorded = header.get("chaos_seed") is not None
        self.exit_free_limit_ns = int(exit_free_limit_s * 1e9)
        self._watch_tick_ns = 0                   # kvm: when the exit-free watch looks next
        self._watch_position = -1
        self._watch_since_ns = 0
        self._trace_console = Console(output)          # what the replayed UART prints (no input)
        self.console = self._trace_console.transcript
        self.machine = self._build_machine(trace, header)
        self.engine = self.machine.engine
        self.ram = self.machine.ram
        self.clock = self.machine.clock
        self.lapic = self.machine.lapic
        self.uart = self.machine.uart
        # emu: positions are instruction counts, a run stops at any of them; kvm: exit counts
        self.exact_positions = self.engine.exact_positions
        self._device_buses = (self.machine.pio, self.machine.mmio)
        self.machine.pio = CheckingBus(self.machine.pio, self, mmio=False)    # type: ignore[assignment]
        self.machine.mmio = CheckingBus(self.machine.mmio, self, mmio=True)   # type: ignore[assignment]
        self.machine.use_trace_inputs(self)
        self._records = RecordLog(iter(self.reader), keep=seekable)
        self._sectors: dict[bytes, bytes] = {}
        self._disk_reads: deque[tuple[int, int, bytes]] = deque()   # (disk, lba, digest) to hand out
        self._due_inputs: deque[DueInput] = deque()
        self._position = int(header.get("start_position") or 0)
        self._index = 0
        self._recent: deque[Event] = deque(maxlen=RECENT)
        self._run_data: bytes | None = None      # the current read/write run being consumed
        self._run_offset = 0
        self._run_event: Event | None = None
        self.footer: dict | None = None
        self.inputs: list[bytes] = []
        self._console_seen = b""                  # the longest console / input so far (checkpoints)
        self._inputs_seen: list[bytes] = []
        self._digest: str | None = None
        self.next: Event | None = None
        self._landmark_reached = False
        self.landmark_hits = 0
        self.latest_tsc = 0                       # the last TSC value the guest read (going live)
        self._run_limit: int | None = None        # the limit of the run_to under way
        self._engine_stopped = False              # the engine stopped as the recording's did
        # Address spaces (feature "aspace"): while reading, the CPU whose records these are and
        # the CR3 the ASPACE records last gave each CPU; every event's CR3 is checked (_take).
        self._trace_cpu = int((header.get("start_cpus") or {}).get("current", 0))
        self._trace_cr3: dict[int, int] = {}
        self._address_space = self.engine.address_space
        # Called with each event the replay takes (not typed input), at its position, after its
        # checks: a pass that reads guest state at events (analyze --processes) without stopping.
        self.on_event: Callable[[Event], None] | None = None
        self._advance()                           # loads initial RAM pages, finds the first event
        try:
            self.engine.set_state(self.machine.boot_state)
            if header.get("start_cpus") is not None:        # a branch of a machine with several CPUs
                self.engine.load_start_cpus(header["start_cpus"])     # type: ignore[attr-defined]
        except Exception as error:               # well typed, but not a state this CPU can be in
            self.close()
            raise TraceFormatError(f"{trace}: the header's initial_state cannot be loaded "
                                   f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
        if header.get("start_position"):
            self.engine.start_at_position(int(header["start_position"]))

    def _build_machine(self, trace: Path, header: dict) -> Machine:
        """The machine the trace was recorded on, with disks fed from the trace."""
        ram_bytes = int(header["ram_bytes"])            # validated: pages, at most MAX_RAM_MIB
        disks = []
        for index, disk in enumerate(header.get("disks") or []):
            trace_disk = TraceDisk(str(disk.get("name") or f"disk{index}"), int(disk.get("sectors") or 0),
                                   disk.get("sha256"))
            trace_disk.supply = self._supplier(index)
            disks.append(trace_disk)
        engine = str(header["engine"])
        # exact positions: the engine counts instructions and attaches its counter to the clock;
        # kvm's kicker needs real time for the exit-free watch
        config = MachineConfig(ram_bytes=ram_bytes, engine=engine,
                               virtual_clock=engine_class(engine).exact_positions,
                               cpus=int(header.get("cpus") or 1),
                               machine="pc" if FEATURE_PC in (header.get("features") or ()) else "mp",
                               x86_64=FEATURE_X86_64 in (header.get("features") or ()))
        try:
            boot_state = CpuState.from_dict(header["initial_state"])
            machine = Machine(config, self._trace_console, disks=disks, boot_state=boot_state)
        except ReplayVMError:
            self.reader.close()
            raise
        except Exception as error:
            self.reader.close()
            raise TraceFormatError(f"{trace}: the header's initial_state cannot be used "
                                   f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
        if header.get("start_time") and header.get("clock") == "wall":
            machine.clock.epoch_s = float(header["start_time"])
        devices = header.get("devices")
        if devices is not None:
            try:
                machine.restore_devices(devices)
            except Exception as error:
                machine.close()
                self.reader.close()
                raise TraceFormatError(f"{trace}: the header's device state cannot be restored "
                                       f"({type(error).__name__}: {error})") from None
        return machine

    def _supplier(self, disk: int) -> Callable[[int, bytes | None], bytes | None]:
        def supply(lba: int, written: bytes | None) -> bytes | None:
            return self._supply_sector(disk, lba, written)
        return supply

    def _supply_sector(self, disk: int, lba: int, written: bytes | None) -> bytes | None:
        """Disk `disk`'s controller asks for sector `lba`: the recording's next DISK_READ must
        be that sector (and, if the guest wrote it, what the guest wrote)."""
        if not self.disk_reads_logged:
            return None                                   # the controller's data reads tell
        name = self.machine.disks[disk].name
        if not self._disk_reads and self.next is None and (self.footer or {}).get("end") == MISSING_SECTOR_END:
            raise RecordedEnd()                  # the live recording ended at this very read
        if not self._disk_reads:
            self._diverge(f"the guest's disk controller read sector {lba} of {name}, which the recording "
                          f"did not read here", self.next)
        recorded_disk, recorded_lba, digest = self._disk_reads.popleft()
        if (recorded_disk, recorded_lba) != (disk, lba):
            self._diverge(f"the guest's disk controller read sector {lba} of {name} where the recording "
                          f"read sector {recorded_lba} of disk {recorded_disk}", self.next)
        data = self._sectors[digest]
        if written is not None and written != data:
            self._diverge(f"sector {lba} of {name} holds what the replayed guest wrote, which is not what "
                          f"the recording read back", self.next)
        return data

    # ---------------------------------------------------------------- the event stream
    def _advance(self) -> None:
        """Move `next` to the following positioned event, absorbing content records on the way."""
        take = self._records.next
        events = EVENT_KINDS_BUT_INPUT
        while (record := take()) is not None:
            kind = record[0]
            event_kind = events.get(kind)
            if event_kind is not None:                  # the common case first: one lookup
                self._position += record[DPOS_INDEX]
                if event_kind is Kind.SWITCH:           # what follows is the new CPU's
                    self._trace_cpu = record[SWITCH.cpu]
                    self.next = Event(self._index, event_kind, self._position, record)
                else:
                    self.next = Event(self._index, event_kind, self._position, record,
                                      self._trace_cr3.get(self._trace_cpu))
                self._index += 1
                return
            if kind == Kind.ASPACE:
                self._trace_cr3[self._trace_cpu] = record[ASPACE.cr3]
                continue
            if kind == Kind.RAM_PAGE:
                start = record[RAM_PAGE.page] * 4096
                self.ram[start:start + 4096] = record[RAM_PAGE.data]
            elif kind == Kind.SECTOR:
                self._sectors[record[SECTOR.digest]] = record[SECTOR.data]
            elif kind == Kind.DISK_READ:
                self._disk_reads.append((record[DISK_READ.disk], record[DISK_READ.lba], record[DISK_READ.digest]))
            elif kind == Kind.FOOTER:
                self.footer = record[FOOTER.footer]
            elif kind == Kind.INPUT:
                # Typed bytes reach the UART at their position (_feed_due_input), as while recording.
                self._position += record[DPOS_INDEX]
                data = bytes(record[INPUT.data])
                if record[INPUT.source] != TYPED_SOURCE:
                    self._diverge(f"input typed at {record[INPUT.source]!r}, which no device of this "
                                  f"machine receives", Event(self._index, Kind.INPUT, self._position, record))
                self._due_inputs.append(DueInput(self._index, self._position, data))
                self._index += 1
                self.inputs.append(data)
        self.next = None

    @property
    def events_done(self) -> int:
        """How many of the trace's events the replay has done."""
        return self.next.index if self.next is not None else self._index

    @property
    def at_recorded_end(self) -> bool:
        return self.next is None and self.engine.position >= (self.end_position or 0)

    def hand_over(self, last_event: int | None = None) -> None:
        """Going live (replay.live): the machine stops taking its inputs from the trace. Input
        typed by now (and, given `last_event`, by that event) reaches the UART; what the
        recording typed later is not typed."""
        due = self._due_inputs
        while due and due[0].position <= self.engine.position and \
                (last_event is None or due[0].index <= last_event):
            self.uart.feed_input(due.popleft().data)
        due.clear()
        machine = self.machine
        machine.pio, machine.mmio = self._device_buses
        machine.use_world_inputs()
        for disk in machine.disks:
            if isinstance(disk, TraceDisk):
                disk.supply = None

    def _feed_due_input(self, between_instructions: bool) -> None:
        """Hand the UART the typed bytes due by now. Between instructions that is those typed at
        this position; inside an access, those typed before it (the access belongs to the next
        instruction, or exit, after the recording's machine loop fed them)."""
        due = self._due_inputs
        position = self.engine.position
        while due and (due[0].position < position or (between_instructions and due[0].position == position)):
            self.uart.feed_input(due.popleft().data)

    def _absorb_skipped(self, record: list) -> None:
        """Content a jump forward passes over: sectors later runs refer to, and the footer."""
        if record[0] == Kind.SECTOR:
            self._sectors[record[SECTOR.digest]] = record[SECTOR.data]
        elif record[0] == Kind.FOOTER:
            self.footer = record[FOOTER.footer]

    def _take(self, *kinds: Kind) -> Event:
        """Consume the next event, which must be of one of `kinds` at the engine's position."""
        event = self.next
        position = self.engine.position
        if event is None:
            self._diverge(f"the guest went on past the end of the trace at position {position}", None)
        if event.kind not in kinds or event.position != position:
            wanted = "/".join(k.name.lower() for k in kinds)
            self._diverge(f"expected {event.describe()} at position {event.position}; the guest did a "
                          f"{wanted} at position {position} (rip {self.engine.exit_context()[0]:#x})", event)
        if event.cr3 is not None:
            cr3 = self._address_space()
            if cr3 != event.cr3:
                self._mismatch(f"the recording made {event.describe()} in address space cr3 {event.cr3:#x}; "
                               f"the replayed guest is in cr3 {cr3:#x}", event)
        self._recent.append(event)
        if self.on_event is not None:
            self.on_event(event)
        self._advance()
        if self.until_event is not None and event.index >= self.until_event:
            self.stopped_early = True
            self._stop_engine()
        else:
            self._bound_run()
        return event

    def _stop_engine(self) -> None:
        """Make the running engine return before it goes further."""
        self.engine.stop_here()

    def _replay_target(self) -> int:
        """emu: how far the engine may run now. Never past the next event's position (the
        guest must do it by then), else the recording's end, and not past run_to's limit."""
        event = self.next
        if event is not None:
            target = event.position
        else:
            end = self.end_position
            target = self.engine.position if end is None else end
        limit = self._run_limit
        return target if limit is None or limit > target else limit

    def _bound_run(self) -> None:
        """After an event: let the engine's current run go on exactly as far as it may now."""
        if self.exact_positions:
            self.engine.move_stop(self._replay_target())
            return
        # kvm checks for interrupts at every exit by itself; one placed by a landmark needs the
        # loop to take over (breakpoints) once its exit count is reached, and the recording's end
        # is where the loop must stop.
        event = self.next
        if event is None:
            if self._run_data is None and self._kvm_end_reached():
                self._stop_engine()
        elif event.kind in LANDMARK_KINDS and has_landmark(event) and \
                event.position == self.engine.position:
            self._stop_engine()

    def _kvm_end_reached(self) -> bool:
        """kvm, every event done: is the guest at the recording's last exit (a trace cut short
        ends at its last event), with no engine stop (a fault) still to reproduce?"""
        end = self.end_position
        return end is None or (self.engine.position >= end and not self._expects_engine_stop)

    @property
    def _expects_engine_stop(self) -> bool:
        """The recording ended where the engine could not go on (a triple fault, RAM's end...):
        replay must end with the same stop."""
        footer = self.footer
        return footer is not None and is_engine_stop_end(footer.get("end"), footer.get("detail"))

    def _check_exit_in_bounds(self, what: str) -> None:
        """kvm: an exit that is no event of its own (a pure read, an element of a run of
        accesses) must not come after the next event's position, nor after the recording's end."""
        position = self.engine.position
        event = self.next
        if event is None:
            end = self.end_position
            if end is not None and position > end:
                self._diverge(f"the guest went on past the end of the trace at position {position} "
                              f"(the recording ended at {end}): {what}", None)
        elif position > event.position or (position == event.position and event.kind not in LANDMARK_KINDS):
            self._diverge(f"expected {event.describe()} at position {event.position}; the guest did "
                          f"{what} at position {position}", event)

    def _check_due(self) -> None:
        """emu, the run stopped at its bound: an event due by now that did not happen diverges."""
        event = self.next
        position = self.engine.position
        if event is not None and position >= event.position:
            self._diverge(f"the recording has {event.describe()} at position {event.position}; the "
                          f"replayed guest reached position {position} without it "
                          f"(rip {self.engine.exit_context()[0]:#x})", event)

    def _diverge(self, what: str, event: Event | None) -> None:
        recent = "; ".join(f"#{e.index} @{e.position} {e.describe()}" for e in self._recent)
        where = f"event {event.index}" if event is not None else "end of trace"
        if self.machine.cpus > 1:
            where += f" on CPU {self.engine.cpu}"
        message = f"replay diverged at {where}: {what}"
        if recent:
            message += f" [last matching: {recent}]"
        raise Divergence(message)

    # ---------------------------------------------------------------- device accesses
    def _device(self, mmio: bool, addr: int) -> tuple[Mapping | None, Bus]:
        bus = self._device_buses[1 if mmio else 0]
        return bus.lookup(addr), bus

    @staticmethod
    def _register_name(mmio: bool, mapping: Mapping | None, addr: int) -> str:
        if mapping is None:
            return f"unclaimed {'address' if mmio else 'port'} {addr:#x}"
        return f"{register_at('mmio' if mmio else 'pio', addr) or mapping.name} ({addr:#x})"

    def _is_input_register(self, mmio: bool, mapping: Mapping | None, addr: int) -> bool:
        """A register whose recorded value is an input, not the device's to compute: disk data
        before format 1.2, and completion status under chaos latencies."""
        if mapping is None or mmio:
            return False
        offset = addr - mapping.base
        if not self.disk_reads_logged and mapping.device is self.machine.ide.command_block \
                and offset == ide.DATA:
            return True
        return self.latencies_recorded and offset in LATENCY_REGISTERS.get(mapping.name, ())

    def _computed(self, mmio: bool, addr: int, size: int, recorded: int, event: Event) -> int:
        """The device's answer to a read, checked against the recorded value: the value the
        guest gets (the recorded one where they differ, so a --continue replay stays on track)."""
        mapping, bus = self._device(mmio, addr)
        value = bus.read(addr, size)
        if value != recorded and not self._is_input_register(mmio, mapping, addr):
            self._mismatch(f"{self._register_name(mmio, mapping, addr)} read {value:#x} in the replay, "
                           f"{recorded:#x} in the recording", event)
        return recorded

    def read(self, mmio: bool, addr: int, size: int) -> int:
        self._feed_due_input(between_instructions=False)
        if self._run_data is not None:
            event = self._run_event
            assert event is not None
            return self._computed(mmio, addr, size, self._read_from_run(addr, size), event)
        if mmio:
            if is_pure_id_read(addr, size):          # kvm (emu serves these in C): not logged
                self._check_exit_in_bounds("a read of the LAPIC ID register")
                # This exit counts: it may reach the position of an interrupt placed by its
                # landmark (the loop must take over here) or the recording's end.
                self._bound_run()
                return self._device_buses[1].read(addr, size)
            if is_lapic_time_read(addr):
                self._device_buses[1].read(addr, size)                 # a time value: the trace's
                return self._take(Kind.CLOCK).record[CLOCK.value]
            event = self._take(Kind.MMIO_READ)
            self._check_access(event, addr, size)
            return self._computed(mmio, addr, size, event.record[ACCESS.value], event)
        event = self._take(Kind.PIO_READ, Kind.PIO_READ_RUN, Kind.CLOCK)
        if event.kind == Kind.CLOCK:
            self._device_buses[0].read(addr, size)                     # a time value: the trace's
            return event.record[CLOCK.value]
        if event.kind == Kind.PIO_READ_RUN:
            self._start_run(event)
            return self._computed(mmio, addr, size, self._read_from_run(addr, size), event)
        self._check_access(event, addr, size)
        return self._computed(mmio, addr, size, event.record[ACCESS.value], event)

    def _start_run(self, event: Event) -> None:
        self._run_data = self._run_bytes(event.record)
        self._run_offset = 0
        self._run_event = event

    def _run_bytes(self, record: list) -> bytes:
        """A run's data: its bytes, or the sectors its hashes name (stored before it: the reader
        checks that)."""
        payload = record[RUN.data]
        if isinstance(payload, (list, tuple)):
            return b"".join(self._sectors[h] for h in payload)
        return bytes(payload)

    def read_string(self, port: int, size: int, count: int) -> bytes:
        """A whole `rep ins` at once (the kvm engine's string exits): one run record."""
        self._feed_due_input(between_instructions=False)
        event = self._take(Kind.PIO_READ_RUN, Kind.PIO_READ)
        if event.kind == Kind.PIO_READ:
            data = event.record[ACCESS.value].to_bytes(size, "little")
        else:
            data = self._run_bytes(event.record)
        if event.record[RUN.port] != port or event.record[RUN.size] != size or len(data) != size * count:
            self._diverge(f"recorded {event.describe()}; replayed a string read of {count} x {size} bytes "
                          f"from port {port:#x}", event)
        mapping, bus = self._device(False, port)
        computed = bus.read_string(port, size, count)
        if computed != data and not self._is_input_register(False, mapping, port):
            first = next(i for i in range(len(data)) if computed[i] != data[i]) // size
            self._mismatch(f"{self._register_name(False, mapping, port)} string read element {first} differs "
                           f"between the replay's device and the recording", event)
        return data

    def write_string(self, port: int, size: int, data: bytes) -> None:
        self._feed_due_input(between_instructions=False)
        event = self._take(Kind.PIO_WRITE_RUN, Kind.PIO_WRITE)
        recorded = event.record[ACCESS.value].to_bytes(size, "little") if event.kind == Kind.PIO_WRITE \
            else bytes(event.record[RUN.data])
        if event.record[RUN.port] != port or event.record[RUN.size] != size or recorded != data:
            self._mismatch(f"recorded {event.describe()}; replayed a string write of {len(data)} bytes "
                           f"to port {port:#x}", event)
        self._device_buses[0].write_string(port, size, data)

    def _read_from_run(self, addr: int, size: int) -> int:
        event = self._run_event
        assert event is not None and self._run_data is not None
        element = self._run_offset // size
        if addr != event.record[RUN.port] or size != event.record[RUN.size] or \
                self.engine.position != event.position + element:
            self._diverge(f"a run of reads from port {event.record[RUN.port]:#x} was at element {element}; the "
                          f"guest read port {addr:#x} size {size} at position {self.engine.position}", event)
        value = int.from_bytes(self._run_data[self._run_offset:self._run_offset + size], "little")
        self._run_offset += size
        if self._run_offset >= len(self._run_data):
            self._end_run()
        return value

    def _end_run(self) -> None:
        """The last element of a run of accesses is done (on kvm, each was an exit of its own)."""
        self._run_data = None
        self._run_event = None
        if not self.exact_positions:
            self._bound_run()

    def write(self, mmio: bool, addr: int, size: int, value: int) -> None:
        self._feed_due_input(between_instructions=False)
        bus = self._device_buses[1 if mmio else 0]
        if self._run_data is not None and self._run_event is not None \
                and self._run_event.kind == Kind.PIO_WRITE_RUN:
            self._write_into_run(addr, size, value)
        elif mmio:
            event = self._take(Kind.MMIO_WRITE)
            self._check_access(event, addr, size, value)
        else:
            event = self._take(Kind.PIO_WRITE, Kind.PIO_WRITE_RUN)
            if event.kind == Kind.PIO_WRITE_RUN:
                self._start_run(event)
                self._write_into_run(addr, size, value)
            else:
                self._check_access(event, addr, size, value)
        bus.write(addr, size, value)

    def string_budget(self, port: int, size: int, write: bool) -> int:
        """emu's `rep outs` in bulk: how many elements from here the device takes and the trace
        has in the run of writes under way (or starting here); the engine may run to its last."""
        device = self._device_buses[0].string_budget(port, size, write)
        if device < 2 or not self.exact_positions:
            return 0
        kind = Kind.PIO_WRITE_RUN if write else Kind.PIO_READ_RUN
        position = self.engine.position
        if self._run_data is not None:
            event = self._run_event
            assert event is not None
            left = (len(self._run_data) - self._run_offset) // size
            at = event.position + self._run_offset // size
        else:
            event = self.next
            if event is None or event.kind != kind:
                return 0
            left = len(self._run_bytes(event.record)) // size
            at = event.position
        if event.kind != kind or at != position or event.record[RUN.port] != port \
                or event.record[RUN.size] != size:
            return 0                               # the one-by-one path names the divergence
        budget = min(device, left)
        if budget >= 2:
            self.engine.move_stop(position + budget - 1)
        return budget

    def read_run(self, port: int, size: int, count: int) -> bytes:
        """emu: the reads of `count` consecutive instructions (`rep ins` in bulk), the first at
        the engine's position, all within the run string_budget allowed: the recorded bytes,
        checked against what the replay's device computes."""
        self._feed_due_input(between_instructions=False)
        if self._run_data is None:
            self._start_run(self._take(Kind.PIO_READ_RUN))
        event = self._run_event
        assert event is not None and self._run_data is not None
        offset = self._run_offset
        if event.kind != Kind.PIO_READ_RUN or event.record[RUN.port] != port or event.record[RUN.size] != size \
                or self.engine.position != event.position + offset // size \
                or offset + count * size > len(self._run_data):
            self._diverge(f"a run of reads from port {event.record[RUN.port]:#x} was at element "
                          f"{offset // size}; the guest read {count} x {size} bytes from port {port:#x} "
                          f"at position {self.engine.position}", event)
        recorded = self._run_data[offset:offset + count * size]
        mapping, bus = self._device(False, port)
        computed = bus.read_run(port, size, count)
        if computed != recorded and not self._is_input_register(False, mapping, port):
            first = next(i for i in range(len(recorded)) if computed[i] != recorded[i]) // size
            self._mismatch(f"{self._register_name(False, mapping, port)} read element {offset // size + first} "
                           f"differs between the replay's device and the recording", event)
        self._run_offset += count * size
        if self._run_offset >= len(self._run_data):
            self._end_run()
        self._bound_run()
        return recorded

    def write_run(self, port: int, size: int, data: bytes) -> None:
        """emu: the writes of len(data) // size consecutive instructions (`rep outs` in bulk),
        the first at the engine's position, all within the run string_budget allowed."""
        self._feed_due_input(between_instructions=False)
        position = self.engine.position
        element = 0
        while element < len(data) // size:
            if self._run_data is None or self._run_event is None or self._run_event.kind != Kind.PIO_WRITE_RUN:
                value = int.from_bytes(data[element * size:(element + 1) * size], "little")
                event = self._take(Kind.PIO_WRITE_RUN, Kind.PIO_WRITE)
                if event.kind != Kind.PIO_WRITE_RUN:
                    self._check_access(event, port, size, value)
                    element += 1
                    continue
                self._start_run(event)
            # the elements that fall in this run at once, then any mismatch one by one
            offset = self._run_offset
            take = min(len(data) // size - element, (len(self._run_data) - offset) // size)
            chunk = data[element * size:(element + take) * size]
            event = self._run_event
            if take > 1 and chunk == self._run_data[offset:offset + take * size] \
                    and position + element == event.position + offset // size \
                    and port == event.record[RUN.port] and size == event.record[RUN.size]:
                self._run_offset += take * size
                element += take
                if self._run_offset >= len(self._run_data):
                    self._end_run()
                continue
            value = int.from_bytes(data[element * size:(element + 1) * size], "little")
            self._write_into_run(port, size, value, position + element)
            element += 1
        self._bound_run()
        self._device_buses[0].write_run(port, size, data)

    def _write_into_run(self, addr: int, size: int, value: int, position: int | None = None) -> None:
        event = self._run_event
        assert event is not None and self._run_data is not None
        expected = int.from_bytes(self._run_data[self._run_offset:self._run_offset + size], "little")
        element = self._run_offset // size
        if position is None:
            position = self.engine.position
        if position != event.position + element:
            self._diverge(f"a run of writes to port {event.record[RUN.port]:#x} was at element {element}; the "
                          f"guest wrote port {addr:#x} at position {position}", event)
        if addr != event.record[RUN.port] or size != event.record[RUN.size] or value != expected:
            self._mismatch(f"write run to port {event.record[RUN.port]:#x} element {element}: recorded "
                           f"{expected:#x}, replayed {value:#x} to port {addr:#x}", event)
        self._run_offset += size
        if self._run_offset >= len(self._run_data):
            self._end_run()

    def _check_access(self, event: Event, addr: int, size: int, value: int | None = None) -> None:
        record = event.record
        if record[ACCESS.port] != addr or record[ACCESS.size] != size or \
                (value is not None and record[ACCESS.value] != value):
            got = f"address {addr:#x} size {size}" + (f" value {value:#x}" if value is not None else "")
            self._mismatch(f"recorded {event.describe()}; replayed {got}", event)

    def _mismatch(self, what: str, event: Event | None) -> None:
        if not self.keep_going:
            self._diverge(what, event)
        where = f"event {event.index}" if event is not None else "end of trace"
        self.mismatches.append(f"{where}: {what}")

    # ---------------------------------------------------------------- what the engine asks
    def poll(self) -> int | None:
        """emu: instructions until the next interrupt. kvm: ns until the exit-free watch looks."""
        if not self.exact_positions:
            return self._watch_exit_free_running()
        event = self.next
        if event is not None and event.kind == Kind.INTERRUPT:
            return max(0, event.position - self.engine.position)
        return None

    def _watch_exit_free_running(self) -> int:
        """kvm: diverge when the guest has made no exit for the exit-free limit. The engine
        calls this after every exit and kick; positions are only looked at once a tick, so the
        kicker's deadline stays put between ticks (arming it again costs nothing then)."""
        now = self.clock.now_ns()
        if now < self._watch_tick_ns:
            return self._watch_tick_ns - now
        position = self.engine.position
        if position != self._watch_position:
            self._watch_position = position
            self._watch_since_ns = now
        elif now - self._watch_since_ns >= self.exit_free_limit_ns:
            limit = self.exit_free_limit_ns / 1e9
            event = self.next
            if event is not None:
                wanted = f"the recording has {event.describe()} at exit {event.position}"
            else:
                wanted = f"the recording ended at exit {self.end_position}"
            self._diverge(f"the guest ran {limit:g} s without a port, MMIO or HLT exit at position "
                          f"{position} (the kvm replay's limit for exit-free running); {wanted}", event)
        tick = min(KVM_WATCH_TICK_NS, max(1, self.exit_free_limit_ns // 4))
        self._watch_tick_ns = now + tick
        return tick

    def has_pending(self) -> bool:
        self._feed_due_input(between_instructions=True)
        event = self.next
        if event is None or event.kind != Kind.INTERRUPT or event.position != self.engine.position:
            return False
        return not has_landmark(event) or self._landmark_reached

    def acknowledge(self) -> int:
        """The CPU takes the interrupt the recording took here; the machine's interrupt
        controllers must have it pending (the timer's fires now: the trace drives it)."""
        self._landmark_reached = False
        event = self._take(Kind.INTERRUPT)
        vector = event.record[INTERRUPT.vector]
        if not self.machine.cpu_lapic.take_recorded(vector):
            self._mismatch(f"the recording took interrupt vector {vector} ({event.record[INTERRUPT.source]}) "
                           f"here; the replayed devices had not raised it", event)
        return vector

    def choose(self, position: int, current: int, runnable: Callable[[int], bool]) -> int | None:
        """Several CPUs, the machine's scheduler on replay: switch where the recording did."""
        event = self.next
        if event is None or event.kind != Kind.SWITCH or event.position != position:
            return None
        if has_landmark(event):                  # kvm, between exits: once the CPU is there
            if not self._landmark_reached:
                return None
            self._landmark_reached = False
        event = self._take(Kind.SWITCH)
        cpu = event.record[SWITCH.cpu]
        if cpu >= self.machine.cpus or not self.engine.cpu_started(cpu):
            self._diverge(f"the recording switched to CPU {cpu} here, which the replayed machine "
                          f"{'does not have' if cpu >= self.machine.cpus else 'has not started'}", event)
        return cpu

    @staticmethod
    def next_switch_position() -> None:
        """Replay runs end at the next event (a SWITCH among them) anyway."""
        return None

    def _seek_landmark(self, event: Event) -> None:
        """kvm: the interrupt was injected, or the CPUs switched, between exits: find where (see
        _run_to_landmark)."""
        landmark = event_landmark(event)
        assert landmark is not None
        self._run_to_landmark(landmark, event.describe(), event)
        self._landmark_reached = True

    def _run_to_landmark(self, landmark: dict, what: str, event: Event | None,
                         tries: int = LANDMARK_TRIES) -> None:
        """kvm: run to a point between exits given by its registers. Run to the recorded RIP
        with a hardware breakpoint and stop where the registers match too (KVM does not set RF:
        step over a hit that does not match with the breakpoint off, then arm it again). Exits
        on the way are checked against the trace as usual; the exit-free watch bounds the time."""
        engine = self.engine
        address = engine.get_state().cs.base + landmark["rip"]
        compared = [name for name in CpuState.GPR_NAMES + ("rflags",) if name in landmark]
        engine.set_guest_debug(hw_breakpoints=[address])
        try:
            for _ in range(tries):
                reason = engine.run()
                if reason is not StopReason.DEBUG:
                    self._diverge(f"the landmark of {what} at rip {landmark['rip']:#x} "
                                  f"was not reached (the guest stopped: {reason.value})", event)
                self.landmark_hits += 1
                state = engine.get_state()
                if all(_landmark_value(n, state.regs.get(n)) == _landmark_value(n, landmark[n])
                       for n in compared) and \
                        state.cr3 == landmark.get("cr3", state.cr3):
                    return
                engine.set_guest_debug(single_step=True)
                engine.run()
                engine.set_guest_debug(hw_breakpoints=[address])
            self._diverge(f"the landmark of {what} at rip {landmark['rip']:#x} never matched its "
                          f"registers in {tries:,} hits", event)
        finally:
            engine.set_guest_debug()

    def _settle_kvm_end(self) -> None:
        """kvm, at the recording's last exit: the recorder may have stopped the guest later,
        between exits (a timeout while it spun). The footer's final registers are then the
        landmark of where the recording ended."""
        final = (self.footer or {}).get("final_state") or {}
        regs = final.get("regs")
        if not isinstance(regs, dict) or "rip" not in regs:
            return
        state = self.engine.get_state()
        if all(state.regs.get(name) == regs[name] for name in COMPARED_REGISTERS if name in regs):
            return
        landmark = {name: regs[name] for name in CpuState.GPR_NAMES + ("rip", "rflags") if name in regs}
        if "cr3" in final:
            landmark["cr3"] = final["cr3"]
        self._run_to_landmark(landmark, "the recording's end (the recorder stopped the guest between "
                              "exits)", None, tries=END_LANDMARK_TRIES)

    def read_tsc(self) -> int:
        value = self._take(Kind.CLOCK).record[CLOCK.value]
        self.latest_tsc = max(self.latest_tsc, value)
        return value

    # ---------------------------------------------------------------- saving and restoring
    def save_state(self) -> "ReplayPlace":
        """Where the replay stands in the trace, and the machine's device state (not RAM or CPU:
        see replay.checkpoints).

        Console text and typed input are prefixes of what the whole replay produces, so only
        their lengths are saved; the longest seen so far is kept to restore a later point."""
        self._remember_output()
        return ReplayPlace(
            cursor=self._records.cursor, position=self._position, index=self._index, next=self.next,
            recent=tuple(self._recent), run_data=self._run_data, run_offset=self._run_offset,
            run_event=self._run_event, console=len(self.console), inputs=len(self.inputs),
            mismatches=len(self.mismatches), landmark_reached=self._landmark_reached,
            stopped_early=self.stopped_early, due_inputs=tuple(self._due_inputs),
            disk_reads=tuple(self._disk_reads), latest_tsc=self.latest_tsc,
            devices=self.machine.save_devices(), trace_cpu=self._trace_cpu,
            trace_cr3=tuple(self._trace_cr3.items()))

    def restore_state(self, saved: "ReplayPlace") -> None:
        self._position, self._index, self.next = saved.position, saved.index, saved.next
        self._run_data, self._run_offset, self._run_event = saved.run_data, saved.run_offset, saved.run_event
        self._landmark_reached, self.stopped_early = saved.landmark_reached, saved.stopped_early
        self.latest_tsc = saved.latest_tsc
        self._trace_cpu, self._trace_cr3 = saved.trace_cpu, dict(saved.trace_cr3)
        self._engine_stopped = False
        self._due_inputs = deque(saved.due_inputs)
        self._disk_reads = deque(saved.disk_reads)
        self.machine.restore_devices(saved.devices)
        self._records.rewind(saved.cursor, self._absorb_skipped)
        self._recent = deque(saved.recent, maxlen=RECENT)
        self._remember_output()
        self.console[:] = self._console_seen[:saved.console]
        self.inputs[:] = self._inputs_seen[:saved.inputs]
        del self.mismatches[saved.mismatches:]
        self._digest = None

    def _remember_output(self) -> None:
        if len(self.console) > len(self._console_seen):
            self._console_seen = bytes(self.console)
        if len(self.inputs) > len(self._inputs_seen):
            self._inputs_seen = list(self.inputs)

    @property
    def end_position(self) -> int | None:
        """Where the recording ended (the footer's position); None for a trace cut short."""
        return None if self.footer is None else int(self.footer.get("position") or 0)

    # ---------------------------------------------------------------- the loop
    def run_to(self, limit: int | None = None) -> str:
        """Run forward until position `limit`, a debugger stop, or the end of the recording.

        Returns "limit", "debug" (a breakpoint or watchpoint), "end" (everything recorded has
        been replayed: the guest is at the footer's position, or stopped there as the engine did
        when the recording ended in a fault) or "stopped" (--until EVENT).
        On emu every stop is settled: what was due at that instruction count has been delivered.

        The guest never runs past the next event's position: on emu each run ends there at the
        latest (arriving without doing the event is a divergence naming it); on kvm every exit
        is checked against the next event, and code that makes no exit at all is bounded by the
        exit-free watch (KVM_EXIT_FREE_LIMIT_S)."""
        engine = self.engine
        while True:
            if self.stopped_early:
                return "stopped"
            if self._engine_stopped:
                return "end"
            if not self.exact_positions:
                event = self.next
                if event is None and self._run_data is None and self._kvm_end_reached():
                    if self.footer is not None:
                        self._settle_kvm_end()
                    return "end"
                if event is not None and event.kind in LANDMARK_KINDS and has_landmark(event) and \
                        event.position == engine.position and not self._landmark_reached:
                    self._seek_landmark(event)
                try:
                    reason = engine.run()
                except RecordedEnd:
                    self._engine_stopped = True
                    return "end"
            else:
                self._run_limit = limit
                try:
                    reason = engine.run(until_position=self._replay_target())
                except RecordedEnd:
                    self._engine_stopped = True
                    return "end"
            if self.output is not None:
                self.output.flush()
            if reason is StopReason.HALT:
                self._take(Kind.HALT)
                # Several CPUs: a halted machine stays halted (the next run would halt again at
                # once), so the recording's last halt is its end.
                if self.exact_positions and self.next is None and \
                        engine.position >= (self.end_position or engine.position):
                    return "end"
            elif reason is StopReason.SHUTDOWN or reason is StopReason.UNSUPPORTED:
                self._engine_stop(reason)
                return "end"
            elif reason is StopReason.DEBUG:
                return "debug"
            elif reason is StopReason.BUDGET:
                self._check_due()
                if self.next is None and engine.position >= (self.end_position or engine.position):
                    return "end"
                if limit is not None and engine.position >= limit:
                    return "limit"

    def _engine_stop(self, reason: StopReason) -> None:
        """The engine cannot go on (a triple fault, an access outside RAM): the replay's end if
        the recording ended with the same stop, with the same detail, after every event."""
        end, detail = engine_stop_end(reason, self.engine)
        footer = self.footer
        if self.next is None and self._run_data is None and \
                (footer is None or (footer.get("end"), footer.get("detail")) == (end, detail)):
            self._engine_stopped = True               # a trace cut short: not verified anyway
            return
        event = self.next
        if event is not None:
            wanted = f"the recording has {event.describe()} at position {event.position} next"
        else:
            wanted = (f"the recording ended with {footer.get('end')!r} ({footer.get('detail')}) at "
                      f"position {self.end_position}")
        self._diverge(f"{detail} at position {self.engine.position}; {wanted}", event)

    def run(self) -> ReplayResult:
        return self.finish(self.run_to(self.until_position))

    def finish(self, outcome: str) -> ReplayResult:
        """The result of a replay that `run_to` brought to `outcome` (its last one): verified
        against the footer when it reached the recording's end (a divergence raises)."""
        engine = self.engine
        if outcome == "limit":
            self.stopped_early = True
        if self.stopped_early:
            return ReplayResult(events=self._index, instructions=engine.position, state_hash="",
                                position_unit=engine.position_unit,
                                verified=False, truncated=False, console=bytes(self.console),
                                mismatches=self.mismatches, stopped_early=True)
        truncated = self.footer is None
        guest_end = ""
        if not truncated:
            self._verify_end()
            if self.footer.get("end") in GUEST_ENDS:
                guest_end = str(self.footer.get("detail") or self.footer.get("end"))
        digest = self._ram_digest()
        return ReplayResult(events=self._index, instructions=engine.position, state_hash=digest[:16],
                            position_unit=engine.position_unit,
                            verified=not truncated and not self.mismatches, truncated=truncated,
                            console=bytes(self.console), mismatches=self.mismatches,
                            guest_end=guest_end)

    def _ram_digest(self) -> str:
        if self._digest is None:
            self._digest = hashlib.sha256(self.ram).hexdigest()
        return self._digest

    def _verify_end(self) -> None:
        footer = self.footer or {}
        missing = [name for name in FOOTER_VERIFIED_BY if name not in footer]
        if "final_state" in footer and "regs" not in footer["final_state"]:
            missing.append("final_state registers")
        if missing:
            raise TraceFormatError(f"{self.reader.path}: the footer lacks {', '.join(missing)}: "
                                   f"nothing to verify the replay against")
        end = int(footer.get("position") or 0)
        if self.engine.position != end:
            self._diverge(f"the recording ended at position {end}, the replay at {self.engine.position}", None)
        if self._expects_engine_stop and not self._engine_stopped:
            self._diverge(f"the recording ended with {footer.get('end')!r} ({footer.get('detail')}) at "
                          f"position {end}; the replayed guest reached it without stopping", None)
        final = footer.get("final_state", {}).get("regs", {})
        state = self.engine.get_state()
        differing = [f"{name} {final[name]:#x}!={state.regs.get(name, 0):#x}" for name in COMPARED_REGISTERS
                     if name in final and final[name] != state.regs.get(name, 0)]
        if differing:
            self._diverge("final registers differ: " + ", ".join(differing), None)
        if self.machine.cpus > 1:
            self._verify_cpus(footer.get("cpu_states"))
        if footer.get("ram_sha256") and self._ram_digest() != footer["ram_sha256"]:
            self._diverge("final RAM differs from the recording (sha256 mismatch)", None)
        if footer.get("console_sha256") and hashlib.sha256(bytes(self.console)).hexdigest() != footer["console_sha256"]:
            self._diverge("console output differs from the recording", None)

    def _verify_cpus(self, recorded: object) -> None:
        """Several CPUs: every CPU ends as it did (a CPU never started, as never started)."""
        if not isinstance(recorded, list) or len(recorded) != self.machine.cpus:
            raise TraceFormatError(f"{self.reader.path}: the footer lacks the state of each of its "
                                   f"{self.machine.cpus} CPUs: nothing to verify the replay against")
        for cpu, (was, now) in enumerate(zip(recorded, self.engine.cpu_states())):
            if "regs" not in was or "regs" not in now:
                if was.get("error") != now.get("error"):
                    self._diverge(f"CPU {cpu} ended {was.get('error') or 'running'} in the recording, "
                                  f"{now.get('error') or 'running'} in the replay", None)
                continue
            differing = [f"{name} {was['regs'][name]:#x}!={now['regs'].get(name, 0):#x}"
                         for name in COMPARED_REGISTERS
                         if name in was["regs"] and was["regs"][name] != now["regs"].get(name, 0)]
            if differing:
                self._diverge(f"final registers of CPU {cpu} differ: " + ", ".join(differing), None)

    def close(self) -> None:
        self.machine.close()
        self.reader.close()
        self.machine.release_ram()


def replay(trace: Path, output: BinaryIO | None = None, keep_going: bool = False,
           until_event: int | None = None, until_position: int | None = None,
           exit_free_limit_s: float = KVM_EXIT_FREE_LIMIT_S) -> ReplayResult:
    """Replay a trace; raises Divergence at the first difference (unless keep_going). With
    `until_event` / `until_position` it stops there instead and reports the CPU state."""
    check_unaltered(trace)           # the whole trace first: a bad or altered one never runs
    replayer = Replayer(trace, output=output, keep_going=keep_going, until_event=until_event,
                        until_position=until_position, exit_free_limit_s=exit_free_limit_s)
    try:
        result = replayer.run()
        if result.stopped_early:
            result.cpu = replayer.engine.get_state().describe()
            result.events = min(result.events, (until_event + 1) if until_event is not None else result.events)
        return result
    finally:
        replayer.close()
