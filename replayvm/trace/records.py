"""The record codec: every record kind's named field layout, and the one validator built from it.

A record is a msgpack array `[kind, field, ...]`. `LAYOUTS` names each kind's fields and their
types (ranges, lengths, what they must refer to); docs/trace-format.md's record table is written
from it (`record_table()`; a test checks that the two agree). Field positions have names:
`ACCESS.value` is the index of an access record's value, `RUN.data` of a run's payload.

Records are built from the layouts too: `LAYOUTS[kind].build(field, ...)` (arguments in field
order, the optional trailing ones last and defaulting to None) returns the tuple the writer packs,
so the recorder, the writer and the session write no field order of their own. An optional field
is read with `layout.get(record, name)`, None when the record does not carry it
(`INTERRUPT.get(record, "landmark")`). A hot loop that unpacks records whole states the field names
it unpacks with `check_unpacking`, which refuses at import a layout with other fields or another
order.

TraceReader validates every record once against these layouts, so no consumer (info, replay,
analysis, checkpoints) meets an ill-typed record. The per-record checks are generated from the
layouts as one Python loop over a chunk of records with inline type tests (a function call per
record would cost more than the rest of an analysis load), see `build_validator`; a record that
fails is explained field by field on the slow path, in one line.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Callable

from replayvm import hw
from replayvm.trace.format import MAX_ARRAY_LEN, MAX_BIN_LEN, MAX_MAP_LEN, MAX_STR_LEN, POSITIONED, Kind

I63 = (1 << 63) - 1                  # SQLite's largest integer: positions, counts, clock values
U64 = (1 << 64) - 1                  # addresses and RIPs (64-bit guests), 8-byte values
MAX_NAME_LEN = 64                    # source and register names
PAGE_SIZE = 4096
SECTOR_SIZE = 512
HASH_SIZE = 16                       # sector hashes: the first 16 bytes of the sector's sha256
VALUE_LIMIT = {1: 1 << 8, 2: 1 << 16, 4: 1 << 32, 8: 1 << 64}
SITE_LIMIT = MAX_ARRAY_LEN           # [rip, count] pairs in one PURE_READS record


@dataclass(frozen=True)
class FieldType:
    """What a field must hold: `doc` for people, `test` a Python expression in `v` (the value)
    that may name the record's earlier fields and the reader's state (`sectors`, `ram_pages`).
    An integer field also gives `int_range`, its test once `v` is known to be an int, so that the
    generated checks test all of a record's integer types in one chained expression."""

    doc: str
    test: str
    int_range: str = ""


@dataclass(frozen=True)
class Layout:
    """One record kind: its fields after the kind, in order, and what the docs say of it."""

    kind: Kind
    fields: tuple[tuple[str, FieldType], ...]
    notes: str = ""
    optional: tuple[tuple[str, FieldType], ...] = ()   # trailing fields that may be absent
    action: str = ""                                    # run after a valid record (generated code)

    def __post_init__(self) -> None:
        """`layout.value` is the index of field `value` in a record (the kind is index 0): plain
        attributes, set once, because the replayer reads them for every event. `layout.build` is
        the record's constructor, generated once (see `_constructor`)."""
        for index, name in enumerate(self.names, start=1):
            assert name not in type(self).__dict__ and name not in self.__dataclass_fields__ \
                and name not in _INSTANCE_ATTRIBUTES, name
            object.__setattr__(self, name, index)
        object.__setattr__(self, "build", _constructor(self))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fields + self.optional)

    @property
    def arity(self) -> int:
        """The length of a record without its optional fields (the kind counts)."""
        return 1 + len(self.fields)

    @property
    def positioned(self) -> bool:
        return bool(self.fields) and self.fields[0][0] == "dpos"

    def get(self, record: tuple | list, name: str) -> Any:
        """Field `name` of `record`, None when it is an optional field the record does not carry
        (a validated record has all of its optional fields or none)."""
        index = self.__dict__.get(name)
        if type(index) is not int:
            raise AttributeError(f"{self.kind.name} records have no field {name!r}")
        return record[index] if index < len(record) else None

    # No __getattr__ for a friendlier message on a misspelt field: a class with one makes every
    # attribute read ~4x slower in CPython 3.11 (120 ns instead of 30), and the replayer and the
    # loader read field positions per record. A misspelt field is an AttributeError all the same.


_INSTANCE_ATTRIBUTES = ("build",)


def _constructor(layout: Layout) -> Callable[..., tuple]:
    """The generated `build(field, ...)` of one kind: a plain tuple display, so that building a
    record through the codec costs the recorder one call and nothing else. The kind is a plain int
    (msgpack packs an IntEnum member the same). Optional fields come last and default to None;
    a record carries all of them or none."""
    required = [name for name, _ in layout.fields]
    optional = [name for name, _ in layout.optional]
    params = ", ".join(required + [f"{name}=None" for name in optional])

    def display(names: list[str]) -> str:
        return "(" + ", ".join([str(int(layout.kind))] + names) + ("," if not names else "") + ")"

    name = f"build_{layout.kind.name.lower()}"
    lines = [f"def {name}({params}):"]
    if optional:
        absent = " and ".join(f"{n} is None" for n in optional)
        lines.append(f"    if {absent}:")
        lines.append(f"        return {display(required)}")
    lines.append(f"    return {display(required + optional)}")
    namespace: dict[str, Any] = {}
    exec(compile("\n".join(lines), f"<replayvm.trace.records {name}>", "exec"), namespace)
    build = namespace[name]
    build.__doc__ = f"The {layout.kind.name} record ({int(layout.kind)}, {', '.join(layout.names)})."
    return build


def check_unpacking(kinds: Any, *names: str, optional: tuple[str, ...] = ()) -> None:
    """For a hot loop that unpacks records whole (`_, dpos, port, ... = record`, cheaper than
    indexing by name): raise at import unless each of `kinds` has exactly these fields in this
    order, and these optional ones after them (the loop tells a record that carries them by its
    length: `len(record) == layout.arity` when it does not). A name `a|b` accepts either
    (`port|address` for port and MMIO accesses)."""
    for kind in kinds:
        layout = LAYOUTS[Kind(kind)]
        if tuple(name for name, _ in layout.optional) != optional or len(layout.fields) != len(names) or \
                any(field not in name.split("|") for (field, _), name in zip(layout.fields, names)):
            shown = ", ".join(names + tuple(f"[{name}]" for name in optional))
            raise RuntimeError(f"code unpacks {layout.kind.name} records as {shown}; "
                               f"their layout is {', '.join(layout.names)}")


def _int(lo: int, hi: int, doc: str) -> FieldType:
    # msgpack integers are within -2^63..2^64-1: a bound at either end needs no test
    bounds = " and ".join(([f"{lo} <= v"] if lo > -(1 << 63) else []) + ([f"v <= {hi}"] if hi < U64 else []))
    if lo > -(1 << 63) and hi < U64:
        bounds = f"{lo} <= v <= {hi}"
    return FieldType(doc, f"type(v) is int and {bounds or 'True'}", bounds or "True")


DPOS = _int(0, I63, "int 0..2^63-1")
PORT = _int(0, 0xFFFF, "int 0..0xFFFF")
ADDRESS = _int(0, U64, "int 0..2^64-1")
SIZE = FieldType("1, 2, 4 or 8", "type(v) is int and (v == 1 or v == 2 or v == 4 or v == 8)",
                 "(v == 1 or v == 2 or v == 4 or v == 8)")
VALUE = FieldType("int that fits in size bytes", "type(v) is int and 0 <= v < VALUE_LIMIT[size]",
                  "0 <= v < VALUE_LIMIT[size]")
RIP = _int(0, U64, "int 0..2^64-1")
CPL = _int(-1, 3, "int -1..3")
COUNT = _int(1, MAX_BIN_LEN, "int 1..2^24 (elements)")
VECTOR = _int(0, 255, "int 0..255")
NAME = FieldType(f"str of 1..{MAX_NAME_LEN} chars", f"type(v) is str and 0 < len(v) <= {MAX_NAME_LEN}")
CLOCK_VALUE = _int(0, I63, "int 0..2^63-1")
WRITE_DATA = FieldType("bytes, count × size of them", "type(v) is bytes and len(v) == count * size")
READ_DATA = FieldType("bytes (count × size), or a list of 16-byte hashes of sectors stored before, "
                      "count × size = 512 × hashes",
                      "(type(v) is bytes and len(v) == count * size) or "
                      "known_hashes(v, count * size, sectors)")
INPUT_DATA = FieldType("bytes, 1..16 MiB", f"type(v) is bytes and 0 < len(v) <= {MAX_BIN_LEN}")
LANDMARK = FieldType("map of register name to int 0..2^64-1 (kvm only)", "landmark_ok(v)")
HASH = FieldType("16 bytes", f"type(v) is bytes and len(v) == {HASH_SIZE}")
STORED_HASH = FieldType("16 bytes: the hash of a sector stored before",
                        f"type(v) is bytes and len(v) == {HASH_SIZE} and v in sectors")
CR3 = _int(0, U64, "int 0..2^64-1 (the CR3 register)")
CPU_INDEX = _int(0, 7, "int 0..7 (the CPU's place in the MP table; its APIC ID)")
DISK_INDEX = _int(0, 63, "int 0..63 (the disk's place in the header's `disks`)")
LBA = _int(0, I63, "int 0..2^63-1")
SECTOR_DATA = FieldType("512 bytes whose sha256 starts with the hash",
                        f"type(v) is bytes and len(v) == {SECTOR_SIZE} and "
                        f"sha256(v).digest()[:{HASH_SIZE}] == digest")
PAGE_NUMBER = FieldType("int 0..ram_bytes/4096-1", "type(v) is int and 0 <= v < ram_pages", "0 <= v < ram_pages")
PAGE_DATA = FieldType("4096 bytes", f"type(v) is bytes and len(v) == {PAGE_SIZE}")
SITES = FieldType("list of [rip, count]: int 0..2^64-1, int 0..2^63-1", "sites_ok(v)")
HEADER_MAP = FieldType("map", "header_ok(v)")
FOOTER_MAP = FieldType("map", "footer_ok(v)")

_ACCESS_FIELDS = (("dpos", DPOS), ("port", PORT), ("size", SIZE), ("value", VALUE), ("rip", RIP),
                  ("cpl", CPL))
_MMIO_FIELDS = (("dpos", DPOS), ("address", ADDRESS), ("size", SIZE), ("value", VALUE), ("rip", RIP),
                ("cpl", CPL))

LAYOUTS: dict[Kind, Layout] = {layout.kind: layout for layout in (
    Layout(Kind.HEADER, (("header", HEADER_MAP),), "see below"),
    Layout(Kind.PIO_READ, _ACCESS_FIELDS, "value = what the device returned: the replayed device must return it too"),
    Layout(Kind.PIO_WRITE, _ACCESS_FIELDS, "checked on replay"),
    Layout(Kind.MMIO_READ, _MMIO_FIELDS),
    Layout(Kind.MMIO_WRITE, _MMIO_FIELDS),
    Layout(Kind.PIO_READ_RUN, (("dpos", DPOS), ("port", PORT), ("size", SIZE), ("count", COUNT),
                               ("data", READ_DATA), ("rip", RIP), ("cpl", CPL)),
           "consecutive reads of one port (`rep ins`; on kvm also reads in consecutive exits); "
           "element k at the record's position + k, except a kvm string exit (one exit, one "
           "position); a run longer than 16 MiB is split into consecutive runs"),
    Layout(Kind.INTERRUPT, (("dpos", DPOS), ("vector", VECTOR), ("source", NAME), ("rip", RIP),
                            ("cpl", CPL)),
           "injected at exactly this position; source: `timer`, `com1`, `ide0`, `keyboard`, ...",
           optional=(("landmark", LANDMARK),)),
    Layout(Kind.INPUT, (("dpos", DPOS), ("source", NAME), ("data", INPUT_DATA)),
           "bytes typed at the console (`com1`); replay hands them to the UART at this position"),
    Layout(Kind.CLOCK, (("dpos", DPOS), ("source", NAME), ("value", CLOCK_VALUE), ("rip", RIP),
                        ("cpl", CPL)),
           "a time value the guest read: `cmos` (RTC register), `lapic.tccr`, `rdtsc`, `pit` (an 8254 counter, plain PC)"),
    Layout(Kind.HALT, (("dpos", DPOS),), "the guest executed HLT and waited"),
    Layout(Kind.SECTOR, (("digest", HASH), ("data", SECTOR_DATA)),
           "content of a disk sector, stored once, before its first use", action="sectors.add(digest)"),
    Layout(Kind.RAM_PAGE, (("page", PAGE_NUMBER), ("data", PAGE_DATA)),
           "initial RAM, non-zero pages only"),
    Layout(Kind.FOOTER, (("footer", FOOTER_MAP),), "see below"),
    Layout(Kind.PIO_WRITE_RUN, (("dpos", DPOS), ("port", PORT), ("size", SIZE), ("count", COUNT),
                                ("data", WRITE_DATA), ("rip", RIP), ("cpl", CPL)),
           "`rep outs` (on kvm also writes in consecutive exits, e.g. a print loop's `out`s); "
           "positions as for read runs, and split like them"),
    Layout(Kind.PURE_READS, (("register", NAME), ("sites", SITES)),
           "reads deliberately not logged one by one (`lapic.id`), counted per call site; written at "
           "the end (several records when there are more than 2^20 sites)"),
    Layout(Kind.SWITCH, (("dpos", DPOS), ("cpu", CPU_INDEX)),
           "from this position on CPU `cpu` runs (traces with the feature `smp`): every record up to "
           "the next SWITCH is that CPU's; positions stay one count over all CPUs; `landmark` (feature "
           "`kvm-smp`): the kvm engine switched between exits, where the CPU it left had those registers",
           optional=(("landmark", LANDMARK),)),
    Layout(Kind.ASPACE, (("cr3", CR3),),
           "the address space of the CPU running (the last SWITCH's; CPU 0 without one) from its "
           "next event on (feature `aspace`): written just before an event whenever its CPU's CR3 "
           "differs from the last one written for that CPU (before its first event too); not an "
           "event, so positions and event numbers are those of a trace without it"),
    Layout(Kind.DISK_READ, (("disk", DISK_INDEX), ("lba", LBA), ("digest", STORED_HASH)),
           "a sector a disk handed to its controller (format 1.2), in the order the controller "
           "asked: replay's disk input (replay needs no image)"),
)}
assert set(LAYOUTS) == set(Kind), "every kind has a layout"

# Named field positions for the code that reads records (and their constructors, `.build`).
HEADER = LAYOUTS[Kind.HEADER]
FOOTER = LAYOUTS[Kind.FOOTER]
ACCESS = LAYOUTS[Kind.PIO_READ]          # PIO_READ / PIO_WRITE (MMIO: `address` at the same index)
MMIO = LAYOUTS[Kind.MMIO_READ]
RUN = LAYOUTS[Kind.PIO_READ_RUN]         # PIO_READ_RUN / PIO_WRITE_RUN
INTERRUPT = LAYOUTS[Kind.INTERRUPT]
INPUT = LAYOUTS[Kind.INPUT]
CLOCK = LAYOUTS[Kind.CLOCK]
SECTOR = LAYOUTS[Kind.SECTOR]
RAM_PAGE = LAYOUTS[Kind.RAM_PAGE]
PURE_READS = LAYOUTS[Kind.PURE_READS]
DISK_READ = LAYOUTS[Kind.DISK_READ]
HALT = LAYOUTS[Kind.HALT]
SWITCH = LAYOUTS[Kind.SWITCH]
ASPACE = LAYOUTS[Kind.ASPACE]
KIND_INDEX = 0                           # every record's kind
DPOS_INDEX = 1                           # every positioned record's position delta
assert all(LAYOUTS[k].positioned == (k in POSITIONED) for k in Kind), "POSITIONED agrees with the layouts"
assert ACCESS.value == MMIO.value and RUN.data == LAYOUTS[Kind.PIO_WRITE_RUN].data


# ---------------------------------------------------------------- map fields (header, footer)
@dataclass(frozen=True)
class MapField:
    name: str
    doc: str
    check: Callable[[Any], bool]
    required: bool = False


def _is_int(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and lo <= v <= hi


def _is_text(limit: int = MAX_STR_LEN, nullable: bool = False) -> Callable[[Any], bool]:
    return lambda v: (nullable and v is None) or (type(v) is str and len(v) <= limit)


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda v: type(v) is str and v in choices


def _is_hex(length: int) -> Callable[[Any], bool]:
    return lambda v: type(v) is str and len(v) == length and re.fullmatch(r"[0-9a-f]+", v) is not None


def _list_of(item: Callable[[Any], bool], limit: int = MAX_ARRAY_LEN) -> Callable[[Any], bool]:
    return lambda v: type(v) in (list, tuple) and len(v) <= limit and all(item(x) for x in v)


def _map_of(value: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: type(v) is dict and len(v) <= MAX_MAP_LEN and \
        all(type(k) is str and len(k) <= MAX_NAME_LEN and value(x) for k, x in v.items())


def _number(v: Any) -> bool:
    return (type(v) is int and -I63 - 1 <= v <= I63) or type(v) is float


SEGMENT_FIELDS = ("selector", "base", "limit", "type", "s", "dpl", "present", "db", "l", "g", "avl",
                  "unusable")
REGISTER_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
                  "r12", "r13", "r14", "r15", "rip", "rflags")
SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr")
_u64 = _is_int(0, U64)


def cpu_state_ok(v: Any) -> bool:
    """A CpuState.to_dict(): registers, segments, descriptor tables, control registers."""
    if type(v) is not dict:
        return False
    for key, value in v.items():
        if key == "regs":
            if not (type(value) is dict and all(k in REGISTER_NAMES and _u64(x) for k, x in value.items())):
                return False
        elif key in SEGMENT_NAMES:
            if not (type(value) is dict and all(k in SEGMENT_FIELDS and _u64(x) for k, x in value.items())):
                return False
        elif key in ("gdt", "idt"):
            if not (type(value) in (list, tuple) and len(value) == 2 and all(_u64(x) for x in value)):
                return False
        elif key in ("cr0", "cr2", "cr3", "cr4", "efer"):
            if not _u64(value):
                return False
        else:
            return False
    return True


def _final_state_ok(v: Any) -> bool:
    """The CPU state at the end, or {"error": why} when the engine could not give it."""
    return cpu_state_ok(v) or (type(v) is dict and list(v) == ["error"] and _is_text()(v["error"]))


def _disk_ok(v: Any) -> bool:
    return type(v) is dict and set(v) <= {"name", "path", "sha256", "sectors"} and \
        _is_text(MAX_NAME_LEN)(v.get("name", "")) and _is_text(nullable=True)(v.get("path")) and \
        _is_text(nullable=True)(v.get("sha256")) and _is_int(0, I63)(v.get("sectors", 0))


def parent_ok(v: Any) -> bool:
    return type(v) is dict and set(v) == {"trace", "trace_sha256", "position", "event"} and \
        _is_text()(v["trace"]) and (v["trace_sha256"] is None or _is_hex(64)(v["trace_sha256"])) and \
        _is_int(0, I63)(v["position"]) and _is_int(0, I63)(v["event"])


def _state_value_ok(v: Any, depth: int = 0) -> bool:
    """A device state field: ints, bools, None, bytes up to 16 MiB, lists and maps of them (6 deep)."""
    if v is None or type(v) is bool:
        return True
    if type(v) is int:
        return -(1 << 63) <= v < 1 << 64
    if type(v) is bytes:
        return len(v) <= MAX_BIN_LEN
    if type(v) is str:
        return len(v) <= MAX_NAME_LEN
    if depth < 6 and type(v) in (list, tuple):
        return len(v) <= MAX_ARRAY_LEN and all(_state_value_ok(x, depth + 1) for x in v)
    if depth < 6 and type(v) is dict:
        return len(v) <= MAX_MAP_LEN and all(type(k) is str and _state_value_ok(x, depth + 1)
                                             for k, x in v.items())
    return False


def start_cpus_ok(v: Any) -> bool:
    """A branch's other CPUs (EmuEngine.start_cpus): lists of one length, one per CPU."""
    if type(v) is not dict or set(v) != {"current", "modes", "vectors", "halted", "halted_if", "states"}:
        return False
    count = len(v["modes"]) if type(v["modes"]) is list else 0
    lists = all(type(v[name]) is list and len(v[name]) == count
                for name in ("modes", "vectors", "halted", "halted_if", "states"))
    return 2 <= count <= 8 and lists and _is_int(0, count - 1)(v["current"]) and \
        all(_is_int(0, 2)(m) for m in v["modes"]) and all(_is_int(0, 255)(x) for x in v["vectors"]) and \
        all(type(b) is bool for b in v["halted"] + v["halted_if"]) and \
        all(s is None or cpu_state_ok(s) for s in v["states"])


def devices_ok(v: Any) -> bool:
    return type(v) is dict and len(v) <= 64 and all(
        _is_text(MAX_NAME_LEN)(name) and type(state) is dict and _state_value_ok(state, 1)
        for name, state in v.items())


HEADER_FIELDS = (
    MapField("format", '"replayvm-trace"', lambda v: v == "replayvm-trace"),
    MapField("replayvm", "str: the version that recorded", _is_text(MAX_NAME_LEN)),
    MapField("engine", '"emu" or "kvm"', _one_of("emu", "kvm")),
    MapField("position_unit", '"instructions" (emu) or "exits" (kvm)', _one_of("instructions", "exits")),
    MapField("ram_bytes", f"int, a multiple of 4096 up to {hw.MAX_RAM_MIB // 1024} GiB (below the device window)",
             lambda v: type(v) is int and 0 < v <= hw.MAX_RAM_MIB << 20 and v % PAGE_SIZE == 0),
    MapField("cpuid", "list of [leaf, subleaf, eax, ebx, ecx, edx], ints 0..2^32-1",
             _list_of(lambda row: type(row) in (list, tuple) and len(row) == 6
                      and all(_is_int(0, (1 << 32) - 1)(x) for x in row), 4096)),
    MapField("boot", '"disk" or "multiboot"', _one_of("disk", "multiboot")),
    MapField("kernel", "str or null", _is_text(nullable=True)),
    MapField("disks", "list of maps: name, path, sha256 (str or null), sectors (int)", _list_of(_disk_ok, 64)),
    MapField("command_line", "list of str", _list_of(_is_text())),
    MapField("start_time", "number (Unix seconds)", _number),
    MapField("clock", '"wall" or "virtual"', _one_of("wall", "virtual")),
    MapField("chaos_seed", "int or null", lambda v: v is None or _is_int(-I63 - 1, I63)(v)),
    MapField("initial_state", "CPU state (regs, segments, gdt, idt, cr0-cr4, efer)", cpu_state_ok),
    MapField("parent", "a branch (replay --live): map of trace (str), trace_sha256 (hex str or null), "
             "position and event (ints): where in which recording it went live", parent_ok, required=False),
    MapField("start_position", "int: the position the trace starts at (a branch: its parent's "
             "position; else 0)", _is_int(0, I63), required=False),
    MapField("devices", "map of device name to its state (a branch starts from them)", devices_ok,
             required=False),
    MapField("features", "list of str, not empty (format 3.x only): the machine features a reader "
             "must know to replay it", _list_of(_is_text(MAX_NAME_LEN), 64), required=False),
    MapField("cpus", "int 2..8 (feature `smp`): CPUs in the machine; absent: one", _is_int(2, 8),
             required=False),
    MapField("start_cpus", "a branch of a machine with several CPUs (feature `smp`): map of current "
             "(the CPU running), and lists, one per CPU, of modes (0 running, 1 waiting for its STARTUP "
             "IPI, 2 starting), vectors (STARTUP), halted, halted_if (bools) and states (CPU state, "
             "null for the running CPU and for one not started)", start_cpus_ok, required=False),
)
_count_map = _map_of(_is_int(0, I63))
FOOTER_FIELDS = (
    MapField("end", "str: why the recording ended", _is_text(MAX_NAME_LEN)),
    MapField("detail", "str", _is_text()),
    MapField("counts", "map of str to int: records by kind", _count_map),
    MapField("interrupt_sources", "map of str to int", _count_map),
    MapField("instructions", "int or null (emu)", lambda v: v is None or _is_int(0, I63)(v)),
    MapField("position", "int 0..2^63-1: the position at the end", _is_int(0, I63)),
    MapField("guest_ns", "int", _is_int(0, I63)),
    MapField("wall_s", "number", _number),
    MapField("lapic_id_reads", "int", _is_int(0, I63)),
    MapField("final_state", "CPU state, or {error: str}", _final_state_ok),
    MapField("ram_sha256", "hex str: sha256 of the final RAM", _is_hex(64)),
    MapField("console_sha256", "hex str: sha256 of everything the guest printed", _is_hex(64)),
    MapField("trace_sha256", "hex str: the record digest (format 1.1, see below)", _is_hex(64)),
    MapField("cpu_states", "list of CPU states, or {error: str}, one per CPU (feature `smp`)",
             _list_of(_final_state_ok, 8), required=False),
)
FOOTER_VERIFIED_BY = ("final_state", "ram_sha256", "console_sha256")   # a replay is checked against these


def plain_value(v: Any, depth: int = 0) -> bool:
    """A value JSON can carry (header fields a newer minor version may add): no bytes, ints
    within SQLite's range, at most 4 levels deep, string keys."""
    if v is None or type(v) in (bool, float):
        return True
    if type(v) is str:
        return len(v) <= MAX_STR_LEN
    if type(v) is int:
        return -I63 - 1 <= v <= I63
    if depth >= 4:
        return False
    if type(v) in (list, tuple):
        return len(v) <= MAX_ARRAY_LEN and all(plain_value(x, depth + 1) for x in v)
    if type(v) is dict:
        return len(v) <= MAX_MAP_LEN and all(type(k) is str and plain_value(x, depth + 1) for k, x in v.items())
    return False


def map_problem(value: Any, fields: tuple[MapField, ...], what: str) -> str | None:
    """Why `value` is not a valid header/footer map (None: it is)."""
    if type(value) is not dict:
        return f"the {what} is not a map"
    known = {f.name: f for f in fields}
    for field in fields:
        if field.required and field.name not in value:
            return f"the {what} lacks {field.name}"
    for key, item in value.items():
        if type(key) is not str:
            return f"the {what} has a key that is not a string"
        field = known.get(key)
        if field is not None:
            if not field.check(item):
                return f"the {what}'s {key} is {_show(item)} (must be {field.doc})"
        elif not plain_value(item):
            return f"the {what}'s {key} holds a value of an unsupported type"
    return None


def header_ok(v: Any) -> bool:
    return map_problem(v, HEADER_FIELDS, "header") is None


def footer_ok(v: Any) -> bool:
    return map_problem(v, FOOTER_FIELDS, "footer") is None


# ---------------------------------------------------------------- helpers of the field tests
def known_hashes(v: Any, length: int, sectors: set[bytes]) -> bool:
    """A read run's payload as sector hashes: all 16 bytes, all stored before, 512 bytes each."""
    if type(v) not in (list, tuple) or len(v) * SECTOR_SIZE != length:
        return False
    for digest in v:
        if type(digest) is not bytes or digest not in sectors:
            return False
    return True


def landmark_ok(v: Any) -> bool:
    return type(v) is dict and 0 < len(v) <= 32 and \
        all(k in REGISTER_NAMES + ("cr3",) and _u64(x) for k, x in v.items())


def sites_ok(v: Any) -> bool:
    if type(v) not in (list, tuple) or len(v) > SITE_LIMIT:
        return False
    for site in v:
        if type(site) not in (list, tuple) or len(site) != 2 or not _u64(site[0]) \
                or not _is_int(0, I63)(site[1]):
            return False
    return True


NAMESPACE: dict[str, Any] = {"I63": I63, "U64": U64, "VALUE_LIMIT": VALUE_LIMIT, "sha256": hashlib.sha256,
                             "known_hashes": known_hashes, "landmark_ok": landmark_ok,
                             "sites_ok": sites_ok, "header_ok": header_ok, "footer_ok": footer_ok}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _test(field_type: FieldType, name: str) -> str:
    return "(" + re.sub(r"\bv\b", name, field_type.test) + ")"


def _tests(fields: tuple[tuple[str, FieldType], ...], names: list[str]) -> list[str]:
    """The generated tests of a record's fields: the integer fields' types in one chained `is`
    (`int is type(a) is type(b)`), then every field's range or test, in field order."""
    ints = [name for (_, t), name in zip(fields, names) if t.int_range]
    tests = [" is ".join(["int"] + [f"type({name})" for name in ints])] if ints else []
    for (_, field_type), name in zip(fields, names):
        text = field_type.int_range or field_type.test
        if text != "True":
            tests.append("(" + re.sub(r"\bv\b", name, text) + ")")
    return tests


# ---------------------------------------------------------------- the validator
# Kinds the generated loop checks, most frequent first; the header and footer (once per trace,
# with checks on where they stand) go to the reader's `irregular` callback, as do unknown kinds.
FAST_KINDS = (Kind.PIO_READ, Kind.PIO_WRITE, Kind.MMIO_WRITE, Kind.MMIO_READ, Kind.INTERRUPT, Kind.CLOCK,
              Kind.PIO_READ_RUN, Kind.PIO_WRITE_RUN, Kind.HALT, Kind.INPUT, Kind.SECTOR, Kind.RAM_PAGE,
              Kind.PURE_READS, Kind.DISK_READ, Kind.SWITCH, Kind.ASPACE)

Validator = Callable[[list, set, int, int, Callable[[Any], bool]], tuple[int, list]]


def build_validator() -> Validator:
    """Generate `validate(records, sectors, ram_pages, position, irregular) -> (position, dropped)`.

    Checks each record of `records` against its layout; adds SECTOR hashes to `sectors`; sums the
    positioned records' deltas onto `position`. A record the loop does not accept (malformed, the
    header or footer, an unknown kind) goes to `irregular(record)`, which raises, or returns
    False for a record to drop (an optional kind) and True to keep."""
    groups: list[tuple[list[int], Layout]] = []
    for kind in FAST_KINDS:
        layout = LAYOUTS[kind]
        for kinds, other in groups:
            if (other.fields, other.optional, other.action) == (layout.fields, layout.optional, layout.action):
                kinds.append(int(kind))
                break
        else:
            groups.append(([int(kind)], layout))
    lines = ["def validate(records, sectors, ram_pages, position, irregular):",
             "    dropped = []",
             "    for r in records:",
             "        if (type(r) is tuple or type(r) is list) and r and type(r[0]) is int:",
             "            k = r[0]"]
    for number, (kinds, layout) in enumerate(groups):
        keyword = "if" if number == 0 else "elif"
        lines.append(f"            {keyword} {' or '.join(f'k == {k}' for k in kinds)}:")
        arity = 1 + len(layout.fields)
        names = [name for name, _ in layout.fields]
        if layout.optional:
            lines.append(f"                n = len(r)")
            lines.append(f"                if n == {arity} or n == {arity + len(layout.optional)}:")
            lines += [f"                    {name} = r[{i + 1}]" for i, name in enumerate(names)]
            tests = _tests(layout.fields, names)
            optional = " and ".join(f"(n <= {arity + i} or {_test(t, f'r[{arity + i}]')})"
                                    for i, (_, t) in enumerate(layout.optional))
            tests.append(f"({optional})")
        else:
            lines.append(f"                if len(r) == {arity}:")
            lines.append(f"                    _, {', '.join(names)}{',' if len(names) == 1 else ''} = r")
            tests = _tests(layout.fields, names)
        lines.append(f"                    if {' and '.join(tests)}:")
        if layout.positioned:
            lines.append("                        position += dpos")
        if layout.action:
            lines.append(f"                        {layout.action}")
        lines.append("                        continue")
    lines += ["        if not irregular(r):",
              "            dropped.append(r)",
              "    return position, dropped"]
    namespace = dict(NAMESPACE)
    exec(compile("\n".join(lines), "<replayvm.trace.records validator>", "exec"), namespace)
    return namespace["validate"]


def record_problem(record: Any, sectors: set[bytes], ram_pages: int) -> str:
    """Why a record the validator refused is wrong, in words (the slow path: one record)."""
    if type(record) not in (list, tuple) or not record or type(record[0]) is not int:
        return "a record that is not an array starting with its kind"
    layout = LAYOUTS.get(record[0])  # type: ignore[call-overload]
    if layout is None:
        return f"unknown record kind {record[0]}"
    name = layout.kind.name
    arity = 1 + len(layout.fields)
    if not arity <= len(record) <= arity + len(layout.optional):
        return f"a {name} record with {len(record) - 1} fields (its layout has {arity - 1})"
    values: dict[str, Any] = {"sectors": sectors, "ram_pages": ram_pages}
    for (field, field_type), value in zip(layout.fields + layout.optional, record[1:]):
        values[field] = value
        try:
            ok = eval(_test(field_type, "v"), NAMESPACE, {**values, "v": value})
        except Exception:                  # e.g. a size that is not a size, met by the value test
            ok = False
        if not ok:
            if field_type is READ_DATA and type(value) in (list, tuple) and \
                    any(type(h) is bytes and h not in sectors for h in value):
                return f"a {name} record refers to a sector hash with no SECTOR record before it"
            if field_type in (HEADER_MAP, FOOTER_MAP):
                fields, what = (HEADER_FIELDS, "header") if field_type is HEADER_MAP else (FOOTER_FIELDS, "footer")
                return map_problem(value, fields, what) or f"a bad {what}"
            return f"{name} field {field} is {_show(value)} (must be {field_type.doc})"
    return f"a malformed {name} record"


# ---------------------------------------------------------------- writing: the writer's side
def fit_text(text: str, limit: int = MAX_STR_LEN) -> str:
    """A string cut to what the reader accepts (limits count characters; msgpack's are bytes, so
    cut by UTF-8 bytes)."""
    data = text.encode("utf-8", "replace")
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


def fit_map(value: dict[str, Any], fields: tuple[MapField, ...], what: str) -> dict[str, Any]:
    """A header or footer map as the reader will accept it: over-long strings cut; anything else
    that would be refused is refused here, before a byte is written (ValueError)."""
    fitted = {key: _fit(item) for key, item in value.items()}
    problem = map_problem(fitted, fields, what)
    if problem is not None:
        raise ValueError(f"this {what} would not be readable: {problem}")
    return fitted


def _fit(value: Any) -> Any:
    if type(value) is str:
        return fit_text(value)
    if type(value) in (list, tuple):
        return [_fit(x) for x in value]
    if type(value) is dict:
        return {k: _fit(x) for k, x in value.items()}
    return value


# ---------------------------------------------------------------- documentation
def record_table() -> str:
    """The record table of docs/trace-format.md, from the layouts."""
    rows = ["| kind | name | fields after the kind | notes |", "|---|---|---|---|"]
    for kind in Kind:
        layout = LAYOUTS[kind]
        fields = ", ".join(f"{name} ({t.doc})" for name, t in layout.fields)
        if layout.optional:
            fields += ", [" + ", ".join(f"{name} ({t.doc})" for name, t in layout.optional) + "]"
        rows.append(f"| {int(kind)} | {kind.name} | {fields} | {layout.notes} |")
    return "\n".join(rows)


def map_table(fields: tuple[MapField, ...]) -> str:
    rows = ["| field | type | required |", "|---|---|---|"]
    rows += [f"| `{f.name}` | {f.doc} | {'yes' if f.required else ''} |" for f in fields]
    return "\n".join(rows)
