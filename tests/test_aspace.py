"""Every event's address space (issue 13, "several CPUs": rows of two processes running the same
program must be told apart): the recorder writes an ASPACE record (the CR3 of the CPU making the
next event) whenever that CPU's CR3 differs from the last one written for it; replay checks the
CR3 at every event; the loader puts it on every row (`cr3`). Traces name the feature `aspace`.

The demo guest's boot loader runs with CR3 0 and its kernel on its own page directory: two
address spaces in one CI-sized session. A tiny flat guest switches CR3 between accesses to one
port on both engines (kvm would otherwise merge those exits into one run).
"""

from __future__ import annotations

import io

import pytest
import sqlite_utils

from replayvm import hw
from replayvm.analyze import query
from replayvm.analyze.loader import load_trace
from replayvm.replay.replayer import Divergence, replay
from replayvm.trace import Kind, TraceReader, TraceWriter
from replayvm.trace.format import FEATURE_ASPACE, TraceFormatError
from replayvm.trace.records import ASPACE
from tests.small_guests import SHUTDOWN, multiboot_kernel, record

SAMPLES = __import__("pathlib").Path(__file__).resolve().parent.parent / "traces"
ROW_TABLES = ("exits", "interrupts", "inputs", "clock_reads", "halts", "disk_io", "console")


@pytest.fixture(params=["emu", "kvm"])
def engine(request) -> str:
    if request.param == "kvm":
        request.getfixturevalue("require_kvm")
    return request.param


def records_of(trace) -> tuple[dict, list]:
    with TraceReader(trace) as reader:
        records = list(reader)
        return reader.header, records


def test_the_demo_session_gives_every_event_its_address_space(demo_trace, tmp_path):
    header, records = records_of(demo_trace)
    assert FEATURE_ASPACE in header["features"]
    aspaces = [r[ASPACE.cr3] for r in records if r[0] == Kind.ASPACE]
    final_cr3 = records[-1][1]["final_state"]["cr3"]
    # one record per change, not per event: the boot loader's CR3 (0), then the kernel's
    assert aspaces == [0, final_cr3] and final_cr3 != 0
    first_event = next(i for i, r in enumerate(records) if r[0] in (Kind.PIO_READ, Kind.PIO_WRITE))
    assert records[first_event - 1][0] == Kind.ASPACE          # before the first event
    db_path = tmp_path / "d.db"
    load_trace(demo_trace, db_path)
    db = sqlite_utils.Database(db_path)
    for table in ROW_TABLES:
        assert db.execute(f"SELECT count(*) FROM {table} WHERE cr3 IS NULL").fetchone()[0] == 0, table
    # the kernel's rows are in its page directory's space; the loader's (it prints nothing) in 0
    spaces = dict(db.execute("SELECT cr3, count(*) FROM exits GROUP BY cr3").fetchall())
    assert set(spaces) == {0, final_cr3}
    assert db.execute("SELECT count(*) FROM exits WHERE cr3 = 0 AND position > "
                      "(SELECT min(position) FROM exits WHERE cr3 = ?)", [final_cr3]).fetchone()[0] == 0
    assert {row[0] for row in db.execute("SELECT DISTINCT cr3 FROM interrupts UNION "
                                         "SELECT DISTINCT cr3 FROM console")} == {final_cr3}


def test_rows_of_a_trace_without_address_spaces_have_a_null_cr3(tmp_path):
    db_path = tmp_path / "old.db"
    load_trace(SAMPLES / "0.6.0" / "demo-smp-race.zst", db_path)
    result = query(db_path, "SELECT count(*), count(cr3), count(DISTINCT cpu) FROM exits")
    rows, with_cr3, cpus = result.rows[0]
    assert rows > 1000 and with_cr3 == 0 and cpus == 2


def rewrite_aspace(source, target, change) -> None:
    """The trace with every ASPACE record's CR3 passed through `change`, and a valid digest: a
    recording that says the guest ran in another address space than it did."""
    header, records = records_of(source)
    writer = TraceWriter(target, header)
    for record in records[:-1]:
        if record[0] == Kind.ASPACE:
            record = ASPACE.build(change(record[ASPACE.cr3]))
        writer.append(tuple(record))
    writer.close(records[-1][1])


def test_a_replay_in_another_address_space_diverges_naming_the_event(demo_trace, tmp_path):
    header, records = records_of(demo_trace)
    kernel_cr3 = [r[ASPACE.cr3] for r in records if r[0] == Kind.ASPACE][1]
    first = next(i for i, r in enumerate(records) if r[0] == Kind.ASPACE and r[1] == kernel_cr3)
    event = sum(1 for r in records[:first] if r[0] in EVENTS)             # the event after it
    rewrite_aspace(demo_trace, tmp_path / "t.zst", lambda cr3: cr3 + 0x1000 if cr3 else cr3)
    with pytest.raises(Divergence, match=rf"at event {event}: the recording made .* in address space "
                                         rf"cr3 {kernel_cr3 + 0x1000:#x}; the replayed guest is in cr3 "
                                         rf"{kernel_cr3:#x}"):
        replay(tmp_path / "t.zst")


EVENTS = frozenset({Kind.PIO_READ, Kind.PIO_WRITE, Kind.MMIO_READ, Kind.MMIO_WRITE, Kind.PIO_READ_RUN,
                    Kind.PIO_WRITE_RUN, Kind.INTERRUPT, Kind.INPUT, Kind.CLOCK, Kind.HALT, Kind.SWITCH})

# Flat 32-bit protected mode, no paging: CR3 can still be written, and is what ASPACE records.
# Three writes to one port from two address spaces, then the same CR3 twice (no new record).
SWITCHING = f"""
    movl    $0x1000, %eax
    movl    %eax, %cr3
    movw    ${hw.DEBUG_CON_PORT:#x}, %dx
    movb    $'a', %al
    outb    %al, %dx
    movl    $0x2000, %eax
    movl    %eax, %cr3
    movb    $'b', %al
    outb    %al, %dx
    movl    $0x1000, %eax
    movl    %eax, %cr3
    movb    $'c', %al
    outb    %al, %dx
    movl    $0x1000, %eax
    movl    %eax, %cr3
    movb    $'d', %al
    outb    %al, %dx
{SHUTDOWN}
"""


def test_accesses_on_either_side_of_a_cr3_switch_are_rows_of_their_own_space(engine, tmp_path):
    """kvm merges writes to one port in consecutive exits into a run: a run that spanned the
    switch would give 'b' the CR3 of 'a'. Each switch cuts the run there."""
    trace = tmp_path / "t.zst"
    reason, console = record(trace, engine, kernel=multiboot_kernel(tmp_path, SWITCHING))
    assert reason == "shutdown" and console.endswith(b"abcd")
    assert replay(trace).verified
    db_path = tmp_path / "t.db"
    load_trace(trace, db_path)
    rows = query(db_path, "SELECT kind, value, count, cr3 FROM exits WHERE address = ? ORDER BY seq",
                 [hw.DEBUG_CON_PORT]).rows
    by_byte = []
    for kind, value, count, cr3 in rows:
        by_byte += [cr3] * count
    assert by_byte == [0x1000, 0x2000, 0x1000, 0x1000]
    header, records = records_of(trace)
    assert [r[ASPACE.cr3] for r in records if r[0] == Kind.ASPACE] == [0x1000, 0x2000, 0x1000]


def test_a_reader_without_the_feature_refuses_the_trace_in_one_line(demo_trace, monkeypatch):
    from replayvm.trace import reader as reader_module

    monkeypatch.setattr(reader_module, "KNOWN_FEATURES", frozenset({"smp", "pc", "x86-64"}))
    with pytest.raises(TraceFormatError) as refused:
        TraceReader(demo_trace)
    message = str(refused.value)
    assert "needs machine features this replayvm does not have (aspace;" in message
    assert "\n" not in message
