"""Load a trace into SQLite (sqlite-utils) for plain-SQL questions about a session.

Tables (one trace or several, keyed by `trace_id`): `meta`, `exits` (every logged device access;
a `rep ins/outs` run is one row with its `count`), `interrupts`, `inputs`, `clock_reads`, `halts`,
`disk_io` (one row per sector, reconstructed from the IDE register sequence), `console` (the text
the guest printed, a row per line with the position where it started), and `devices` (port and
register names). Views answer common questions; indexes are built after the load. See
docs/analysis.md.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path
from typing import Iterable

import sqlite_utils
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from replayvm import hw
from replayvm.analyze.devices import device_rows
from replayvm.errors import UsageError
from replayvm.trace.format import POSITIONED, Kind
from replayvm.trace.reader import TraceReader

BATCH = 50_000
IDE = hw.IDE0_CMD_PORT
IDE_READ_COMMANDS = {0x20, 0x21, 0xC4}
IDE_WRITE_COMMANDS = {0x30, 0x31, 0xC5}
KIND_NAMES = {int(k): k.name.lower() for k in Kind}
ACCESS_KINDS = {int(Kind.PIO_READ): ("pio", "read"), int(Kind.PIO_WRITE): ("pio", "write"),
                int(Kind.MMIO_READ): ("mmio", "read"), int(Kind.MMIO_WRITE): ("mmio", "write"),
                int(Kind.PIO_READ_RUN): ("pio", "read"), int(Kind.PIO_WRITE_RUN): ("pio", "write")}
RUN_KINDS = frozenset({int(Kind.PIO_READ_RUN), int(Kind.PIO_WRITE_RUN)})
POSITIONED_KINDS = frozenset(int(k) for k in POSITIONED)

VIEWS = {
    "exits_per_device": """
        SELECT e.trace_id, coalesce(d.device, printf('%s 0x%x', e.space, e.address)) AS device,
               count(*) AS accesses, sum(e.count) AS elements
        FROM exits e LEFT JOIN devices d ON d.space = e.space AND d.address = e.address
        GROUP BY e.trace_id, device ORDER BY accesses DESC""",
    "exits_per_register": """
        SELECT e.trace_id, coalesce(d.register, printf('%s 0x%x', e.space, e.address)) AS register,
               e.direction, count(*) AS accesses
        FROM exits e LEFT JOIN devices d ON d.space = e.space AND d.address = e.address
        GROUP BY e.trace_id, register, e.direction ORDER BY accesses DESC""",
    "exits_per_function": """
        SELECT trace_id, coalesce(symbol, '?') AS function, count(*) AS accesses
        FROM exits GROUP BY trace_id, function ORDER BY accesses DESC""",
    "accesses_per_function": """
        SELECT trace_id, function, sum(accesses) AS accesses FROM (
            SELECT trace_id, coalesce(symbol, '?') AS function, count(*) AS accesses
            FROM exits GROUP BY trace_id, function
            UNION ALL
            SELECT trace_id, coalesce(symbol, '?') AS function, sum(count) AS accesses
            FROM pure_reads GROUP BY trace_id, function)
        GROUP BY trace_id, function ORDER BY accesses DESC""",
    "interrupt_rate": """
        SELECT trace_id, source, position / 10000000 AS bucket, count(*) AS interrupts
        FROM interrupts GROUP BY trace_id, source, bucket ORDER BY trace_id, bucket""",
    "timer_intervals": """
        SELECT trace_id, seq, position,
               position - lag(position) OVER (PARTITION BY trace_id ORDER BY seq) AS since_previous
        FROM interrupts WHERE source = 'timer'""",
    "disk_sectors_by_region": """
        SELECT trace_id, drive, direction, sector / 64 * 64 AS region_start, count(*) AS sectors
        FROM disk_io GROUP BY trace_id, drive, direction, region_start ORDER BY trace_id, region_start""",
}
INDEXES = {"exits": [["trace_id", "address"], ["trace_id", "symbol"], ["trace_id", "position"]],
           "interrupts": [["trace_id", "source"], ["trace_id", "position"]],
           "disk_io": [["trace_id", "sector"]], "console": [["trace_id", "line_no"]]}


SCHEMA = {
    "meta": {"trace_id": int, "key": str, "value": str},
    "exits": {"trace_id": int, "seq": int, "position": int, "kind": str, "space": str, "address": int,
              "size": int, "direction": str, "value": int, "count": int, "rip": int, "cpl": int, "symbol": str},
    "interrupts": {"trace_id": int, "seq": int, "position": int, "vector": int, "source": str, "rip": int,
                   "cpl": int, "symbol": str, "landmark": str},
    "inputs": {"trace_id": int, "seq": int, "position": int, "source": str, "text": str},
    "clock_reads": {"trace_id": int, "seq": int, "position": int, "source": str, "value": int, "rip": int,
                    "symbol": str},
    "halts": {"trace_id": int, "seq": int, "position": int},
    "disk_io": {"trace_id": int, "seq": int, "position": int, "drive": int, "sector": int, "direction": str,
                "count": int, "content_hash": str},
    "console": {"trace_id": int, "line_no": int, "position": int, "text": str, "newline": int},
    "pure_reads": {"trace_id": int, "register": str, "rip": int, "count": int, "symbol": str},
}


class Symbols:
    """Function names by address from ELF symbol tables; kernel symbols for any privilege level,
    user programs' symbols only for CPL 3 accesses."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self._tables: list[tuple[list[int], list[tuple[int, int, str]], bool]] = []
        self._cache: dict[tuple[int, bool], str | None] = {}
        for path in paths:
            try:
                with Path(path).open("rb") as f:
                    elf = ELFFile(f)
                    symtab = elf.get_section_by_name(".symtab")
                    if symtab is None:
                        raise UsageError(f"{path} has no symbol table")
                    functions = sorted((s["st_value"], s["st_value"] + max(s["st_size"], 1), s.name)
                                       for s in symtab.iter_symbols()
                                       if s["st_info"]["type"] == "STT_FUNC" and s["st_value"])
                    user = min((seg["p_vaddr"] for seg in elf.iter_segments()
                                if seg["p_type"] == "PT_LOAD"), default=0) < 0x80000000
            except (OSError, ELFError) as error:
                raise UsageError(f"cannot read symbols from {path}: {error}") from None
            self._tables.append(([f[0] for f in functions], functions, user))

    def lookup(self, address: int | None, cpl: int | None) -> str | None:
        if address is None or not self._tables:
            return None
        key = (address, cpl == 3)
        cached = self._cache.get(key, self)
        if cached is not self:
            return cached
        name = self._lookup(address, cpl)
        self._cache[key] = name
        return name

    def _lookup(self, address: int, cpl: int | None) -> str | None:
        for starts, functions, user in self._tables:
            if user and cpl != 3:
                continue
            i = bisect.bisect_right(starts, address) - 1
            if i >= 0:
                start, end, name = functions[i]
                if start <= address < end:
                    return name
        return None


class _Tables:
    """Row buffers (tuples in SCHEMA column order) flushed in batches with executemany: the
    load is the hot path, and dict rows through insert_all cost ten times more."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db
        self.rows: dict[str, list[tuple]] = {name: [] for name in SCHEMA}
        self.counts: dict[str, int] = {}
        self.sql = {name: f"INSERT INTO [{name}] VALUES ({', '.join('?' * len(columns))})"
                    for name, columns in SCHEMA.items()}

    def add(self, table: str, row: tuple) -> None:
        rows = self.rows[table]
        rows.append(row)
        if len(rows) >= BATCH:
            self.flush(table)

    def flush(self, table: str | None = None) -> None:
        for name in [table] if table else list(self.rows):
            rows = self.rows[name]
            if rows:
                with self.db.conn:
                    self.db.conn.executemany(self.sql[name], rows)
                self.counts[name] = self.counts.get(name, 0) + len(rows)
                self.rows[name] = []


def load_trace(trace: Path, db_path: Path, symbols: Iterable[Path] = (), append: bool = False,
               progress=None) -> dict[str, int]:
    """Load `trace` into the SQLite database at `db_path`; returns rows per table."""
    names = Symbols(symbols)
    db = sqlite_utils.Database(db_path)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = OFF")
    with TraceReader(trace):                       # refuse an unreadable trace before touching the db
        pass
    if "meta" in db.table_names() and db["meta"].count and not append:
        raise UsageError(f"{db_path} already holds a trace; use --append to add another (rows are "
                         "keyed by trace_id)")
    trace_id = 1 + (db.execute("SELECT max(trace_id) FROM meta").fetchone()[0] or 0
                    if "meta" in db.table_names() else 0)
    for name, columns in SCHEMA.items():
        db[name].create(columns, if_not_exists=True)
    tables = _Tables(db)
    with TraceReader(trace) as reader:
        header = reader.header
        meta = {key: (json.dumps(value) if isinstance(value, (dict, list)) else value)
                for key, value in header.items() if key != "initial_state"}
        for key, value in meta.items():
            tables.add("meta", (trace_id, key, value))
        state = _LoadState(trace_id, names, tables)
        for record in reader:
            state.record(record)
            if progress is not None and state.seq % 100_000 == 0:
                progress(state.seq)
        state.finish()
        if reader.footer is not None:
            for key in ("end", "instructions", "position", "guest_ns", "ram_sha256", "lapic_id_reads"):
                tables.add("meta", (trace_id, f"footer.{key}", reader.footer.get(key)))
        tables.add("meta", (trace_id, "trace_path", str(trace)))
        tables.add("meta", (trace_id, "truncated", int(reader.truncated or reader.footer is None)))
    tables.flush()
    if "devices" not in db.table_names():
        db["devices"].insert_all(device_rows(), pk=("space", "address"))
    for table, indexes in INDEXES.items():
        if table in db.table_names():
            for columns in indexes:
                db[table].create_index(columns, if_not_exists=True)
    for name, sql in VIEWS.items():
        db.create_view(name, sql, replace=True)
    db.execute("PRAGMA synchronous = NORMAL")
    return {"trace_id": trace_id, **tables.counts}


class _LoadState:
    def __init__(self, trace_id: int, names: Symbols, tables: _Tables) -> None:
        self.trace_id = trace_id
        self.names = names
        self.tables = tables
        self.position = 0
        self.seq = 0
        self.sectors: dict[bytes, bytes] = {}
        self.ide = {"count": 1, "lba": [0, 0, 0], "drive": 0xE0, "command": None, "next": 0}
        self.lcr = 0
        self.line = bytearray()
        self.line_position: int | None = None
        self.line_no = 0

    def record(self, record: list) -> None:
        kind = record[0]
        if kind == Kind.SECTOR:
            self.sectors[bytes(record[1])] = bytes(record[2])
            return
        if kind == Kind.PURE_READS:
            for rip, count in record[2]:
                self.tables.add("pure_reads", (self.trace_id, record[1], rip, count, self.names.lookup(rip, None)))
            return
        if kind not in POSITIONED_KINDS:
            return
        self.position += record[1]
        t, seq, pos = self.trace_id, self.seq, self.position     # seq: the event number replay uses
        self.seq += 1
        access = ACCESS_KINDS.get(kind)
        if access is not None:
            space, direction = access
            run = kind in RUN_KINDS
            address, size = record[2], record[3]
            count = record[4] if run else 1
            rip, cpl = (record[6], record[7]) if run else (record[5], record[6])
            value = None if run else record[4]
            self.tables.add("exits", (t, seq, pos, KIND_NAMES[kind], space, address, size, direction,
                                      value, count, rip, cpl, self.names.lookup(rip, cpl)))
            if space == "pio":
                self._pio(kind, address, size, record, pos)
        elif kind == Kind.INTERRUPT:
            self.tables.add("interrupts", (t, seq, pos, record[2], record[3], record[4], record[5],
                                           self.names.lookup(record[4], record[5]),
                                           json.dumps(record[6]) if len(record) > 6 else None))
        elif kind == Kind.INPUT:
            self.tables.add("inputs", (t, seq, pos, record[2], bytes(record[3]).decode("utf-8", "replace")))
        elif kind == Kind.CLOCK:
            self.tables.add("clock_reads", (t, seq, pos, record[2], record[3], record[4],
                                            self.names.lookup(record[4], record[5])))
        elif kind == Kind.HALT:
            self.tables.add("halts", (t, seq, pos))

    # ------------------------------------------------------------ derived tables
    def _pio(self, kind: int, port: int, size: int, record: list, position: int) -> None:
        if kind == Kind.PIO_WRITE:
            value = record[4]
            if port == hw.COM1_PORT + 3:
                self.lcr = value
            elif (port == hw.COM1_PORT and not self.lcr & 0x80) or port == hw.DEBUG_CON_PORT:
                self._console(bytes((value & 0xFF,)), position)
            elif IDE + 2 <= port <= IDE + 7:
                self._ide_register(port - IDE, value)
        elif kind == Kind.PIO_READ_RUN and port == IDE:
            payload = record[5]
            data = b"".join(self.sectors.get(bytes(h), b"") for h in payload) if isinstance(payload, list) \
                else bytes(payload)
            self._ide_data("read", data, position)
        elif kind == Kind.PIO_WRITE_RUN and port == IDE:
            self._ide_data("write", bytes(record[5]), position)
        elif kind == Kind.PIO_WRITE_RUN and port == hw.COM1_PORT:
            self._console(bytes(record[5])[::size], position)

    def _ide_register(self, offset: int, value: int) -> None:
        ide = self.ide
        if offset == 2:
            ide["count"] = value or 256
        elif 3 <= offset <= 5:
            ide["lba"][offset - 3] = value
        elif offset == 6:
            ide["drive"] = value
        elif offset == 7:
            ide["command"] = value
            lba = ide["lba"]
            ide["next"] = lba[0] | lba[1] << 8 | lba[2] << 16 | (ide["drive"] & 0x0F) << 24

    def _ide_data(self, direction: str, data: bytes, position: int) -> None:
        ide = self.ide
        commands = IDE_READ_COMMANDS if direction == "read" else IDE_WRITE_COMMANDS
        if ide["command"] not in commands:
            return
        for i in range(0, len(data) - 511, 512):
            sector = data[i:i + 512]
            self.tables.add("disk_io", (self.trace_id, self.seq - 1, position, (ide["drive"] >> 4) & 1,
                                        ide["next"], direction, 1, hashlib.sha256(sector).hexdigest()[:32]))
            ide["next"] += 1

    def _console(self, data: bytes, position: int) -> None:
        for byte in data:
            if self.line_position is None:
                self.line_position = position
            if byte == 0x0A:
                self._emit_line(True)
            else:
                self.line.append(byte)

    def _emit_line(self, newline: bool) -> None:
        self.line_no += 1
        self.tables.add("console", (self.trace_id, self.line_no, self.line_position,
                                    self.line.decode("utf-8", "replace"), int(newline)))
        self.line = bytearray()
        self.line_position = None

    def finish(self) -> None:
        if self.line:
            self._emit_line(False)


def console_text(db: sqlite_utils.Database, trace_id: int = 1) -> str:
    """The console output as printed, rebuilt from the `console` table."""
    rows = db.execute("SELECT text, newline FROM console WHERE trace_id = ? ORDER BY line_no", [trace_id])
    return "".join(text + ("\n" if newline else "") for text, newline in rows)
