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
from elftools.elf.elffile import ELFFile

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
    # The virtual clock: which functions make the most exits must not depend on the host's speed.
    shown = record(tmp_path / "t.zst", "echo hello\ndisk\n".encode(), virtual_clock=True)
    counts = load_trace(tmp_path / "t.zst", tmp_path / "t.db", symbols=[guest_file("demo", "kernel.elf")])
    db = sqlite_utils.Database(tmp_path / "t.db")
    assert_rows_match_info(db, tmp_path / "t.zst")
    assert console_text(db) == shown
    top = [r["function"] for r in db.query("SELECT function FROM exits_per_function LIMIT 8")]
    assert "disk_test" in top and ("putc" in top or "puts" in top), top
    writes = list(db.query("SELECT sector, direction FROM disk_io WHERE direction = 'write'"))
    assert writes == [{"sector": 2000, "direction": "write"}] * 2          # boot test + `disk`
    regs = {r["register"] for r in db.query("SELECT register FROM exits_per_register")}
    assert {"ide0.status", "com1.lsr", "com1.data", "cmos.index"} <= regs
    assert counts["trace_id"] == 1


def test_xv6_boot_reads_the_ide_status_port_most(xv6_dir, tmp_path):
    shown = record(tmp_path / "x.zst", b"ls\necho hello\ncat README\n",
                   disks=[xv6_dir / "xv6.img", xv6_dir / "fs.img"], virtual_clock=True)   # counts: no host timing
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
    """Past the first batches, a forked process builds the rows (overlapping SQLite's inserts): the
    database must not depend on which way it was made, nor on how rows fall into batches."""
    record(tmp_path / "t.zst", b"echo hello\ndisk\n")
    kernel = guest_file("demo", "kernel.elf")
    load_trace(tmp_path / "t.zst", tmp_path / "inline.db", symbols=[kernel])
    monkeypatch.setattr(loader, "INLINE_BATCHES", 1)
    monkeypatch.setattr(loader, "BATCH", 97)
    monkeypatch.setattr(loader._Inserter, "ROWS_PER_STATEMENT", 7)
    events = []
    offsets = []
    load_trace(tmp_path / "t.zst", tmp_path / "worker.db", symbols=[kernel],
               progress=lambda loaded, bytes_read: (events.append(loaded), offsets.append(bytes_read)))
    assert dump(tmp_path / "worker.db") == dump(tmp_path / "inline.db")
    assert events and events == sorted(events)
    assert offsets == sorted(offsets) and 0 < offsets[-1] < (tmp_path / "t.zst").stat().st_size
    db = sqlite_utils.Database(tmp_path / "worker.db")
    assert events[-1] == sum(db[t].count for t in ("exits", "interrupts", "inputs", "clock_reads", "halts"))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("parallel", [False, True])
def test_a_malformed_record_is_a_one_line_error_and_leaves_no_db(tmp_path, monkeypatch, parallel):
    if parallel:
        monkeypatch.setattr(loader, "INLINE_BATCHES", 0)
    writer = TraceWriter(tmp_path / "bad.zst", {"engine": "emu", "position_unit": "instructions"})
    writer.append((Kind.PIO_READ, 7, 0x1F7, 1, 0x58, 0x80102345, 0))
    writer.append((Kind.PIO_READ, 7, 0x1F7))                      # fields missing
    writer.close({"position": 14})
    with pytest.raises(TraceFormatError, match="PIO_READ record with 2 fields .*record 1 of frame 1") as error:
        load_trace(tmp_path / "bad.zst", tmp_path / "bad.db")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "bad.db").exists()


USER_PROGRAM = r"""
    .text
    .globl main
    .type main, @function
main:                       # at address 0, as in xv6's user programs
    call fmt
    call stub
    ret
    .size main, .-main
    .globl fmt
    .type fmt, @function
fmt:
    nop
    nop
    nop
    ret
    .size fmt, .-fmt
    .globl stub             # a bare label, not a function (like xv6's system call stubs)
stub:
    movl $16, %eax
    int $64
    ret
"""


def functions(elf_path: Path) -> dict[str, tuple[int, int]]:
    with elf_path.open("rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        return {s.name: (s["st_value"], s["st_size"]) for s in symtab.iter_symbols()
                if s["st_info"]["type"] == "STT_FUNC"}


def test_user_program_symbols_apply_to_cpl3_rows_only(tmp_path):
    """--symbols given twice, a kernel and a user program linked at 0 (as xv6 links `_ls`): a CPL 3
    rip inside a user function gets its name, a CPL 0 rip at the same address does not (the kernel
    has nothing there), kernel names apply at any CPL, and a rip in no function is NULL."""
    (tmp_path / "prog.S").write_text(USER_PROGRAM)
    subprocess.run(["gcc", "-m32", "-c", "prog.S", "-o", "prog.o"], cwd=tmp_path, check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-N", "-e", "main", "-Ttext", "0", "-o", "_prog", "prog.o"],
                   cwd=tmp_path, check=True)
    user_elf, kernel_elf = tmp_path / "_prog", guest_file("demo", "kernel.elf")
    user, kernel = functions(user_elf), functions(kernel_elf)
    assert user["main"][0] == 0 and "stub" not in user
    k1, k2 = kernel["scheduler"][0] + 3, kernel["yield"][0] + 1
    main, fmt = user["main"][0] + 1, user["fmt"][0] + 2
    with user_elf.open("rb") as f:
        stub = next(s["st_value"] for s in ELFFile(f).get_section_by_name(".symtab").iter_symbols()
                    if s.name == "stub") + 5
    past_end = 0x4000
    cases = [  # (rip, cpl, expected symbol)
        (k1, 0, "scheduler"), (main, 3, "main"), (fmt, 3, "fmt"), (fmt, 0, None), (main, 0, None),
        (stub, 3, None), (past_end, 3, None), (k2, 3, "yield"), (k2, 0, "yield"),
    ]
    trace = tmp_path / "t.zst"
    writer = TraceWriter(trace, {"engine": "emu", "position_unit": "instructions"})
    for rip, cpl, _ in cases:
        writer.append((Kind.PIO_READ, 10, 0x1F7, 1, 0x50, rip, cpl))
        writer.append((Kind.INTERRUPT, 10, 32, "timer", rip, cpl))
        writer.append((Kind.CLOCK, 10, "rdtsc", 12345, rip, cpl))
    writer.append((Kind.PURE_READS, "lapic.id", [[fmt, 5], [k2, 7]]))   # no CPL: kernel names only
    writer.close({"position": 30 * len(cases)})

    expected = [(rip, cpl, name) for rip, cpl, name in cases]
    for order in ([kernel_elf, user_elf], [user_elf, kernel_elf]):
        db_path = tmp_path / f"{order[0].name}.db"
        load_trace(trace, db_path, symbols=order)
        db = sqlite_utils.Database(db_path)
        for table in ("exits", "interrupts"):
            assert [(r["rip"], r["cpl"], r["symbol"]) for r in db.query(f"SELECT * FROM {table} ORDER BY seq")] \
                == expected, table
        assert [r["symbol"] for r in db.query("SELECT symbol FROM clock_reads ORDER BY seq")] \
            == [name for _, _, name in cases]
        assert [(r["rip"], r["symbol"]) for r in db.query("SELECT rip, symbol FROM pure_reads")] \
            == [(fmt, None), (k2, "yield")]
    load_trace(trace, tmp_path / "none.db")
    assert sqlite_utils.Database(tmp_path / "none.db").execute(
        "SELECT count(*) FROM exits WHERE symbol IS NOT NULL").fetchone()[0] == 0
    # The command line takes --symbols more than once, to the same effect.
    result = cli("analyze", str(trace), "-o", str(tmp_path / "cli.db"), "--symbols", str(kernel_elf),
                 "--symbols", str(user_elf))
    assert result.returncode == 0, result.stderr
    db = sqlite_utils.Database(tmp_path / "cli.db")
    assert [(r["rip"], r["cpl"], r["symbol"]) for r in db.query("SELECT * FROM exits ORDER BY seq")] == expected


def test_xv6_user_mode_interrupts_named_from_the_user_program(xv6_dir, tmp_path):
    """`ls` run a few times under chaos (a tick brought forward every ~150 us of work), so that
    some ticks land while `ls` runs in user mode: with `--symbols kernel --symbols _ls`, those
    CPL 3 interrupts are named after `_ls`'s functions (printf, strlen, ...), and kernel rows
    only ever after the kernel's."""
    if not (xv6_dir / "_ls").is_file():
        pytest.skip(f"{xv6_dir} has no _ls (the user programs of the xv6 build)")
    record(tmp_path / "x.zst", b"ls\nls\nls\nls\nls\n", disks=[xv6_dir / "xv6.img", xv6_dir / "fs.img"],
           chaos_seed=11, virtual_clock=True)          # the same ticks on every run and host
    load_trace(tmp_path / "x.zst", tmp_path / "x.db", symbols=[xv6_dir / "kernel", xv6_dir / "_ls"])
    db = sqlite_utils.Database(tmp_path / "x.db")
    user_names, kernel_names = set(functions(xv6_dir / "_ls")), set(functions(xv6_dir / "kernel"))
    user_rows = list(db.query("SELECT rip, symbol FROM interrupts WHERE cpl = 3"))
    assert all(r["rip"] < 0x80000000 for r in user_rows)
    named = [r["symbol"] for r in user_rows if r["symbol"] is not None]
    assert named and set(named) <= user_names, user_rows
    for table in ("exits", "interrupts"):
        kernel_rows = {r["symbol"] for r in db.query(f"SELECT DISTINCT symbol FROM {table} WHERE cpl = 0")}
        assert kernel_rows - {None} <= kernel_names, table
