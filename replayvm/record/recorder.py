"""The recorder: logs every device access and nondeterministic input of a running machine.

It sits between the engines and the buses (a `RecordingBus` in front of each), receives every
interrupt the engine injects and every byte the console types, and appends compact records to a
`TraceWriter`. What is logged (see docs/trace-format.md):
- every port and MMIO access with its value: for reads that value is the input replay feeds back,
  for writes it is what replay checks; reads of time (CMOS clock, LAPIC current count, RDTSC,
  the 8254's counters) are CLOCK records;
- `rep ins` / `rep outs` element runs as one record; sector-sized read runs (disk data) as
  references to a content table, so a sector read twice is stored once. A run is cut every
  MAX_BIN_LEN (16 MiB) bytes into consecutive runs, because the reader refuses longer bytes
  fields: on emu each element is one instruction, so a continuation run's position delta is the
  element count of the run before it (kvm string exits are one record each, at most a page);
- interrupts with their exact position and source; console input with its position;
- the address space of every event: an ASPACE record (the CR3 of the CPU making it) just before
  an event whose CPU's CR3 differs from the last one written for that CPU. CR3 changes are not
  events (a context switch is an ordinary instruction), so the CR3 is read at each event (a
  register read on emu, a look at the run page on kvm) and compared: one record per change seen.
Deliberately not logged: 4-byte reads of the LAPIC ID register, a pure function of the machine
(xv6 does ~470,000 a second); they are counted in the footer.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import TYPE_CHECKING, Any

from replayvm import hw
from replayvm.devices import cmos, lapic, pit
from replayvm.devices.lapic import is_pure_id_read
from replayvm.trace.format import MAX_ARRAY_LEN, MAX_BIN_LEN, Kind
from replayvm.trace.records import (ASPACE, CLOCK, DISK_READ, HALT, INPUT, INTERRUPT, LAYOUTS, PURE_READS,
                                    SECTOR, SWITCH)
from replayvm.trace.writer import TraceWriter

if TYPE_CHECKING:
    from replayvm.machine import Machine

SECTOR_SIZE = 512
PAGE_SIZE = 4096
ZERO_PAGE = bytes(PAGE_SIZE)
CMOS_DATA_PORT = hw.CMOS_PORT + cmos.DATA
# Every record is built by its layout's constructor (replayvm.trace.records), bound here once.
_build_mmio_read = LAYOUTS[Kind.MMIO_READ].build
_build_mmio_write = LAYOUTS[Kind.MMIO_WRITE].build
_build_clock = CLOCK.build
_build_aspace = ASPACE.build
_BUILD_RUN = {Kind.PIO_READ_RUN: LAYOUTS[Kind.PIO_READ_RUN].build,
              Kind.PIO_WRITE_RUN: LAYOUTS[Kind.PIO_WRITE_RUN].build}
# A run of one element is written as the plain access: its kind and constructor.
_SINGLE_ACCESS = {Kind.PIO_READ_RUN: (Kind.PIO_READ, LAYOUTS[Kind.PIO_READ].build),
                  Kind.PIO_WRITE_RUN: (Kind.PIO_WRITE, LAYOUTS[Kind.PIO_WRITE].build)}


class RecordingBus:
    """A bus in front of a bus: forwards every access and tells the recorder about it."""

    def __init__(self, bus, recorder: "Recorder", mmio: bool) -> None:
        self._bus = bus
        self._recorder = recorder
        self._mmio = mmio
        self.kind = bus.kind

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bus, name)

    def read(self, addr: int, size: int) -> int:
        value = self._bus.read(addr, size)
        self._recorder.read(self._mmio, addr, size, value)
        return value

    def write(self, addr: int, size: int, value: int) -> None:
        self._recorder.write(self._mmio, addr, size, value)
        self._bus.write(addr, size, value)

    def read_string(self, addr: int, size: int, count: int) -> bytes:
        data = self._bus.read_string(addr, size, count)
        self._recorder.string(Kind.PIO_READ_RUN, addr, size, data)
        return data

    def write_string(self, addr: int, size: int, data: bytes) -> None:
        self._recorder.string(Kind.PIO_WRITE_RUN, addr, size, data)
        self._bus.write_string(addr, size, data)

    def write_run(self, addr: int, size: int, data: bytes) -> None:
        self._recorder.port_run(Kind.PIO_WRITE_RUN, addr, size, data)
        self._bus.write_run(addr, size, data)

    def read_run(self, addr: int, size: int, count: int) -> bytes:
        data = self._bus.read_run(addr, size, count)
        self._recorder.port_run(Kind.PIO_READ_RUN, addr, size, data)
        return data


class Recorder:
    max_run_bytes = MAX_BIN_LEN         # a longer run is written as consecutive runs
    max_sites = MAX_ARRAY_LEN           # [rip, count] pairs per PURE_READS record

    def __init__(self, machine: "Machine", writer: TraceWriter, start_position: int = 0) -> None:
        self.machine = machine
        self.engine = machine.engine
        self.writer = writer
        self.append = writer.append
        self.counts: Counter[str] = Counter()
        self.interrupt_sources: Counter[str] = Counter()
        self.lapic_id_reads_logged_away = 0
        self._id_read_sites: Counter[int] = Counter()     # kvm: where the bus saw ID reads
        self._last_position = start_position      # a branch trace starts inside its parent
        self._sectors_stored: set[bytes] = set()
        self._run: list | None = None       # [kind, start position, port, size, bytearray, rip, cpl, next, cr3]
        # The address space of each event (ASPACE records): the CR3 last written for each CPU.
        self._address_space = self.engine.address_space
        self._cpu = int(getattr(machine, "running_cpu", 0))     # a branch may start on another
        self._cr3 = -1                      # the running CPU's last written (-1: none yet)
        self._cr3_by_cpu: dict[int, int] = {}
        # kvm positions count exits: a run of accesses in consecutive exits may span a context
        # switch, so there each element's CR3 is compared (emu runs are consecutive instructions)
        self._runs_span_code = not self.engine.exact_positions
        self._pit = getattr(machine, "pit", None)        # the plain PC's 8254: its counters are time
        self._appends = 0
        machine.pio = RecordingBus(machine.pio, self, mmio=False)
        machine.mmio = RecordingBus(machine.mmio, self, mmio=True)
        self.engine.on_interrupt = self.interrupt
        if getattr(machine, "cpus", 1) > 1:
            self.engine.on_switch = self.switch
        machine.input_observers.append(self.input)
        for index, disk in enumerate(machine.disks):
            disk.on_read = self._disk_reader(index)
        inner_tsc = machine.read_tsc

        def read_tsc() -> int:
            value = inner_tsc()
            self._clock("rdtsc", value)
            return value

        machine.read_tsc = read_tsc

    # ---------------------------------------------------------------- helpers
    def _position_delta(self, position: int) -> int:
        delta = position - self._last_position
        self._last_position = position
        return delta

    def _context(self) -> tuple[int, int]:
        return self.engine.exit_context()

    def _emit(self, record: tuple) -> None:
        self.append(record)
        self._appends += 1
        if self._appends & 0x3FFF == 0:
            self.writer.maybe_wake()

    def _event(self, record: tuple, cr3: int) -> None:
        """Emit an event of the running CPU made in address space `cr3`: after an ASPACE record
        when that differs from the CPU's last one written."""
        if cr3 != self._cr3:
            self._cr3 = cr3
            self._cr3_by_cpu[self._cpu] = cr3
            self.append(_build_aspace(cr3))
            self.counts["aspace"] += 1
        self.append(record)
        self._appends += 1
        if self._appends & 0x3FFF == 0:
            self.writer.maybe_wake()

    def _flush_run(self) -> None:
        run = self._run
        if run is None:
            return
        self._run = None
        kind, start, port, size, data, rip, cpl, _, cr3 = run
        if len(data) == size:                       # a run of one is a plain access
            simple, build = _SINGLE_ACCESS[kind]
            self._event(build(self._position_delta(start), port, size, int.from_bytes(data, "little"), rip, cpl),
                        cr3)
            self.counts[simple.name.lower()] += 1
            return
        self._emit_string(kind, start, port, size, bytes(data), rip, cpl, cr3)

    def _emit_string(self, kind: Kind, position: int, port: int, size: int, data: bytes,
                     rip: int, cpl: int, cr3: int) -> None:
        payload: Any = data
        if kind == Kind.PIO_READ_RUN and len(data) % SECTOR_SIZE == 0:
            payload = [self._store_sector(data[i:i + SECTOR_SIZE]) for i in range(0, len(data), SECTOR_SIZE)]
        self._event(_BUILD_RUN[kind](self._position_delta(position), port, size, len(data) // size, payload,
                                     rip, cpl), cr3)
        self.counts[kind.name.lower()] += 1

    # ---------------------------------------------------------------- what the bus reports
    def read(self, mmio: bool, addr: int, size: int, value: int) -> None:
        if mmio:
            if is_pure_id_read(addr, size):
                self.lapic_id_reads_logged_away += 1
                self._id_read_sites[self._context()[0]] += 1
                return
            self._flush_run()
            if lapic.is_time_read(addr):
                self._clock(lapic.CLOCK_SOURCE, value)
                return
            rip, cpl = self._context()
            self._event(_build_mmio_read(self._position_delta(self.engine.position), addr, size, value, rip, cpl),
                        self._address_space())
            self.counts["mmio_read"] += 1
            return
        if addr == CMOS_DATA_PORT and self.machine.cmos.time_register_selected:
            self._flush_run()
            self._clock(cmos.CLOCK_SOURCE, value)
            return
        if self._pit is not None and pit.is_time_read(addr - hw.PIT_PORT):
            self._clock(pit.CLOCK_SOURCE, value)
            return
        self._port_access(Kind.PIO_READ_RUN, addr, size, value)

    def write(self, mmio: bool, addr: int, size: int, value: int) -> None:
        if mmio:
            self._flush_run()
            rip, cpl = self._context()
            self._event(_build_mmio_write(self._position_delta(self.engine.position), addr, size, value, rip, cpl),
                        self._address_space())
            self.counts["mmio_write"] += 1
            return
        self._port_access(Kind.PIO_WRITE_RUN, addr, size, value)

    def _port_access(self, run_kind: Kind, port: int, size: int, value: int) -> None:
        """Port accesses are held back as a run while the same port is accessed once per
        instruction (`rep ins`/`rep outs`); a run of one is written as a plain access."""
        position = self.engine.position
        run = self._run
        if run is not None and run[0] == run_kind and run[2] == port and run[3] == size \
                and position == run[7] and len(run[4]) + size <= self.max_run_bytes \
                and (not self._runs_span_code or run[8] == self._address_space()):
            run[4] += value.to_bytes(size, "little")
            run[7] = position + 1
            return
        self._flush_run()
        rip, cpl = self._context()
        self._run = [run_kind, position, port, size, bytearray(value.to_bytes(size, "little")),
                     rip, cpl, position + 1, self._address_space()]

    def port_run(self, run_kind: Kind, port: int, size: int, data: bytes) -> None:
        """The accesses of len(data) // size consecutive instructions, the first at the engine's
        position: recorded exactly as that many calls of _port_access would record them."""
        position = self.engine.position
        count = len(data) // size
        run = self._run
        if run is None or run[0] != run_kind or run[2] != port or run[3] != size or position != run[7]:
            first, data = data[:size], data[size:]
            self._port_access(run_kind, port, size, int.from_bytes(first, "little"))
            position += 1
            count -= 1
            run = self._run
        while count:
            room = (self.max_run_bytes - len(run[4])) // size
            if room <= 0:                            # the run is full: the next element starts one
                self._flush_run()
                rip, cpl = self._context()
                run = self._run = [run_kind, position, port, size, bytearray(data[:size]), rip, cpl,
                                   position + 1, run[8]]       # consecutive instructions: one CR3
                data = data[size:]
                position += 1
                count -= 1
                continue
            take = min(room, count)
            run[4] += data[:take * size]
            data = data[take * size:]
            position += take
            count -= take
            run[7] = position

    def string(self, kind: Kind, port: int, size: int, data: bytes) -> None:
        """A whole string exit (kvm): one record at one exit position, at most the 4 KiB page KVM
        passes the data in, so far below the reader's limit."""
        if len(data) > self.max_run_bytes:
            raise ValueError(f"a string access of {len(data)} bytes is more than a trace record holds")
        self._flush_run()
        rip, cpl = self._context()
        self._emit_string(kind, self.engine.position, port, size, data, rip, cpl, self._address_space())

    def _clock(self, source: str, value: int) -> None:
        self._flush_run()
        rip, cpl = self._context()
        self._event(_build_clock(self._position_delta(self.engine.position), source, value, rip, cpl),
                    self._address_space())
        self.counts["clock"] += 1

    def _store_sector(self, sector: bytes) -> bytes:
        """The sector's hash, its content stored once in the trace before the first use."""
        digest = hashlib.sha256(sector).digest()[:16]
        if digest not in self._sectors_stored:
            self._sectors_stored.add(digest)
            self._emit(SECTOR.build(digest, sector))
            self.counts["sector_data"] += 1
        return digest

    def _disk_reader(self, index: int):
        """The observer of disk `index`'s door: every sector it hands out is a DISK_READ record
        (not positioned: it comes with the controller access that asked for it), so replay can
        feed the controller the same sectors without the image."""
        def disk_read(lba: int, data: bytes) -> None:
            self._emit(DISK_READ.build(index, lba, self._store_sector(data)))
            self.counts["disk_read"] += 1
        return disk_read

    # ---------------------------------------------------------------- engine and console
    def interrupt(self, vector: int, position: int) -> None:
        self._flush_run()
        source = self.machine.interrupt_source(vector)
        rip, cpl = self._context()
        landmark = self.engine.interrupt_landmark()
        self._event(INTERRUPT.build(self._position_delta(position), vector, source, rip, cpl, landmark),
                    self._address_space())
        if landmark is not None:
            self.counts["interrupt_landmarks"] += 1
        self.counts["interrupt"] += 1
        self.interrupt_sources[source] += 1

    def switch(self, cpu: int, position: int, landmark: dict | None = None) -> None:
        """Several CPUs: from `position` on, `cpu` runs (every record up to the next SWITCH is
        that CPU's). `landmark`: kvm switched between exits, where the CPU it left had these
        registers (replay runs that CPU to them first)."""
        self._flush_run()
        self._emit(SWITCH.build(self._position_delta(position), cpu, landmark))
        self.counts["switch"] += 1
        if landmark is not None:
            self.counts["switch_landmarks"] += 1
        self._cpu = cpu
        self._cr3 = self._cr3_by_cpu.get(cpu, -1)

    def input(self, source: str, data: bytes) -> None:
        self._flush_run()
        position = self.engine.position
        cr3 = self._address_space()
        for start in range(0, len(data), MAX_BIN_LEN):       # all at one position
            self._event(INPUT.build(self._position_delta(position), source, data[start:start + MAX_BIN_LEN]),
                        cr3)
            self.counts["input"] += 1
        self.counts["input_bytes"] += len(data)

    def halted(self) -> None:
        self._flush_run()
        self._event(HALT.build(self._position_delta(self.engine.position)), self._address_space())
        self.counts["halt"] += 1

    def finish(self) -> None:
        """Flush what is held back, and say where the unlogged pure reads came from."""
        self._flush_run()
        sites = Counter(self._id_read_sites)
        sites.update(self.engine.pure_read_sites())
        listed = [[rip, count] for rip, count in sites.most_common()]
        for start in range(0, len(listed), self.max_sites):
            self._emit(PURE_READS.build(lapic.PURE_READ_REGISTER, listed[start:start + self.max_sites]))


CHUNK_SIZE = 1 << 20
ZERO_CHUNK = bytes(CHUNK_SIZE)


def initial_ram_pages(ram: memoryview) -> list[tuple[int, bytes]]:
    """The non-zero 4 KiB pages of RAM: the initial image a trace carries.

    RAM is compared a MiB at a time as bytes (C-speed memcmp); only non-zero MiBs are split."""
    pages = []
    for chunk_start in range(0, len(ram), CHUNK_SIZE):
        chunk = bytes(ram[chunk_start:chunk_start + CHUNK_SIZE])
        if chunk == ZERO_CHUNK[:len(chunk)]:
            continue
        for offset in range(0, len(chunk), PAGE_SIZE):
            page = chunk[offset:offset + PAGE_SIZE]
            if page != ZERO_PAGE:
                pages.append(((chunk_start + offset) // PAGE_SIZE, page))
    return pages


def ram_digest(ram: memoryview) -> str:
    return hashlib.sha256(ram).hexdigest()
