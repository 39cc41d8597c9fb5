"""Which xv6 process each CPU ran, and when (`replayvm analyze --processes`): the `processes` table.

A trace says which address space (CR3) every event was made in (ASPACE records, feature
`aspace`), but not whose it is: that is in the guest's memory, which only a replay has. So this
pass replays the trace (verified, as `replayvm replay` does) and stops wherever the trace says a
CPU's CR3 changed -- at the first event the CPU made in its new address space -- and reads there,
in xv6's kernel: `cpus[cpu].proc`, that process's `pid`, `name` and `pgdir`. The process is the
owner of the address space when `V2P(proc->pgdir)` is the CR3 (otherwise xv6's process table is
searched for the one whose page directory it is); a CR3 no process owns (the kernel's own page
directory, on which the scheduler runs; the boot page directory) gives NULL pid and name.

Each row is one stretch of one CPU in one address space: from the first event in it
(`from_seq`, `from_position`) to the CPU's first event in the next (`to_seq`, `to_position`, not
included), or the trace's end; `last_position` is its last event's. The context switches
themselves happened between the CPU's previous event and `from_position`, and between
`last_position` and `to_position` (a CR3 write is an instruction, not an event: the trace places
it no more exactly; a CPU idling in xv6's scheduler makes no event until its next timer tick). The stretches of one CPU cover all its events; a CPU's other turns interleave
with other CPUs' events (`schedule` says who ran when).

Where the layouts come from: the kernel ELF's DWARF (xv6's Makefile builds with -ggdb): `struct
cpu` (its size, `proc`, `apicid`), `struct proc` (`pid`, `name`, `pgdir`, `state`) and the `ptable`
variable's type (where its `proc` array starts). A kernel without DWARF but with the symbols
`cpus` and `ptable` gets xv6-public's i386 layout (XV6_PUBLIC_LAYOUT), said as such in `meta`
(`processes.layout`). The array lengths (NCPU, NPROC) come from the symbols' sizes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from elftools.common.exceptions import DWARFError, ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from replayvm.errors import UsageError
from replayvm.trace.format import FEATURE_ASPACE, FEATURE_X86_64, Kind
from replayvm.trace.reader import TraceReader
from replayvm.trace.records import ASPACE, DPOS_INDEX, SWITCH

NAME_BYTES = 16                          # xv6's proc.name


@dataclass(frozen=True)
class Xv6Layout:
    """Where xv6 keeps its CPUs and processes (kernel virtual addresses, byte offsets)."""

    cpus: int                 # &cpus[0]
    ncpu: int
    cpu_size: int
    cpu_apicid: int
    cpu_proc: int
    ptable_procs: int         # &ptable.proc[0]
    nproc: int
    proc_size: int
    proc_pgdir: int
    proc_state: int           # enum procstate: 0 is UNUSED (a free slot keeps its old pgdir)
    proc_pid: int
    proc_name: int
    source: str               # "DWARF of <kernel>" or "xv6-public's layout (<kernel> has no DWARF)"


# xv6-public (x86), `struct cpu` and `struct proc` of proc.h, and `ptable` of proc.c, as gcc lays
# them out for -m32: what a kernel without DWARF is taken to have.
XV6_PUBLIC_LAYOUT = {"cpu_size": 176, "cpu_apicid": 0, "cpu_proc": 172, "ptable_proc": 52,
                     "proc_size": 124, "proc_pgdir": 4, "proc_state": 12, "proc_pid": 16, "proc_name": 108}
KERNBASE = 0x80000000


def xv6_layout(paths: Iterable[Path]) -> Xv6Layout | None:
    """The layout from the first ELF that has xv6's `cpus` and `ptable`; None if none has them."""
    for path in paths:
        try:
            with Path(path).open("rb") as f:
                elf = ELFFile(f)
                symbols = {}
                for section in elf.iter_sections():
                    if isinstance(section, SymbolTableSection):
                        for symbol in section.iter_symbols():
                            if symbol.name in ("cpus", "ptable") and symbol["st_info"]["type"] == "STT_OBJECT":
                                symbols[symbol.name] = (symbol["st_value"], symbol["st_size"])
                if set(symbols) != {"cpus", "ptable"}:
                    continue
                if elf.elfclass != 32:
                    raise UsageError(f"{path}: --processes reads 32-bit xv6 (xv6-public); this kernel is "
                                     f"a {elf.elfclass}-bit ELF")
                fields, source = _dwarf_layout(elf), f"DWARF of {Path(path).name}"
                if fields is None:
                    fields, source = dict(XV6_PUBLIC_LAYOUT), f"xv6-public's layout ({Path(path).name} has no DWARF)"
        except (OSError, ELFError, DWARFError) as error:
            raise UsageError(f"cannot read {path}: {error}") from None
        (cpus, cpus_size), (ptable, ptable_size) = symbols["cpus"], symbols["ptable"]
        return Xv6Layout(cpus=cpus, ncpu=max(1, cpus_size // fields["cpu_size"]), cpu_size=fields["cpu_size"],
                         cpu_apicid=fields["cpu_apicid"], cpu_proc=fields["cpu_proc"],
                         ptable_procs=ptable + fields["ptable_proc"],
                         nproc=max(0, (ptable_size - fields["ptable_proc"]) // fields["proc_size"]),
                         proc_size=fields["proc_size"], proc_pgdir=fields["proc_pgdir"],
                         proc_state=fields["proc_state"],
                         proc_pid=fields["proc_pid"], proc_name=fields["proc_name"], source=source)
    return None


def _dwarf_layout(elf: ELFFile) -> dict[str, int] | None:
    """struct cpu, struct proc and ptable's members from the DWARF of the unit defining ptable
    (proc.c); None when the kernel has no DWARF or the unit lacks one of them."""
    if not elf.has_dwarf_info():
        return None
    structs: dict[str, tuple[int, dict[str, int]]] = {}
    ptable_members: dict[str, int] | None = None
    for unit in elf.get_dwarf_info().iter_CUs():
        top = unit.get_top_DIE()
        for die in top.iter_children():
            name_attribute = die.attributes.get("DW_AT_name")
            name = name_attribute.value.decode(errors="replace") if name_attribute is not None else None
            if die.tag == "DW_TAG_structure_type" and name in ("cpu", "proc") and "DW_AT_byte_size" in die.attributes:
                structs[name] = (die.attributes["DW_AT_byte_size"].value, _members(die))
            elif die.tag == "DW_TAG_variable" and name == "ptable" and "DW_AT_type" in die.attributes:
                ptable_members = _members(die.get_DIE_from_attribute("DW_AT_type"))
        if ptable_members is not None:
            break
    if ptable_members is None or set(structs) != {"cpu", "proc"}:
        return None
    (cpu_size, cpu), (proc_size, proc) = structs["cpu"], structs["proc"]
    try:
        return {"cpu_size": cpu_size, "cpu_apicid": cpu["apicid"], "cpu_proc": cpu["proc"],
                "ptable_proc": ptable_members["proc"], "proc_size": proc_size, "proc_pgdir": proc["pgdir"],
                "proc_state": proc["state"], "proc_pid": proc["pid"], "proc_name": proc["name"]}
    except KeyError:
        return None


def _members(die) -> dict[str, int]:
    members = {}
    for child in die.iter_children():
        location = child.attributes.get("DW_AT_data_member_location")
        name = child.attributes.get("DW_AT_name")
        if child.tag == "DW_TAG_member" and name is not None and location is not None \
                and isinstance(location.value, int):
            members[name.value.decode(errors="replace")] = location.value
    return members


@dataclass
class Stretch:
    """One CPU in one address space, from its first event there (see the module docstring)."""

    cpu: int
    cr3: int
    from_seq: int
    from_position: int
    to_seq: int | None = None
    to_position: int | None = None
    last_position: int = 0           # of its last event: the CPU was in this space at least until then
    pid: int | None = None
    name: str | None = None


def check_processes_trace(header: dict, trace: Path) -> None:
    """Refuse, in one line, a trace the pass cannot read processes from."""
    features = header.get("features") or ()
    if FEATURE_ASPACE not in features:
        raise UsageError(f"{trace}: --processes needs a trace that records address spaces (feature "
                         f"aspace: recordings of replayvm 0.7.0 and later)")
    if FEATURE_X86_64 in features:
        raise UsageError(f"{trace}: --processes reads 32-bit xv6 (xv6-public); this is a 64-bit guest")
    if header.get("engine") != "emu":
        raise UsageError(f"{trace}: --processes replays the trace to exact positions: it needs an emu "
                         f"trace (this one was recorded on {header.get('engine')})")


def xv6_kernel_among(paths: Iterable[Path]) -> bool:
    """Whether one of the ELFs has xv6's `cpus` and `ptable` (symbol tables only: cheap)."""
    for path in paths:
        try:
            with Path(path).open("rb") as f:
                names = {symbol.name for section in ELFFile(f).iter_sections()
                         if isinstance(section, SymbolTableSection) for symbol in section.iter_symbols()
                         if symbol.name in ("cpus", "ptable")}
        except (OSError, ELFError):
            continue
        if names == {"cpus", "ptable"}:
            return True
    return False


def address_space_stretches(trace: Path) -> tuple[list[Stretch], list[int]]:
    """The stretches of the trace (without pid and name), and for each event (by seq) the index
    of its stretch (-1: a SWITCH, or an event before its CPU's first ASPACE). An ASPACE record
    opens a stretch at the next event (the recorder writes it just before)."""
    stretches: list[Stretch] = []
    event_stretch: list[int] = []
    current: dict[int, int] = {}                       # cpu -> index of its open stretch
    open_by_cpu: dict[int, Stretch] = {}
    with TraceReader(trace) as reader:
        check_processes_trace(reader.header, trace)
        start = int(reader.header.get("start_position") or 0)
        cpu = int((reader.header.get("start_cpus") or {}).get("current", 0))
        position, seq = start, 0
        pending: tuple[int, int] | None = None          # (cpu, cr3) of an ASPACE record just read
        positioned = {int(kind) for kind in Kind if kind in _POSITIONED}
        for record in reader:
            kind = record[0]
            if kind == Kind.ASPACE:
                pending = (cpu, record[ASPACE.cr3])
                continue
            if kind not in positioned:
                continue
            position += record[DPOS_INDEX]
            if pending is not None and kind != Kind.SWITCH:
                previous = open_by_cpu.get(pending[0])
                if previous is not None:
                    previous.to_seq, previous.to_position = seq, position
                stretch = Stretch(pending[0], pending[1], seq, position, last_position=position)
                current[pending[0]] = len(stretches)
                stretches.append(stretch)
                open_by_cpu[pending[0]] = stretch
                pending = None
            if kind == Kind.SWITCH:
                cpu = record[SWITCH.cpu]
                event_stretch.append(-1)
            else:
                index = current.get(cpu, -1)
                event_stretch.append(index)
                if index >= 0:
                    stretches[index].last_position = position
            seq += 1
        footer = reader.footer or {}
        end = int(footer.get("position", position))
    for stretch in open_by_cpu.values():
        stretch.to_seq, stretch.to_position = seq, end
    return stretches, event_stretch


_POSITIONED = frozenset({Kind.PIO_READ, Kind.PIO_WRITE, Kind.MMIO_READ, Kind.MMIO_WRITE, Kind.PIO_READ_RUN,
                         Kind.PIO_WRITE_RUN, Kind.INTERRUPT, Kind.INPUT, Kind.CLOCK, Kind.HALT, Kind.SWITCH})


class GuestMemory:
    """Reads of a 32-bit guest's kernel memory through its page tables (4 KiB and 4 MiB pages),
    from physical RAM."""

    def __init__(self, ram: memoryview) -> None:
        self.ram = ram

    def _u32_phys(self, address: int) -> int | None:
        if address + 4 > len(self.ram):
            return None
        return struct.unpack_from("<I", self.ram, address)[0]

    def translate(self, cr3: int, linear: int) -> int | None:
        """The physical address of `linear` in the address space of `cr3` (None: not mapped).
        CR3 0 (paging not set up yet) maps nothing here."""
        if cr3 & ~0xFFF == 0:
            return None
        pde = self._u32_phys((cr3 & ~0xFFF) + ((linear >> 22) << 2))
        if pde is None or not pde & 1:
            return None
        if pde & 0x80:                                    # a 4 MiB page (CR4.PSE, as xv6 sets it)
            return (pde & 0xFFC00000) | (linear & 0x3FFFFF)
        pte = self._u32_phys((pde & ~0xFFF) + (((linear >> 12) & 0x3FF) << 2))
        if pte is None or not pte & 1:
            return None
        return (pte & ~0xFFF) | (linear & 0xFFF)

    def read(self, cr3: int, linear: int, size: int) -> bytes | None:
        """`size` bytes at `linear` (within one page), or None if unmapped or outside RAM."""
        physical = self.translate(cr3, linear)
        if physical is None or physical + size > len(self.ram) or (linear & 0xFFF) + size > 0x1000:
            return None
        return bytes(self.ram[physical:physical + size])

    def u32(self, cr3: int, linear: int) -> int | None:
        data = self.read(cr3, linear, 4)
        return None if data is None else struct.unpack("<I", data)[0]


def owner(memory: GuestMemory, layout: Xv6Layout, cpu: int, cr3: int) -> tuple[int, str] | None:
    """(pid, name) of the xv6 process whose page directory `cr3` is, looked for first in
    `cpus[cpu].proc` (the CPU whose `apicid` is `cpu`), then in the process table; None for an
    address space no process owns."""
    directory = cr3 & ~0xFFF
    candidates: list[int] = []
    for index in [cpu] + [i for i in range(layout.ncpu) if i != cpu]:
        base = layout.cpus + index * layout.cpu_size
        apicid = memory.read(cr3, base + layout.cpu_apicid, 1)
        if apicid is None:
            return None                                  # the kernel is not mapped here
        if apicid[0] == cpu:
            proc = memory.u32(cr3, base + layout.cpu_proc)
            if proc:
                candidates.append(proc)
            break
    candidates += [layout.ptable_procs + i * layout.proc_size for i in range(layout.nproc)]
    for proc in candidates:
        pgdir = memory.u32(cr3, proc + layout.proc_pgdir)
        if pgdir is None or not pgdir or memory.translate(cr3, pgdir) != directory \
                or not memory.u32(cr3, proc + layout.proc_state):
            continue
        pid = memory.read(cr3, proc + layout.proc_pid, 4)
        name = memory.read(cr3, proc + layout.proc_name, NAME_BYTES)
        if pid is None or name is None:
            continue
        return struct.unpack("<i", pid)[0], name.split(b"\0", 1)[0].decode("utf-8", "replace")
    return None


def find_processes(trace: Path, layout: Xv6Layout) -> tuple[list[Stretch], list[int]]:
    """Replay `trace` (verified on the way: a divergence raises) and give every stretch its
    process, read where the stretch starts; with each event's stretch (address_space_stretches)."""
    from replayvm.replay.replayer import Replayer

    stretches, event_stretch = address_space_stretches(trace)
    if not stretches:
        return stretches, event_stretch
    replayer = Replayer(trace)
    try:
        memory = GuestMemory(replayer.ram)
        for stretch in stretches:
            if replayer.run_to(stretch.from_position) == "end" and replayer.engine.position < stretch.from_position:
                break
            found = owner(memory, layout, stretch.cpu, stretch.cr3)
            if found is not None:
                stretch.pid, stretch.name = found
    finally:
        replayer.close()
    return stretches, event_stretch
