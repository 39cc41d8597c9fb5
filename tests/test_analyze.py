"""Traces in SQLite: row counts match the trace, the console comes back exactly, symbols resolve."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlite_utils

from replayvm.analyze import loader
from replayvm.analyze.loader import console_text, load_trace
from replayvm.guests import guest_file
from replayvm.record.session import SessionOptions, run_session
from replayvm.trace import Kind, TraceFormatError, TraceWriter
from replayvm.trace.summary import summarize


def record(trace: Path, script: bytes, **kwargs) -> str:
    out = io.BytesIO()
    outcome, _ = run_session(SessionOptions(engine="emu", script=script, trace=trace, timeout_s=120, **kwargs),
                             output=out)
    assert outcome.reason == "script-done"
    return out.getvalue().decode()


def assert_rows_match_info(db: sqlite_utils.Database, trace: Path) -> None:
    kinds = summarize(trace)["events_by_kind"]
    exits = sum(kinds.get(k, 0) for k in ("pio_read", "pio_write", "mmio_read", "mmio_write",
                                           "pio_read_run", "pio_write_run"))
    assert db["exits"].count == exits
    assert db["interrupts"].count == kinds.get("interrupt", 0)
    assert db["clock_reads"].count == kinds.get("clock", 0)
    assert db["inputs"].count == kinds.get("input", 0)
    assert db["halts"].count == kinds.get("halt", 0)


def test_demo_trace_in_sqlite(tmp_path):
    shown = record(tmp_path / "t.zst", "echo hello\ndisk\n".encode())
    counts = load_trace(tmp_path / "t.zst", tmp_path / "t.db", symbols=[guest_file("demo", "kernel.elf")])
    db = sqlite_utils.Database(tmp_path / "t.db")
    assert_rows_match_info(db, tmp_path / "t.zst")
    assert console_text(db) == shown
    top = [r["function"] for r in db.query("SELECT function FROM exits_per_function LIMIT 8")]
    assert "disk_test" in top and "putc" in top or "puts" in top
    writes = list(db.query("SELECT sector, direction FROM disk_io WHERE direction = 'write'"))
    assert writes == [{"sector": 2000, "direction": "write"}] * 2          # boot test + `disk`
    regs = {r["register"] for r in db.query("SELECT register FROM exits_per_register")}
    assert {"ide0.status", "com1.lsr", "com1.data", "cmos.index"} <= regs
    assert counts["trace_id"] == 1


def test_xv6_boot_reads_the_ide_status_port_most(xv6_dir, tmp_path):
    shown = record(tmp_path / "x.zst", b"ls\necho hello\ncat README\n",
                   disks=[xv6_dir / "xv6.img", xv6_dir / "fs.img"])
    load_trace(tmp_path / "x.zst", tmp_path / "x.db", symbols=[xv6_dir / "kernel"])
    db = sqlite_utils.Database(tmp_path / "x.db")
    assert_rows_match_info(db, tmp_path / "x.zst")
    assert console_text(db) == shown
    boot_end = db.execute("SELECT min(position) FROM inputs").fetchone()[0]
    top = db.execute("""SELECT d.register FROM exits e JOIN devices d ON d.space = e.space AND d.address = e.address
                        WHERE e.direction = 'read' AND e.position < ? GROUP BY d.register
                        ORDER BY count(*) DESC LIMIT 1""", [boot_end]).fetchone()[0]
    assert top == "ide0.status"
    functions = [r["function"] for r in db.query("SELECT function FROM exits_per_function LIMIT 10")]
    assert {"uartputc", "idestart"} & set(functions), functions
    # The LAPIC ID reads are not logged one by one, but counted per call site: the function
    # that reads the ID register on every lock operation tops all device accesses.
    top = [r["function"] for r in db.query("SELECT function FROM accesses_per_function LIMIT 3")]
    assert top[0] == "lapicid", top
    total = db.execute("SELECT sum(count) FROM pure_reads").fetchone()[0]
    assert total == summarize(tmp_path / "x.zst")["lapic_id_reads_not_logged"]


def test_loading_twice_needs_append_and_keys_rows_by_trace(tmp_path):
    record(tmp_path / "a.zst", b"echo a\n")
    record(tmp_path / "b.zst", b"echo b\n")
    load_trace(tmp_path / "a.zst", tmp_path / "t.db")
    from replayvm.errors import UsageError

    with pytest.raises(UsageError, match="--append"):
        load_trace(tmp_path / "b.zst", tmp_path / "t.db")
    assert load_trace(tmp_path / "b.zst", tmp_path / "t.db", append=True)["trace_id"] == 2
    db = sqlite_utils.Database(tmp_path / "t.db")
    assert "\nb\n" in console_text(db, 2) and "\na\n" in console_text(db, 1)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replayvm.cli", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_cli_analyze_and_sql(tmp_path):
    record(tmp_path / "t.zst", b"echo hi\n")
    result = cli("analyze", str(tmp_path / "t.zst"), "-o", str(tmp_path / "t.db"))
    assert result.returncode == 0 and "rows/s" in result.stdout, result.stderr
    result = cli("sql", str(tmp_path / "t.db"), "SELECT source, count(*) AS n FROM interrupts GROUP BY source",
                 "--json")
    rows = json.loads(result.stdout)
    assert {r["source"] for r in rows} >= {"timer"}
    direct = cli("sql", str(tmp_path / "t.zst"), "SELECT count(*) AS n FROM exits", "--csv")
    assert direct.returncode == 0 and direct.stdout.splitlines()[0] == "n"
    refused = cli("sql", str(tmp_path / "t.db"), "DELETE FROM exits")
    assert refused.returncode == 2 and "readonly" in refused.stderr.lower()
    (tmp_path / "bad.zst").write_bytes(b"junk" * 4)
    bad = cli("analyze", str(tmp_path / "bad.zst"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a replayvm trace" in bad.stderr


def dump(db_path: Path) -> list[str]:
    conn = sqlite3.connect(db_path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def test_rows_built_in_a_second_process_are_the_same(tmp_path, monkeypatch):
    """Large traces have their rows built by a forked process (overlapping SQLite's inserts): the
    database must not depend on which way it was made, nor on how rows fall into batches."""
    record(tmp_path / "t.zst", b"echo hello\ndisk\n")
    kernel = guest_file("demo", "kernel.elf")
    load_trace(tmp_path / "t.zst", tmp_path / "inline.db", symbols=[kernel])
    monkeypatch.setattr(loader, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(loader, "BATCH", 97)
    monkeypatch.setattr(loader._Inserter, "ROWS_PER_STATEMENT", 7)
    events = []
    load_trace(tmp_path / "t.zst", tmp_path / "worker.db", symbols=[kernel], progress=events.append)
    assert dump(tmp_path / "worker.db") == dump(tmp_path / "inline.db")
    assert events and events == sorted(events)
    db = sqlite_utils.Database(tmp_path / "worker.db")
    assert events[-1] == sum(db[t].count for t in ("exits", "interrupts", "inputs", "clock_reads", "halts"))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("parallel", [False, True])
def test_a_malformed_record_is_a_one_line_error_and_leaves_no_db(tmp_path, monkeypatch, parallel):
    if parallel:
        monkeypatch.setattr(loader, "PARALLEL_MIN_BYTES", 0)
    writer = TraceWriter(tmp_path / "bad.zst", {"engine": "emu", "position_unit": "instructions"})
    writer.append((Kind.PIO_READ, 7, 0x1F7, 1, 0x58, 0x80102345, 0))
    writer.append((Kind.PIO_READ, 7, 0x1F7))                      # fields missing
    writer.close({"position": 14})
    with pytest.raises(TraceFormatError, match="malformed record in frame 1") as error:
        load_trace(tmp_path / "bad.zst", tmp_path / "bad.db")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "bad.db").exists()
