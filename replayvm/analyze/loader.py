"""Load a trace into SQLite (sqlite-utils) for plain-SQL questions about a session.

Tables (one trace or several, keyed by `trace_id`): `meta`, `exits` (every logged device access;
a `rep ins/outs` run is one row with its `count`), `interrupts`, `inputs`, `clock_reads`, `halts`,
`disk_io` (one row per sector, reconstructed from the IDE register sequence), `console` (the text
the guest printed, a row per line with the position where it started), `schedule` (which CPU ran
from where to where), and `devices` (port and register names). Rows of events carry the `cpu`
that ran (the trace's SWITCH records; 0 with one CPU) and its `cr3` (the ASPACE records); with
`processes` (an xv6 kernel among the symbols) a replay pass adds `processes` and
`event_processes` (replayvm.analyze.processes). Views answer common questions; indexes are built after the load. See
docs/analysis.md.

The load is the hot path (a long session has millions of events; see BENCHMARKS.md). Records
are read in validated chunks (`TraceReader.chunks`: the reader checks every record against its
layout, so none is checked again here), turned into rows by
one loop that branches on the kind, and inserted with statements of many rows each (executemany's
cost is per statement run, not per value). Past the first 100,000 records, a forked copy of this
process builds the rows while this one inserts them. A new database is written in one transaction
without a journal (deleted if the load fails, when this load created it), the indexes after the rows; it ends in WAL
mode, as before.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import multiprocessing
import os
import pickle
import sqlite3
import stat
from pathlib import Path
from typing import Iterable, Iterator

import sqlite_utils
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from replayvm import hw
from replayvm.analyze.devices import device_rows
from replayvm.analyze.processes import check_processes_trace, find_processes, xv6_layout
from replayvm.boot.firmware import MULTIBOOT_SEARCH_BYTES, find_multiboot_header
from replayvm.devices.ide import LBA_LOW, STATUS_COMMAND, IdeCommandDecoder
from replayvm.devices.uart import LCR as UART_LCR, MCR as UART_MCR, SerialOutputDecoder
from replayvm.errors import UsageError
from replayvm.trace.format import Kind, TraceFormatError
from replayvm.trace.reader import TraceReader
from replayvm.trace.records import I63, INTERRUPT, SWITCH, check_unpacking

BATCH = 50_000                  # records turned into rows and inserted together
INLINE_BATCHES = 2              # batches built here before a second process takes over
PIPE_BYTES = 1 << 20            # the pipe between the two
IDE = hw.IDE0_CMD_PORT
COM1 = hw.COM1_PORT
KIND_NAMES = {int(k): k.name.lower() for k in Kind}
# Per kind (indexed by the kind number, 0-4): the exits columns kind, space and direction.
_KIND = tuple(KIND_NAMES[k] for k in range(5))
_SPACE = (None, "pio", "pio", "mmio", "mmio")
_DIRECTION = (None, "read", "write", "read", "write")
# Ports whose writes feed the derived tables (console, IDE register state).
DEBUG_CON = hw.DEBUG_CON_PORT
_WATCHED_PORTS = frozenset({COM1, COM1 + UART_LCR, COM1 + UART_MCR, DEBUG_CON,
                            *range(IDE + LBA_LOW, IDE + STATUS_COMMAND + 1)})
# Kinds as plain ints for the hot loop (an enum member is a slower lookup).
_PIO_READ_RUN, _PIO_WRITE_RUN = int(Kind.PIO_READ_RUN), int(Kind.PIO_WRITE_RUN)
_INTERRUPT, _INPUT, _CLOCK, _HALT = int(Kind.INTERRUPT), int(Kind.INPUT), int(Kind.CLOCK), int(Kind.HALT)
_SECTOR, _PURE_READS = int(Kind.SECTOR), int(Kind.PURE_READS)
# The hot loop unpacks records whole, in their layouts' field order (replayvm.trace.records):
# checked here, at import, so a layout and this loop cannot drift apart.
check_unpacking((Kind.PIO_READ, Kind.PIO_WRITE, Kind.MMIO_READ, Kind.MMIO_WRITE),
                "dpos", "port|address", "size", "value", "rip", "cpl")
check_unpacking((Kind.PIO_READ_RUN, Kind.PIO_WRITE_RUN), "dpos", "port", "size", "count", "data", "rip", "cpl")
check_unpacking((Kind.INTERRUPT,), "dpos", "vector", "source", "rip", "cpl", optional=("landmark",))
_INTERRUPT_ARITY = INTERRUPT.arity        # the length of an interrupt without its (kvm) landmark
check_unpacking((Kind.INPUT,), "dpos", "source", "data")
check_unpacking((Kind.CLOCK,), "dpos", "source", "value", "rip", "cpl")
check_unpacking((Kind.HALT,), "dpos")
check_unpacking((Kind.SWITCH,), "dpos", "cpu", optional=("landmark",))
_SWITCH = int(Kind.SWITCH)
_SWITCH_ARITY = SWITCH.arity              # the length of a switch without its (kvm) landmark
check_unpacking((Kind.ASPACE,), "cr3")
_ASPACE = int(Kind.ASPACE)
check_unpacking((Kind.SECTOR,), "digest", "data")
check_unpacking((Kind.PURE_READS,), "register", "sites")


def _signed(value: int) -> int:
    """An unsigned 64-bit integer as SQLite can store it (two's complement above 2^63-1)."""
    return value - (1 << 64) if value > I63 else value

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
    "instructions_per_cpu": """
        SELECT trace_id, cpu, count(*) AS turns, sum(to_position - from_position) AS instructions
        FROM schedule GROUP BY trace_id, cpu ORDER BY trace_id, cpu""",
    "processes_per_cpu": """
        SELECT trace_id, cpu, pid, name, count(*) AS stretches, sum(instructions) AS instructions,
               sum(events) AS events, min(from_position) AS first_position, max(to_position) AS to_position
        FROM processes WHERE pid IS NOT NULL
        GROUP BY trace_id, cpu, pid, name ORDER BY trace_id, min(from_position), cpu""",
    "disk_sectors_by_region": """
        SELECT trace_id, drive, direction, sector / 64 * 64 AS region_start, count(*) AS sectors
        FROM disk_io GROUP BY trace_id, drive, direction, region_start ORDER BY trace_id, region_start""",
}
INDEXES = {"exits": [["trace_id", "address"], ["trace_id", "symbol"], ["trace_id", "position"]],
           "interrupts": [["trace_id", "source"], ["trace_id", "position"]],
           "disk_io": [["trace_id", "sector"]], "console": [["trace_id", "line_no"]],
           "schedule": [["trace_id", "from_position"]],
           "processes": [["trace_id", "cpu", "from_position"]], "event_processes": [["trace_id", "seq"]]}


# `cpu` (last but one, so that a database made before it gains the column: _add_cpu_columns) is
# the CPU that ran when the row's event happened: the trace's SWITCH records say (0 on a 1-CPU
# trace). `cr3` (last) is that CPU's CR3 at the event: its address space (the ASPACE records of
# traces with the feature "aspace"; NULL for older traces).
SCHEMA = {
    "meta": {"trace_id": int, "key": str, "value": str},
    "exits": {"trace_id": int, "seq": int, "position": int, "kind": str, "space": str, "address": int,
              "size": int, "direction": str, "value": int, "count": int, "rip": int, "cpl": int, "symbol": str,
              "cpu": int, "cr3": int},
    "interrupts": {"trace_id": int, "seq": int, "position": int, "vector": int, "source": str, "rip": int,
                   "cpl": int, "symbol": str, "landmark": str, "cpu": int, "cr3": int},
    "inputs": {"trace_id": int, "seq": int, "position": int, "source": str, "text": str, "cpu": int, "cr3": int},
    "clock_reads": {"trace_id": int, "seq": int, "position": int, "source": str, "value": int, "rip": int,
                    "symbol": str, "cpu": int, "cr3": int},
    "halts": {"trace_id": int, "seq": int, "position": int, "cpu": int, "cr3": int},
    "disk_io": {"trace_id": int, "seq": int, "position": int, "drive": int, "sector": int, "direction": str,
                "count": int, "content_hash": str, "cpu": int, "cr3": int},
    "console": {"trace_id": int, "line_no": int, "position": int, "text": str, "newline": int, "cpu": int,
                "cr3": int},
    "pure_reads": {"trace_id": int, "register": str, "rip": int, "count": int, "symbol": str},
    # Who ran when: one row per turn, from_position up to (not including) to_position; the rows
    # of a trace cover it from its start to its end without gaps (one row on one CPU).
    "schedule": {"trace_id": int, "cpu": int, "from_position": int, "to_position": int},
    # Which xv6 process each CPU ran (analyze --processes, replayvm.analyze.processes): one row per
    # stretch of a CPU in one address space, from_position up to to_position (not included: where
    # the CPU's next stretch begins, or the trace's end). exact 1: from_position is the CPU's first
    # instruction in the space (right after its CR3 write); 0: the first event seen in it.
    # instructions: the CPU's own in it (a stretch goes on across other CPUs' turns: the CPU still
    # holds the space); from_seq..to_seq: the trace's events at those positions, `events` of them
    # its CPU's, the last at last_position. pid and name NULL where no process owns the address
    # space (the scheduler, boot).
    "processes": {"trace_id": int, "cpu": int, "from_position": int, "to_position": int, "instructions": int,
                  "from_seq": int, "to_seq": int, "events": int, "last_position": int, "cr3": int, "pid": int,
                  "name": str, "exact": int},
    # ... and which process made each event: join any row table on (trace_id, seq) (disk_io rows
    # share the seq of the run that moved their sectors). Filled with processes, in one pass.
    "event_processes": {"trace_id": int, "seq": int, "pid": int, "name": str},
}
CPU_TABLES = ("exits", "interrupts", "inputs", "clock_reads", "halts", "disk_io", "console")

# Settings for writing a new database in bulk: no rollback journal (a failed load deletes the
# file), no fsync, one lock for the whole load, and up to 1 GiB of page cache (pages are only
# written out at the commit).
BULK_PRAGMAS = ("PRAGMA journal_mode = OFF", "PRAGMA synchronous = OFF", "PRAGMA locking_mode = EXCLUSIVE",
                "PRAGMA cache_size = -1048576")
# Loading into an existing database (--append) keeps its journal, so that a failed load cannot
# damage the traces already there; the whole load is still one transaction.
APPEND_PRAGMAS = ("PRAGMA synchronous = OFF", "PRAGMA cache_size = -1048576")


class _Names(dict):
    """address -> function name (or None) for one privilege class, filled on first use."""

    def __init__(self, symbols: "Symbols", user: bool) -> None:
        super().__init__()
        self._symbols = symbols
        self._user = user

    def __missing__(self, address):
        name = None if address is None else self._symbols._lookup(address, self._user)
        self[address] = name
        return name


class Symbols:
    """Function names by address from ELF symbol tables; kernel symbols for any privilege level,
    user programs' symbols only for CPL 3 accesses.

    `user[address]` and `other[address]` are the names for CPL 3 and for any other (or unknown)
    privilege level, cached per address: the loader resolves every row's rip through them."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self._tables: list[tuple[list[int], list[tuple[int, int, str]], bool]] = []
        # user programs by the name a process running them has (xv6: `_ls` is the program `ls`)
        self.programs: dict[str, int] = {}
        for path in paths:
            try:
                with Path(path).open("rb") as f:
                    elf = ELFFile(f)
                    symtab = elf.get_section_by_name(".symtab")
                    if symtab is None:
                        raise UsageError(f"{path} has no symbol table")
                    # Defined functions, at any address: a user program's first is at 0.
                    functions = sorted((s["st_value"], s["st_value"] + max(s["st_size"], 1), s.name)
                                       for s in symtab.iter_symbols()
                                       if s["st_info"]["type"] == "STT_FUNC"
                                       and s["st_shndx"] != "SHN_UNDEF")
                    user = min((seg["p_vaddr"] for seg in elf.iter_segments()
                                if seg["p_type"] == "PT_LOAD"), default=0) < 0x80000000
                    f.seek(0)
                    if find_multiboot_header(f.read(MULTIBOOT_SEARCH_BYTES)) is not None:
                        user = False          # a kernel a loader boots, wherever it is linked
            except (OSError, ELFError) as error:
                raise UsageError(f"cannot read symbols from {path}: {error}") from None
            if user:
                stem = Path(path).name
                for name in (stem, stem.removeprefix("_")):
                    self.programs.setdefault(name, len(self._tables))
            self._tables.append(([f[0] for f in functions], functions, user))
        self.user = _Names(self, True)
        self.other = _Names(self, False)

    def lookup(self, address: int | None, cpl: int | None) -> str | None:
        return (self.user if cpl == 3 else self.other)[address]

    def program_symbol(self, program: str | None, address: int) -> str | None:
        """The function at `address` in the user program a process named `program` runs (None:
        no such program among the symbols, or no function there)."""
        index = self.programs.get(program) if program is not None else None
        if index is None:
            return None
        starts, functions, _ = self._tables[index]
        i = bisect.bisect_right(starts, address) - 1
        if i >= 0:
            start, end, name = functions[i]
            if start <= address < end:
                return name
        return None

    def _lookup(self, address: int, user_mode: bool) -> str | None:
        for starts, functions, user in self._tables:
            if user and not user_mode:
                continue
            i = bisect.bisect_right(starts, address) - 1
            if i >= 0:
                start, end, name = functions[i]
                if start <= address < end:
                    return name
        return None


def load_trace(trace: Path, db_path: Path, symbols: Iterable[Path] = (), append: bool = False,
               progress=None, processes: bool = False) -> dict[str, int]:
    """Load `trace` into the SQLite database at `db_path`; returns rows per table.

    `processes`: also fill the `processes` table, by replaying the trace (see
    replayvm.analyze.processes); xv6's kernel must be among `symbols`. CPL 3 rows then take their
    `symbol` from the user program the process runs (`_ls` for a process named `ls`), not from
    whichever program has a function at that address.

    `progress(events, bytes_read)` is called after each batch: events loaded so far, and how far
    into the trace file (in bytes) the loading has read (for a bar's percentage).

    A database this call creates is deleted if the load fails; a path that existed before (an
    empty file someone made, or anything else) is never deleted: only a file created here, with
    O_EXCL, is ours to remove.
    """
    symbols = list(symbols)
    names = Symbols(symbols)
    db_path = Path(db_path)
    layout = None
    if processes:
        layout = xv6_layout(symbols)
        if layout is None:
            raise UsageError("--processes needs xv6's kernel among --symbols (an ELF with the symbols "
                             "cpus and ptable)")
    with TraceReader(trace) as reader:             # refuse an unreadable trace before touching the db
        if layout is not None:
            check_processes_trace(reader.header, trace)
        created, new = _claim_database(db_path)
        try:
            db = sqlite_utils.Database(db_path)
        except (sqlite3.Error, OSError) as error:
            _forget_database(db_path, created, new)
            raise UsageError(f"cannot open database {db_path}: {error}") from None
        try:
            if not new and "meta" in db.table_names() and db["meta"].count and not append:
                raise UsageError(f"{db_path} already holds a trace; use --append to add another (rows "
                                 "are keyed by trace_id)")
            for pragma in (BULK_PRAGMAS if new else APPEND_PRAGMAS):
                db.execute(pragma)
            trace_id = 1 + (db.execute("SELECT max(trace_id) FROM meta").fetchone()[0] or 0
                            if "meta" in db.table_names() else 0)
            for name, columns in SCHEMA.items():
                db[name].create(columns, if_not_exists=True)
            _add_cpu_columns(db)
            counts = _load(reader, db, trace, trace_id, names, progress)
            if layout is not None:
                counts.update(_load_processes(db, trace, trace_id, layout, names))
            if "devices" not in db.table_names():
                db["devices"].insert_all(device_rows(), pk=("space", "address"))
            for table, indexes in INDEXES.items():
                for columns in indexes:
                    db[table].create_index(columns, if_not_exists=True)
            for name, sql in VIEWS.items():
                db.create_view(name, sql, replace=True)
            db.execute("PRAGMA locking_mode = NORMAL")
            db.execute("PRAGMA journal_mode = WAL")     # what readers get
        except BaseException as error:
            db.close()
            _forget_database(db_path, created, new)
            if isinstance(error, sqlite3.Error):     # read-only file, disk full, not a database
                raise UsageError(f"cannot load into {db_path}: {error}") from None
            raise
        db.close()
    return {"trace_id": trace_id, **counts}


def _load_processes(db: sqlite_utils.Database, trace: Path, trace_id: int, layout,
                    names: "Symbols") -> dict[str, int]:
    """The `processes` rows (a replay of the trace), and CPL 3 symbols by the process's program."""
    found = find_processes(trace, layout)
    stretches = found.stretches
    owners = [(s.pid, s.name) for s in stretches]
    events = [(trace_id, seq, *owners[index]) for seq, index in enumerate(found.event_stretch) if index >= 0]
    with db.conn:
        db.conn.executemany(
            f"INSERT INTO processes VALUES ({', '.join('?' * 13)})",
            [(trace_id, s.cpu, s.from_position, s.to_position, s.instructions, s.from_seq, s.to_seq, s.events,
              s.last_position, _signed(s.cr3), s.pid, s.name, int(s.exact))
             for s in stretches])
        db.conn.executemany("INSERT INTO event_processes VALUES (?, ?, ?, ?)", events)
        db.conn.executemany("INSERT INTO meta VALUES (?, ?, ?)",
                            [(trace_id, "processes.layout", layout.source),
                             (trace_id, "processes.method", found.method),
                             (trace_id, "processes.replay", found.replay)])
        if names.programs:
            for table in ("exits", "interrupts"):
                rows = db.conn.execute(
                    f"SELECT t.rowid, t.rip, p.name FROM [{table}] t JOIN event_processes p "
                    f"ON p.trace_id = t.trace_id AND p.seq = t.seq WHERE t.trace_id = ? AND t.cpl = 3",
                    [trace_id]).fetchall()
                db.conn.executemany(f"UPDATE [{table}] SET symbol = ? WHERE rowid = ?",
                                    [(names.program_symbol(name, rip & U64_MASK), rowid) for rowid, rip, name in rows])
    return {"processes": len(stretches), "event_processes": len(events)}


U64_MASK = (1 << 64) - 1


def _add_cpu_columns(db: sqlite_utils.Database) -> None:
    """--append onto a database made before rows had their CPU or address space: add the columns
    (NULL for the traces already there), so that rows go in in SCHEMA's order."""
    for name in CPU_TABLES:
        for column in ("cpu", "cr3"):
            if column not in db[name].columns_dict:
                db[name].add_column(column, int)


def _claim_database(db_path: Path) -> tuple[bool, bool]:
    """(created here, empty): create the database file exclusively when it does not exist, so
    that a failed load knows which file it may delete. Anything but a regular file is refused."""
    if db_path.is_dir():
        raise UsageError(f"database path {db_path} is a folder")
    if not db_path.parent.is_dir():
        raise UsageError(f"cannot create database {db_path}: folder {db_path.parent} does not exist")
    try:
        os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        return True, True
    except FileExistsError:
        pass
    except OSError as error:                      # read-only file system, no permission
        raise UsageError(f"cannot create database {db_path}: {error.strerror or error}") from None
    info = db_path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"database path {db_path} is not a regular file")
    return False, info.st_size == 0


def _forget_database(db_path: Path, created: bool, was_empty: bool) -> None:
    """Undo a failed load into a new database: delete the file if this run created it, or empty
    again the regular file that was empty before; a database that held data is left to its
    journal (the load was one transaction)."""
    if created:
        for path in (db_path, db_path.with_name(db_path.name + "-journal")):
            path.unlink(missing_ok=True)
    elif was_empty and db_path.is_file() and not db_path.is_symlink():
        with open(db_path, "r+b") as f:
            f.truncate(0)


def _load(reader: TraceReader, db: sqlite_utils.Database, trace: Path, trace_id: int, names: Symbols,
          progress) -> dict[str, int]:
    """Rows from the records into the tables, in one transaction."""
    inserter = _Inserter(db.conn, trace_id)
    with db.conn:
        for rows, events, bytes_read in _row_batches(reader, trace, trace_id, names):
            for name, values in rows.items():
                if values:
                    inserter.insert(name, values)
            if progress is not None:
                progress(events, bytes_read)
        inserter.finish()
    return {name: inserter.counts[name] for name in SCHEMA if inserter.counts.get(name)}


def _row_batches(reader: TraceReader, trace: Path, trace_id: int,
                 names: Symbols) -> Iterator[tuple[dict[str, list], int, int]]:
    """(rows per table, events so far, trace bytes read) for every BATCH records. Past the first INLINE_BATCHES,
    the rest of the rows are built by a forked copy of this process (which carries on with the
    same reader and state), so that building rows overlaps inserting them."""
    state = _LoadState(trace_id, names, int((reader.header.get("start_cpus") or {}).get("current", 0)))
    batches = _batches(reader, state, trace)
    for _ in range(INLINE_BATCHES):
        rows = next(batches, None)
        if rows is None:
            return
        yield rows, state.seq, state.bytes_read
    if "fork" in multiprocessing.get_all_start_methods():
        yield from _from_worker(batches, state, trace)
    else:
        for rows in batches:
            yield rows, state.seq, state.bytes_read


def _from_worker(batches: Iterator[dict[str, list]], state: "_LoadState",
                 trace: Path) -> Iterator[tuple[dict[str, list], int, int]]:
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    try:                                           # room for a batch or so in flight
        fcntl.fcntl(sender.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (AttributeError, OSError):
        pass
    process = context.Process(target=_worker, args=(sender, batches, state, trace), name="trace-rows",
                              daemon=True)
    process.start()                                # from here on only the child reads the trace
    sender.close()
    try:
        while True:
            try:
                message = pickle.loads(receiver.recv_bytes())
            except EOFError:
                process.join()
                raise RuntimeError(f"the process reading {trace} ended unexpectedly "
                                   f"(exit status {process.exitcode})") from None
            if message[0] == "rows":
                yield message[1], message[2], message[3]
            elif message[0] == "error":
                raise message[1]
            else:
                process.join(5)                    # it ends right after "done"
                return
    finally:
        receiver.close()
        if process.is_alive():                     # we are failing or were abandoned
            process.terminate()
        process.join()


def _worker(sender, batches: Iterator[dict[str, list]], state: "_LoadState", trace: Path) -> None:
    """The forked process: carry on with the batches, send them pickled, then "done"."""
    try:
        for rows in batches:
            sender.send_bytes(pickle.dumps(("rows", rows, state.seq, state.bytes_read),
                                           pickle.HIGHEST_PROTOCOL))
        sender.send_bytes(pickle.dumps(("done",)))
    except BaseException as error:                 # re-raised by the loading process
        try:
            message = pickle.dumps(("error", error))
        except Exception:
            message = pickle.dumps(("error", TraceFormatError(f"{trace}: {error}")))
        try:
            sender.send_bytes(message)
        except OSError:
            pass                                   # the loading process has gone
    finally:
        sender.close()


class _Inserter:
    """Inserts rows given flat (the values of row after row, without the trace_id, which is a
    literal in the SQL) with statements of many rows each: executemany's cost is mostly per
    statement run, so a statement of a thousand rows inserts twice as fast as one of one row."""

    ROWS_PER_STATEMENT = 1000

    def __init__(self, conn: sqlite3.Connection, trace_id: int) -> None:
        self.conn = conn
        limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self.tables: dict[str, tuple[int, int, str, str]] = {}
        for name, columns in SCHEMA.items():
            width = len(columns) - 1
            row = f"({int(trace_id)}, {', '.join('?' * width)})"
            per = max(1, min(self.ROWS_PER_STATEMENT, limit // width))
            self.tables[name] = (width, per, f"INSERT INTO [{name}] VALUES {row}",
                                 f"INSERT INTO [{name}] VALUES {', '.join([row] * per)}")
        self.pending: dict[str, list] = {name: [] for name in SCHEMA}
        self.counts: dict[str, int] = {name: 0 for name in SCHEMA}

    def insert(self, name: str, values: list) -> None:
        """Insert whole statements' worth of `values`; the rest waits for more, or for finish()."""
        width, per, _, many = self.tables[name]
        pending = self.pending[name]
        if pending:
            values = pending + values
        step = width * per
        whole = len(values) // step * step
        if whole:
            self.conn.executemany(many, [values[i:i + step] for i in range(0, whole, step)])
            self.counts[name] += whole // width
        self.pending[name] = values[whole:]

    def finish(self) -> None:
        for name, values in self.pending.items():
            if values:
                width, _, one, _ = self.tables[name]
                self.conn.executemany(one, [values[i:i + width] for i in range(0, len(values), width)])
                self.counts[name] += len(values) // width
                self.pending[name] = []


def _batches(reader: TraceReader, state: "_LoadState", trace: Path) -> Iterator[dict[str, list]]:
    """Rows per table (flat: see _Inserter) for every BATCH records; the header's meta rows come
    with the first batch, the footer's with the last."""
    meta = state.rows["meta"]
    for key, value in reader.header.items():
        if key != "initial_state":
            meta += (key, json.dumps(value) if isinstance(value, (dict, list)) else value)
    for _, offset, batch in reader.chunks(BATCH, use_list=False):     # validated by the reader
        state.run(batch, offset)
        yield state.take()
    footer_position = reader.footer.get("position") if reader.footer is not None else None
    # rows count positions from the trace's start (a branch: from where it went live)
    start = int(reader.header.get("start_position") or 0)
    state.finish(int(footer_position) - start if footer_position is not None else None)
    meta = state.rows["meta"]
    if reader.footer is not None:
        for key in ("end", "instructions", "position", "guest_ns", "ram_sha256", "lapic_id_reads"):
            meta += (f"footer.{key}", reader.footer.get(key))
    meta += ("trace_path", str(trace))
    meta += ("truncated", int(reader.truncated or reader.footer is None))
    yield state.take()


class _LoadState:
    """Turns records into rows (flat, in SCHEMA column order less the trace_id), keeping what
    spans records: the position, the event number, the sector table, the IDE registers, the
    console line."""

    def __init__(self, trace_id: int, names: Symbols, first_cpu: int = 0) -> None:
        self.trace_id = trace_id
        self.names = names
        self.rows: dict[str, list] = {name: [] for name in SCHEMA}
        self.position = 0
        self.cpu = first_cpu                       # who runs (the trace's SWITCH records)
        self.cr3: int | None = None                # its CR3 (the trace's ASPACE records)
        self.cr3_by_cpu: dict[int, int] = {}
        self.turn_start = 0                        # where its turn began
        self.line_cpu = first_cpu
        self.line_cr3: int | None = None
        self.seq = 0
        self.bytes_read = 0               # where in the trace file the records being loaded start
        self.sectors: dict[bytes, bytes] = {}
        self.ide = IdeCommandDecoder()             # which sectors move, as the IDE channel decides
        self.serial = SerialOutputDecoder()        # what COM1 sent, as its UART decides
        self.line = bytearray()
        self.line_position: int | None = None
        self.line_no = 0

    def take(self) -> dict[str, list]:
        rows, self.rows = self.rows, {name: [] for name in SCHEMA}
        return rows

    def run(self, records: list, offset: int) -> None:
        """Rows for `records` (validated by the reader: see replayvm.trace.records for the
        layouts unpacked here), read from the frame at byte `offset` of the trace: the loop every
        record goes through. SQLite integers are signed 64-bit: RIPs, addresses and values of
        2^63 or more (64-bit guests) are stored as their two's complement."""
        self.bytes_read = offset
        pos = self.position
        seq = self.seq
        rows = self.rows
        exits = rows["exits"].extend
        interrupts = rows["interrupts"].extend
        user, other = self.names.user, self.names.other
        kinds, spaces, directions, watched = _KIND, _SPACE, _DIRECTION, _WATCHED_PORTS
        line_append = self.line.append
        cpu = self.cpu
        cr3 = self.cr3
        try:
            for record in records:
                kind = record[0]
                if 0 < kind < 5:                   # PIO_READ, PIO_WRITE, MMIO_READ, MMIO_WRITE
                    _, dpos, address, size, value, rip, cpl = record
                    pos += dpos
                    symbol = (user if cpl == 3 else other)[rip]
                    if rip > I63 or value > I63 or address > I63:
                        rip, value, address = _signed(rip), _signed(value), _signed(address)
                    exits((seq, pos, kinds[kind], spaces[kind], address, size, directions[kind], value, 1,
                           rip, cpl, symbol, cpu, cr3))
                    seq += 1
                    if kind == 2 and address in watched:
                        if address == DEBUG_CON or COM1 <= address < COM1 + hw.COM1_PORTS:
                            byte = value & 0xFF if address == DEBUG_CON else \
                                self.serial.write(address - COM1, value)
                            if byte is not None:
                                if self.line_position is None:
                                    self.line_position = pos
                                    self.line_cpu = cpu
                                    self.line_cr3 = cr3
                                if byte == 0x0A:
                                    self._emit_line(True)
                                else:
                                    line_append(byte)
                        else:
                            self.ide.write(address - IDE, value)
                elif kind == _INTERRUPT:
                    if len(record) == _INTERRUPT_ARITY:
                        _, dpos, vector, source, rip, cpl = record
                        landmark = None
                    else:
                        _, dpos, vector, source, rip, cpl, landmark = record
                        landmark = json.dumps(landmark)
                    pos += dpos
                    interrupts((seq, pos, vector, source, _signed(rip), cpl, (user if cpl == 3 else other)[rip],
                                landmark, cpu, cr3))
                    seq += 1
                elif kind == _PIO_READ_RUN or kind == _PIO_WRITE_RUN:
                    _, dpos, port, size, count, payload, rip, cpl = record
                    pos += dpos
                    exits((seq, pos, KIND_NAMES[kind], "pio", port, size,
                           "read" if kind == _PIO_READ_RUN else "write", None, count, _signed(rip), cpl,
                           (user if cpl == 3 else other)[rip], cpu, cr3))
                    if port == IDE:
                        if self.ide.transfers(reading=kind == _PIO_READ_RUN):
                            self._ide_data(kind, payload, pos, seq)
                    elif port == DEBUG_CON and kind == _PIO_WRITE_RUN:
                        self._console(bytes(payload)[::size], pos)
                    elif port == COM1 and kind == _PIO_WRITE_RUN:
                        data = bytes(payload)
                        write = self.serial.write
                        sent = (write(0, data[i]) for i in range(0, len(data), size))
                        self._console(bytes(b for b in sent if b is not None), pos)
                    seq += 1
                elif kind == _INPUT:
                    _, dpos, source, data = record
                    pos += dpos
                    rows["inputs"] += (seq, pos, source, bytes(data).decode("utf-8", "replace"), cpu, cr3)
                    seq += 1
                elif kind == _CLOCK:
                    _, dpos, source, value, rip, cpl = record
                    pos += dpos
                    rows["clock_reads"] += (seq, pos, source, value, _signed(rip),
                                            (user if cpl == 3 else other)[rip], cpu, cr3)
                    seq += 1
                elif kind == _HALT:
                    _, dpos = record
                    pos += dpos
                    rows["halts"] += (seq, pos, cpu, cr3)
                    seq += 1
                elif kind == _SWITCH:          # several CPUs: the turn so far, then who runs now
                    if len(record) == _SWITCH_ARITY:
                        _, dpos, new_cpu = record
                    else:                               # a kvm switch between exits: its landmark
                        _, dpos, new_cpu, _ = record
                    pos += dpos
                    self.cpu = cpu
                    self._turn(pos)
                    cpu = self.cpu = new_cpu
                    cr3 = self.cr3 = self.cr3_by_cpu.get(cpu)
                    seq += 1
                elif kind == _ASPACE:          # the running CPU's CR3 from its next event on
                    _, cr3 = record
                    cr3 = self.cr3 = self.cr3_by_cpu[cpu] = _signed(cr3)
                elif kind == _SECTOR:
                    _, digest, data = record
                    self.sectors[bytes(digest)] = bytes(data)
                elif kind == _PURE_READS:
                    _, register, sites = record
                    pure_reads = rows["pure_reads"]
                    for rip, count in sites:
                        pure_reads += (register, _signed(rip), count, other[rip])
                # else: RAM pages and the footer, which make no rows
        finally:
            self.position, self.seq, self.cpu, self.cr3 = pos, seq, cpu, cr3

    def _turn(self, end: int) -> None:
        """A schedule row for the turn of self.cpu that ends at `end` (none if it is empty)."""
        if end > self.turn_start:
            self.rows["schedule"] += (self.cpu, self.turn_start, end)
        self.turn_start = end

    # ------------------------------------------------------------ derived tables
    def _ide_data(self, kind: int, payload, position: int, seq: int) -> None:
        """disk_io rows for a string run on the IDE data port while a read or write command is on."""
        if kind == _PIO_READ_RUN:
            direction = "read"
            data = b"".join(self.sectors.get(bytes(h), b"") for h in payload) \
                if isinstance(payload, (list, tuple)) else bytes(payload)
        else:
            direction, data = "write", bytes(payload)
        ide = self.ide
        disk_io = self.rows["disk_io"]
        for i in range(0, len(data) - 511, 512):
            sector = data[i:i + 512]
            disk_io += (seq, position, ide.drive, ide.take_sector(), direction, 1,
                        hashlib.sha256(sector).hexdigest()[:32], self.cpu, self.cr3)

    def _console(self, data: bytes, position: int) -> None:
        for byte in data:
            if self.line_position is None:
                self.line_position = position
                self.line_cpu = self.cpu
                self.line_cr3 = self.cr3
            if byte == 0x0A:
                self._emit_line(True)
            else:
                self.line.append(byte)

    def _emit_line(self, newline: bool) -> None:
        self.line_no += 1
        self.rows["console"] += (self.line_no, self.line_position, self.line.decode("utf-8", "replace"),
                                 int(newline), self.line_cpu, self.line_cr3)
        del self.line[:]                           # the same buffer: run() holds its append
        self.line_position = None

    def finish(self, end: int | None) -> None:
        """The last line, and the last turn: to the footer's position (a trace cut short: its last
        event's)."""
        if self.line:
            self._emit_line(False)
        self._turn(max(self.position, end or 0))


def console_text(db: sqlite_utils.Database, trace_id: int = 1) -> str:
    """The console output as printed, rebuilt from the `console` table."""
    rows = db.execute("SELECT text, newline FROM console WHERE trace_id = ? ORDER BY line_no", [trace_id])
    return "".join(text + ("\n" if newline else "") for text, newline in rows)
