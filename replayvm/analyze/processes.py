"""Which xv6 process each CPU ran, and when (`replayvm analyze --processes`): the `processes` table.

A trace says which address space (CR3) every event was made in (ASPACE records, feature
`aspace`), but not whose it is: that is in the guest's memory, which only a replay has. So this
pass replays the trace (verified against its footer, as `replayvm replay` does) and stops right
after every CR3 write: it finds each `mov %reg, %cr3` in the kernel ELF's executable sections
(capstone) and puts an emu breakpoint on the instruction after it, at its link address and, when
its segment is loaded elsewhere, at its load address too (xv6's `entry` runs there, before
paging). A stop there is one CPU's first instruction in the address space it just loaded: the
running CPU, at an exact position. There it reads, in xv6's kernel: `cpus[cpu].proc`, that
process's `pid`, `name` and `pgdir`. The process is the owner of the address space when
`V2P(proc->pgdir)` is the CR3 (otherwise xv6's process table is searched for the one whose page
directory it is); a CR3 no process owns (the kernel's own page directory, on which the scheduler
runs; the boot page directory) gives NULL pid and name.

Each row is one stretch of one CPU in one address space, from its first instruction there
(`from_position`) to where the CPU's next stretch begins (`to_position`, not included), or the
trace's end. What "ran" means with several CPUs: a stretch goes on across the turns the machine
gives the other CPUs (SWITCH records), since the descheduled CPU still holds that address space
and that process; its `instructions` are its CPU's own. xv6 switches a CPU to the kernel's page
directory before another CPU may take its process, so one process's stretches on different CPUs
never overlap. Each event belongs to its CPU's stretch holding its position.

A CR3 write the breakpoints miss (code outside the kernel's sections, such as xv6's entryother,
copied to 0x7000 at run time) shows at the CPU's next event, made in another address space than
its stretch's: a stretch begins there, at that event, not exactly (`exact` 0). A kernel with no
CR3 write found (or more than the engine's breakpoints) gets only such stretches, the way the pass
worked before breakpoints: each from the first event seen in its address space, and a CPU that
leaves a process and comes back with no event in between shows one stretch. `meta` says which
method was used (`processes.method`) and whether the replay was verified (`processes.replay`).

Where the layouts come from: the kernel ELF's DWARF (xv6's Makefile builds with -ggdb): `struct
cpu` (its size, `proc`, `apicid`), `struct proc` (`pid`, `name`, `pgdir`, `state`) and the `ptable`
variable's type (where its `proc` array starts). A kernel without DWARF but with the symbols
`cpus` and `ptable` gets xv6-public's i386 layout (XV6_PUBLIC_LAYOUT), said as such in `meta`
(`processes.layout`). The array lengths (NCPU, NPROC) come from the symbols' sizes.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from elftools.common.exceptions import DWARFError, ELFError
from elftools.elf.constants import SH_FLAGS
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
    kernel: Path | None = None    # the ELF they come from (where the CR3 writes are looked for)


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
                         proc_pid=fields["proc_pid"], proc_name=fields["proc_name"], source=source,
                         kernel=Path(path))
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
    """One CPU in one address space (see the module docstring), from `from_position` up to
    `to_position` (not included: where the CPU's next stretch begins, or the trace's end)."""

    cpu: int
    cr3: int
    from_position: int
    exact: bool                      # from the CPU's first instruction there (else its first event)
    to_position: int = 0
    pid: int | None = None
    name: str | None = None
    instructions: int = 0            # of its CPU, in its turns between from_ and to_position
    from_seq: int = 0                # the trace's events at positions from_position..to_position
    to_seq: int = 0
    events: int = 0                  # ... of which its CPU's
    last_position: int | None = None     # of its CPU's last event in it


@dataclass
class TraceOutline:
    """What the pass needs of a trace besides its replay (one read of the records): for every
    event (by seq) its position, CPU (-1: a SWITCH) and address space (the ASPACE in force for
    its CPU; None before the CPU's first), the CPUs' turns, and each CPU's CR3 at the start."""

    start: int
    end: int
    positions: list[int] = field(default_factory=list)
    cpus: list[int] = field(default_factory=list)
    cr3s: list[int | None] = field(default_factory=list)
    opens: list[bool] = field(default_factory=list)     # an ASPACE record came just before it
    turns: list[tuple[int, int]] = field(default_factory=list)     # (first position, cpu)
    initial_cr3: dict[int, int] = field(default_factory=dict)   # CPUs started at the start


@dataclass
class ProcessesFound:
    """The pass's answer: the stretches (by from_position), each event's stretch (an index into
    `stretches`; -1: a SWITCH, or an event before its CPU has one), how the stretches were
    delimited and whether the replay was verified (for `meta`)."""

    stretches: list[Stretch]
    event_stretch: list[int]
    method: str
    replay: str


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


def trace_outline(trace: Path) -> TraceOutline:
    """One pass over the records (no replay): see TraceOutline."""
    with TraceReader(trace) as reader:
        header = reader.header
        check_processes_trace(header, trace)
        start = int(header.get("start_position") or 0)
        start_cpus = header.get("start_cpus") or {}
        cpu = int(start_cpus.get("current", 0))
        outline = TraceOutline(start=start, end=start, turns=[(start, cpu)])
        outline.initial_cr3[cpu] = int((header.get("initial_state") or {}).get("cr3", 0))
        for other, state in enumerate(start_cpus.get("states") or ()):
            if state is not None and other != cpu:           # a branch: CPUs running already
                outline.initial_cr3[other] = int(state.get("cr3", 0))
        position = start
        cr3: dict[int, int] = {}
        pending = False
        positions, cpus, cr3s, opens = outline.positions, outline.cpus, outline.cr3s, outline.opens
        for record in reader:
            kind = record[0]
            if kind == Kind.ASPACE:
                cr3[cpu] = record[ASPACE.cr3]
                pending = True
                continue
            if kind not in _POSITIONED:
                continue
            position += record[DPOS_INDEX]
            positions.append(position)
            if kind == Kind.SWITCH:
                cpu = record[SWITCH.cpu]
                outline.turns.append((position, cpu))
                cpus.append(-1)
                cr3s.append(None)
                opens.append(False)
                continue
            cpus.append(cpu)
            cr3s.append(cr3.get(cpu))
            opens.append(pending)
            pending = False
        footer = reader.footer or {}
    outline.end = int(footer.get("position", position))
    return outline


_POSITIONED = frozenset({Kind.PIO_READ, Kind.PIO_WRITE, Kind.MMIO_READ, Kind.MMIO_WRITE, Kind.PIO_READ_RUN,
                         Kind.PIO_WRITE_RUN, Kind.INTERRUPT, Kind.INPUT, Kind.CLOCK, Kind.HALT, Kind.SWITCH})


def cr3_write_sites(kernel: Path) -> list[int]:
    """The linear address right after each `mov %reg, %cr3` (0F 22 /3) in the kernel ELF's
    executable sections, decoded with capstone: where its CPU goes on in the new address space.
    Each at the address it is linked at and, where its loadable segment is loaded elsewhere
    (xv6: linked at 0x801xxxxx, loaded at 0x001xxxxx), at the load address too: code that runs
    before paging is on (xv6's `entry`) executes there."""
    from capstone import CS_ARCH_X86, CS_MODE_32, CS_MODE_64, Cs, CsError

    try:
        with Path(kernel).open("rb") as f:
            elf = ELFFile(f)
            md = Cs(CS_ARCH_X86, CS_MODE_64 if elf.elfclass == 64 else CS_MODE_32)
            md.skipdata = True                      # a byte that decodes to nothing: go past it
            sites: list[int] = []
            for section in elf.iter_sections():
                if section["sh_type"] != "SHT_PROGBITS" or not section["sh_flags"] & SH_FLAGS.SHF_EXECINSTR:
                    continue
                for insn in md.disasm(section.data(), section["sh_addr"]):
                    code = bytes(insn.bytes)
                    at = code.find(b"\x0f\x22")
                    if insn.mnemonic == "mov" and at >= 0 and len(code) > at + 2 \
                            and (code[at + 2] >> 3) & 7 == 3 and insn.op_str.startswith("cr3,"):
                        sites.append(insn.address + insn.size)
            segments = [(seg["p_vaddr"], seg["p_memsz"], seg["p_paddr"]) for seg in elf.iter_segments()
                        if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] != seg["p_paddr"]]
    except (OSError, ELFError, CsError) as error:
        raise UsageError(f"cannot read {kernel}: {error}") from None
    twins = [site - vaddr + paddr for site in sites for vaddr, size, paddr in segments
             if vaddr < site <= vaddr + size]          # the mov itself is in the segment
    return sorted(set(sites + twins))


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


def find_processes(trace: Path, layout: Xv6Layout) -> ProcessesFound:
    """Replay `trace` (verified against its footer: a divergence raises) and delimit the
    stretches of each CPU in one address space, each with its process (see the module
    docstring): exactly, at every CR3 write of the kernel (breakpoints after them), or, for a
    kernel where none is found, at the first event the trace shows in each address space."""
    outline = trace_outline(trace)
    sites = cr3_write_sites(layout.kernel) if layout.kernel is not None else []
    kernel = Path(layout.kernel).name if layout.kernel is not None else "the kernel"
    if not sites:
        method = (f"events: no CR3 write found in {kernel}'s executable sections; a stretch begins at "
                  f"the first event in its address space")
        stretches, replay = _event_pass(trace, layout, outline)
    elif len(sites) > MAX_SITES:
        method = (f"events: {kernel} writes CR3 at {len(sites)} places, more than the "
                  f"{MAX_SITES} breakpoints the engine has; a stretch begins at the first event in "
                  f"its address space")
        stretches, replay = _event_pass(trace, layout, outline)
    else:
        method = (f"breakpoints: after each of the {len(sites)} CR3 writes of {kernel} "
                  f"({', '.join(f'{site:#x}' for site in sites)}); a stretch begins at its CPU's "
                  f"first instruction in its address space")
        stretches, replay = _exact_pass(trace, layout, outline, sites)
    event_stretch = _place(stretches, outline)
    return ProcessesFound(stretches, event_stretch, method, replay)


MAX_SITES = 64                      # the emu engine's breakpoints


def _exact_pass(trace: Path, layout: Xv6Layout, outline: TraceOutline,
                sites: list[int]) -> tuple[list[Stretch], str]:
    """The replay with a breakpoint after every CR3 write: each stop is a CPU's first
    instruction in the address space it just loaded (a stop where the CPU's address space did
    not change, or in user mode, begins nothing). Every event the replay takes is also
    checked against its CPU's stretch: an event in another address space means a CR3 write
    the breakpoints missed (code outside the kernel's sections, such as xv6's entryother,
    copied to 0x7000), and begins a stretch there, as the event method would."""
    from replayvm.engines.base import DebugEngine
    from replayvm.replay.replayer import Replayer

    replayer = Replayer(trace)
    engine = replayer.engine
    if not isinstance(engine, DebugEngine):          # check_processes_trace wants emu traces
        replayer.close()
        raise UsageError(f"{trace}: --processes needs an engine with breakpoints (emu)")
    memory = GuestMemory(replayer.ram)
    stretches: list[Stretch] = []
    current: dict[int, Stretch] = {}
    site_set = frozenset(sites)

    def begin(cpu: int, cr3: int, position: int, exact: bool) -> None:
        previous = current.get(cpu)
        if previous is not None:
            previous.to_position = position
        stretch = Stretch(cpu, cr3, position, exact)
        found = owner(memory, layout, cpu, cr3)
        if found is not None:
            stretch.pid, stretch.name = found
        stretches.append(stretch)
        current[cpu] = stretch

    for cpu, cr3 in sorted(outline.initial_cr3.items()):
        begin(cpu, cr3, outline.start, True)
    for position, cpu in outline.turns:              # a CPU started later starts from reset
        if cpu not in current:
            stretch = Stretch(cpu, 0, position, True)
            stretches.append(stretch)
            current[cpu] = stretch

    def on_event(event) -> None:
        if event.cr3 is None:
            return
        cpu = engine.cpu
        stretch = current.get(cpu)
        if stretch is None or stretch.cr3 != event.cr3:
            # An interrupt taken right after the CR3 write, before the breakpoint's stop, is
            # at the first instruction all the same.
            exact = event.kind == Kind.INTERRUPT and engine.linear_pc() in site_set
            begin(cpu, event.cr3, event.position, exact)

    replayer.on_event = on_event
    engine.set_breakpoints(sites)
    try:
        while (outcome := replayer.run_to(None)) == "debug":
            engine.take_debug_hit()
            cpu = engine.cpu
            cr3 = engine.address_space()
            user = engine.reg("cr0") & 1 and engine.reg("cs") & 3
            stretch = current.get(cpu)
            if not user and (stretch is None or stretch.cr3 != cr3):
                begin(cpu, cr3, engine.position, True)
            engine.resume_here()
        engine.set_breakpoints([])
        replay = _verdict(replayer, outcome)
    finally:
        replayer.on_event = None
        replayer.close()
    return stretches, replay


def _event_pass(trace: Path, layout: Xv6Layout, outline: TraceOutline) -> tuple[list[Stretch], str]:
    """The replay stopping where the trace says a CPU's CR3 changed (an ASPACE record before
    its event): the stretch begins at that event, and the process is read there."""
    from replayvm.replay.replayer import Replayer

    stretches = [Stretch(cpu, cr3, position, False)
                 for position, cpu, cr3, opens in zip(outline.positions, outline.cpus, outline.cr3s, outline.opens)
                 if opens and cr3 is not None]
    replayer = Replayer(trace)
    try:
        memory = GuestMemory(replayer.ram)
        outcome = "limit"
        for stretch in stretches:
            if replayer.engine.position < stretch.from_position:
                outcome = replayer.run_to(stretch.from_position)
                if outcome == "end" and replayer.engine.position < stretch.from_position:
                    break
            found = owner(memory, layout, stretch.cpu, stretch.cr3)
            if found is not None:
                stretch.pid, stretch.name = found
        if outcome != "end":
            outcome = replayer.run_to(None)
        replay = _verdict(replayer, outcome)
    finally:
        replayer.close()
    return stretches, replay


def _verdict(replayer, outcome: str) -> str:
    """The replay's end checked against the footer (a divergence raises): the `meta` note."""
    result = replayer.finish(outcome)
    if result.verified:
        return "verified"
    return "not verified: the trace was cut short (no footer)" if result.truncated else "not verified"


def _place(stretches: list[Stretch], outline: TraceOutline) -> list[int]:
    """Sort the stretches (by from_position, then CPU), end each where its CPU's next one
    begins (the last at the trace's end), count their instructions (their CPU's turns) and
    events, and give each event (by seq) the index of its CPU's stretch holding its position."""
    stretches.sort(key=lambda s: (s.from_position, s.cpu))
    by_cpu: dict[int, list[int]] = {}
    for index, stretch in enumerate(stretches):
        by_cpu.setdefault(stretch.cpu, []).append(index)
    for indexes in by_cpu.values():
        for index, following in zip(indexes, indexes[1:] + [None]):
            stretches[index].to_position = outline.end if following is None else stretches[following].from_position
    starts = {cpu: [stretches[i].from_position for i in indexes] for cpu, indexes in by_cpu.items()}
    positions = outline.positions
    event_stretch = []
    for seq, (position, cpu) in enumerate(zip(positions, outline.cpus)):
        index = -1
        if cpu >= 0 and cpu in starts:
            at = bisect.bisect_right(starts[cpu], position) - 1
            if at >= 0:
                index = by_cpu[cpu][at]
                stretch = stretches[index]
                stretch.events += 1
                stretch.last_position = position
        event_stretch.append(index)
    # instructions: each CPU's turns, as prefix sums of their lengths
    turns: dict[int, tuple[list[int], list[int], list[int]]] = {}
    for (start, cpu), following in zip(outline.turns, outline.turns[1:] + [(outline.end, -1)]):
        begins, ends, done = turns.setdefault(cpu, ([], [], [0]))
        begins.append(start)
        ends.append(max(start, following[0]))
        done.append(done[-1] + ends[-1] - start)

    def ran(cpu: int, position: int) -> int:
        """Instructions `cpu` executed before `position`."""
        begins, ends, done = turns.get(cpu, ([], [], [0]))
        at = bisect.bisect_right(begins, position) - 1
        return 0 if at < 0 else done[at] + min(position, ends[at]) - begins[at]

    for stretch in stretches:
        stretch.instructions = ran(stretch.cpu, stretch.to_position) - ran(stretch.cpu, stretch.from_position)
        stretch.from_seq = bisect.bisect_left(positions, stretch.from_position)
        stretch.to_seq = bisect.bisect_left(positions, stretch.to_position) \
            if stretch.to_position < outline.end else len(positions)
    return event_stretch
