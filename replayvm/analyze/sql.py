"""Questions in SQL on an analysed database (or straight on a trace): the API behind `replayvm sql`.

A database is opened read-only, and a query may only read. `mode=ro` alone is not enough:
`ATTACH 'x.db'` and `VACUUM INTO 'x.db'` write new files from a read-only connection, so an
authorizer allows only reading statements (VACUUM INTO attaches its target, which the authorizer
sees as an ATTACH) and the connection may attach no database at all.

Reading leaves nothing behind either: a reader of a WAL-mode database normally creates `-wal`
and `-shm` files next to it. When the database has no `-wal` file (the last writer finished and
checkpointed, as `analyze` does), nobody is writing it and it is opened `immutable`, which needs
neither; while a writer is at work its `-wal` exists, and the query reads through it as usual.
"""

from __future__ import annotations

import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union
from urllib.parse import quote

from replayvm.errors import UsageError

# What a query may do: read tables, select, call functions, recurse; and these pragmas, which
# only report the schema. Everything else (writes, ATTACH, VACUUM INTO, other pragmas) is refused.
ALLOWED_ACTIONS = frozenset({sqlite3.SQLITE_READ, sqlite3.SQLITE_SELECT, sqlite3.SQLITE_FUNCTION,
                             sqlite3.SQLITE_RECURSIVE})
SCHEMA_PRAGMAS = frozenset({"table_info", "table_xinfo", "table_list", "index_list", "index_info",
                            "index_xinfo", "foreign_key_list"})       # their argument names a table
SIZE_PRAGMAS = frozenset({"page_count", "page_size"})                  # read only without a value
SQLITE_HEADER = b"SQLite format 3\0"
WAL_FORMAT = 2                      # header bytes 18 and 19 of a database in WAL mode


Parameters = Union[Sequence[Any], Mapping[str, Any]]


@dataclass
class QueryResult:
    """A query's answer: the column names, in order, and the rows as tuples in that order."""

    columns: list[str]
    rows: list[tuple]

    def dicts(self) -> list[dict[str, Any]]:
        """The rows as {column: value} (what `replayvm sql --json` prints)."""
        return [dict(zip(self.columns, row)) for row in self.rows]


def query(source: Path | str, sql: str, params: Parameters = (), *,
          symbols: Iterable[Path] = ()) -> QueryResult:
    """Run one read-only statement on a database made by `analyze`, or on a trace (loaded into a
    temporary database first, with `symbols` as `analyze --symbols` takes them). `params` fill
    the statement's `?` (a sequence) or `:name` (a mapping) placeholders, as sqlite3 does.
    Bad SQL, SQL that would write, or parameters that do not fit are a UsageError."""
    from replayvm.trace.format import MAGIC

    source = Path(source)
    if source.is_dir():
        raise UsageError(f"{source} is a folder, not a database or trace")
    if not source.exists():
        raise UsageError(f"no such database or trace: {source}")
    if not source.is_file():                 # a fifo or a device would block or mean nothing
        raise UsageError(f"{source} is not a regular file, not a database or trace")
    try:
        with source.open("rb") as f:
            start = f.read(max(len(MAGIC), 20))
    except OSError as error:
        raise UsageError(f"cannot read {source}: {error.strerror or error}") from None
    if start.startswith(MAGIC):
        from replayvm.analyze.loader import load_trace

        with tempfile.TemporaryDirectory(prefix="replayvm-sql-") as folder:
            db_path = Path(folder) / "trace.db"
            load_trace(source, db_path, symbols=symbols)
            return _run(db_path, sql, params, _wal_mode(db_path))
    return _run(source, sql, params, _wal_mode(source))


def _wal_mode(db_path: Path) -> bool:
    with db_path.open("rb") as f:
        header = f.read(20)
    return header.startswith(SQLITE_HEADER) and header[18] == header[19] == WAL_FORMAT


def _run(db_path: Path, sql: str, params: Parameters, wal: bool) -> QueryResult:
    immutable = wal and not db_path.with_name(db_path.name + "-wal").exists()
    uri = f"file:{quote(str(db_path.resolve()))}?mode=ro" + ("&immutable=1" if immutable else "")
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as error:
        raise UsageError(f"cannot open database {db_path}: {error}") from None
    try:
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        conn.set_authorizer(_read_only)
        try:
            cursor = conn.execute(sql, params)
            columns = [d[0] for d in cursor.description or []]
            rows = cursor.fetchall()
        except sqlite3.DatabaseError as error:
            text = str(error)
            if "not authorized" in text or "authorization denied" in text:
                text += " (the database is opened readonly: no writes, ATTACH or VACUUM INTO)"
            raise UsageError(f"SQL error: {text}") from None
        except (sqlite3.Warning, sqlite3.ProgrammingError) as error:   # e.g. two statements
            raise UsageError(f"SQL error: {error}") from None
        return QueryResult(columns, rows)
    finally:
        conn.close()


def _read_only(action: int, first: str | None, second: str | None, database: str | None,
               trigger: str | None) -> int:
    """The authorizer: reading statements only (see the module docstring)."""
    if action in ALLOWED_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA:
        name = (first or "").lower()
        if name in SCHEMA_PRAGMAS or name in SIZE_PRAGMAS and second is None:
            return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY
