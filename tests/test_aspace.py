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


# ---------------------------------------------------------------- xv6 (REPLAYVM_XV6_DIR)
def xv6_recorded(xv6_dir, tmp_path, script: bytes, cpus: int = 1, chaos_seed: int | None = None):
    """An xv6 session on the virtual clock (the same instructions every run)."""
    from replayvm.record.session import SessionOptions, run_session

    trace = tmp_path / f"xv6-{cpus}.zst"
    outcome, _ = run_session(SessionOptions(engine="emu", disks=[xv6_dir / "xv6.img", xv6_dir / "fs.img"],
                                            script=script, trace=trace, timeout_s=600, virtual_clock=True,
                                            cpus=cpus, chaos_seed=chaos_seed), output=io.BytesIO())
    assert outcome.reason == "script-done"
    return trace


def xv6_analysed(xv6_dir, tmp_path, script: bytes, cpus: int = 1, chaos_seed: int | None = None,
                 programs: tuple[str, ...] = ()):
    """An xv6 session on the virtual clock (the same instructions every run), analysed with
    --processes."""
    from replayvm.record.session import SessionOptions, run_session

    trace = tmp_path / f"xv6-{cpus}.zst"
    outcome, _ = run_session(SessionOptions(engine="emu", disks=[xv6_dir / "xv6.img", xv6_dir / "fs.img"],
                                            script=script, trace=trace, timeout_s=600, virtual_clock=True,
                                            cpus=cpus, chaos_seed=chaos_seed), output=io.BytesIO())
    assert outcome.reason == "script-done"
    db_path = tmp_path / f"xv6-{cpus}.db"
    counts = load_trace(trace, db_path, symbols=[xv6_dir / "kernel", *(xv6_dir / p for p in programs)],
                        processes=True)
    assert counts["processes"] > 0
    return db_path


def test_two_ls_processes_are_told_apart_by_their_address_space(xv6_dir, tmp_path):
    db = xv6_analysed(xv6_dir, tmp_path, b"ls\nls\n")
    spaces = query(db, "SELECT p.pid, e.cr3, count(*) FROM exits e JOIN event_processes p USING (trace_id, seq) "
                       "WHERE p.name = 'ls' GROUP BY p.pid, e.cr3 ORDER BY p.pid").rows
    # each ls (its console output: kernel code in its address space) in a space of its own
    assert len(spaces) == 2 and spaces[0][0] != spaces[1][0] and spaces[0][1] != spaces[1][1]
    assert all(count > 100 for _, _, count in spaces)
    # the process table: init (pid 1, first as initcode), the shell (pid 2, forked from init),
    # and each command in a child of the shell that execs it
    names = query(db, "SELECT DISTINCT pid, name FROM processes WHERE pid IS NOT NULL ORDER BY pid, "
                      "min(from_position) OVER (PARTITION BY pid, name)").rows
    assert (1, "initcode") in names and (1, "init") in names and (2, "sh") in names
    ls = sorted(pid for pid, name in names if name == "ls")
    assert len(ls) == 2 and all((pid, "sh") in names for pid in ls)        # forked from sh, then exec
    meta = dict(query(db, "SELECT key, value FROM meta WHERE key LIKE 'processes.%'").rows)
    assert meta["processes.layout"] == "DWARF of kernel"
    assert meta["processes.method"].startswith("breakpoints: after each of the 8 CR3 writes of kernel")
    assert meta["processes.replay"] == "verified"
    assert query(db, "SELECT count(*) FROM processes WHERE NOT exact").rows == [(0,)]
    # every event of a process is one of its CPU's stretch in the process's address space
    assert query(db, "SELECT count(*) FROM exits e JOIN event_processes p USING (trace_id, seq) JOIN processes s "
                     "ON s.trace_id = e.trace_id AND s.cpu = e.cpu AND e.seq >= s.from_seq AND e.seq < s.to_seq "
                     "WHERE s.cr3 != e.cr3 OR s.pid IS NOT p.pid").rows == [(0,)]


def test_the_process_view_on_two_cpus_names_each_cpus_processes(xv6_dir, tmp_path):
    """Two CPUs, under chaos (seeded: the same session every run with this build): each CPU's
    processes by pid and name, and CPL 3 symbols from the program the process runs: `_ls` names
    only rows of processes named ls; others' CPL 3 rows stay NULL rather than a guess."""
    db = xv6_analysed(xv6_dir, tmp_path, b"ls\n", cpus=2, chaos_seed=11, programs=("_ls",))
    per_cpu = query(db, "SELECT cpu, pid, name FROM processes_per_cpu").rows
    assert {cpu for cpu, _, _ in per_cpu} == {0, 1}
    names = {(pid, name) for _, pid, name in per_cpu}
    assert {(1, "init"), (2, "sh")} <= names and any(name == "ls" and pid > 2 for pid, name in names)
    wrong = query(db, "SELECT count(*) FROM interrupts i JOIN event_processes p USING (trace_id, seq) "
                      "WHERE i.cpl = 3 AND i.symbol IS NOT NULL AND p.name IS NOT 'ls'").rows
    assert wrong == [(0,)]
    # the stretches of a CPU follow one another from the trace's start to its end
    rows = query(db, "SELECT cpu, from_position, to_position FROM processes ORDER BY cpu, from_position").rows
    for (cpu, _, end), (next_cpu, start, _) in zip(rows, rows[1:]):
        assert cpu != next_cpu or end == start


# Exact stretches (breakpoints after every CR3 write): two CPUs, `ls` and `echo hi`, recorded and
# analysed once for the tests below.
@pytest.fixture(scope="module")
def xv6_two_cpus(xv6_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("xv6-two-cpus")
    trace = xv6_recorded(xv6_dir, tmp_path, b"ls\necho hi\n", cpus=2)
    db = tmp_path / "two.db"
    load_trace(trace, db, symbols=[xv6_dir / "kernel"], processes=True)
    stretches = query(db, "SELECT cpu, from_position, to_position, cr3, pid, name, exact FROM processes "
                          "ORDER BY from_position, cpu").rows
    return trace, db, stretches


def test_on_two_cpus_a_process_runs_on_one_cpu_at_a_time(xv6_two_cpus):
    """A process's stretches on different CPUs never overlap (xv6 leaves a process's page
    directory, for the kernel's, before another CPU can take it), and processes do move between
    the CPUs here (else the check would prove nothing)."""
    _, db, stretches = xv6_two_cpus
    by_pid: dict[int, list] = {}
    for cpu, start, end, _, pid, _, _ in stretches:
        if pid is not None:
            by_pid.setdefault(pid, []).append((start, end, cpu))
    moved = [pid for pid, spans in by_pid.items() if len({cpu for _, _, cpu in spans}) == 2]
    assert 1 in moved and len(moved) >= 2
    for pid, spans in by_pid.items():
        spans.sort()
        for (start, end, cpu), (next_start, _, next_cpu) in zip(spans, spans[1:]):
            assert cpu == next_cpu or end <= next_start, f"pid {pid} on CPUs {cpu} and {next_cpu} at once"
    assert all(exact for *_, exact in stretches)
    meta = dict(query(db, "SELECT key, value FROM meta WHERE key LIKE 'processes.%'").rows)
    assert meta["processes.method"].startswith("breakpoints") and meta["processes.replay"] == "verified"
    # the view counts each CPU's own instructions and events, which add up to the trace's
    totals = query(db, "SELECT sum(instructions), sum(events) FROM processes").rows[0]
    turns = query(db, "SELECT sum(to_position - from_position) FROM schedule").rows[0][0]
    events = query(db, "SELECT count(*) FROM event_processes").rows[0][0]
    assert totals == (turns, events)


def test_every_stretch_begins_right_after_its_cpus_cr3_write(xv6_two_cpus):
    """Seeking the replay to each stretch's CPU's instruction before from_position finds a
    `mov %reg, %cr3` there writing the stretch's CR3 (the first stretch of each CPU starts with
    the CPU: at the trace's start, or from reset)."""
    from capstone import CS_ARCH_X86, CS_MODE_32, Cs

    from replayvm.replay.timeline import Timeline

    trace, _, stretches = xv6_two_cpus
    firsts = {}
    for cpu, start, *_ in stretches:
        firsts.setdefault(cpu, start)
    timeline = Timeline(trace)
    md = Cs(CS_ARCH_X86, CS_MODE_32)
    registers = {"eax": "rax", "ebx": "rbx", "ecx": "rcx", "edx": "rdx", "esi": "rsi", "edi": "rdi",
                 "ebp": "rbp", "esp": "rsp"}
    checked = 0
    try:
        targets = sorted((timeline.previous_on(cpu, start), cpu, start, cr3)
                         for cpu, start, _, cr3, *_ in stretches if start != firsts[cpu])
        for before, cpu, start, cr3 in targets:
            timeline.seek(before)
            state = timeline.registers(cpu)
            eip = state.regs["rip"]
            insn = next(md.disasm(timeline.read_memory(eip, 15, cpu), eip))
            assert (insn.mnemonic, insn.op_str.split(", ")[0]) == ("mov", "cr3"), (cpu, start, insn)
            assert state.regs[registers[insn.op_str.split(", ")[1]]] == cr3 & 0xFFFFFFFF
            # ... and the CPU's next instruction after it is at from_position
            assert timeline.next_on(cpu, before + 1) == start
            checked += 1
    finally:
        timeline.close()
    assert checked > 100


def test_every_event_lies_in_its_cpus_stretch_in_its_address_space(xv6_two_cpus):
    _, db, stretches = xv6_two_cpus
    import bisect

    end = max(to for _, _, to, *_ in stretches)
    starts: dict[int, list] = {}
    for row in stretches:
        starts.setdefault(row[0], []).append(row)
    owners = dict(query(db, "SELECT seq, pid FROM event_processes").rows)
    seen = 0
    for table in ("exits", "interrupts", "clock_reads", "halts", "inputs"):
        for seq, position, cpu, cr3 in query(db, f"SELECT seq, position, cpu, cr3 FROM [{table}]").rows:
            rows = starts[cpu]
            at = bisect.bisect_right([r[1] for r in rows], position) - 1
            _, start, to, stretch_cr3, pid, _, _ = rows[at]
            assert start <= position < to or position == to == end
            assert (stretch_cr3, pid) == (cr3, owners[seq])
            seen += 1
    assert seen > 5000


def test_without_cr3_writes_found_stretches_begin_at_events(xv6_two_cpus, xv6_dir, monkeypatch):
    """The fallback (a kernel whose CR3 writes are not found): each stretch begins at the first
    event in its address space, inside the exact stretch of the same process, which began earlier
    or there."""
    import bisect
    from replayvm.analyze import processes

    trace, _, stretches = xv6_two_cpus
    monkeypatch.setattr(processes, "cr3_write_sites", lambda kernel: [])
    found = processes.find_processes(trace, processes.xv6_layout([xv6_dir / "kernel"]))
    assert found.method.startswith("events: no CR3 write found in kernel") and found.replay == "verified"
    assert found.stretches and not any(s.exact for s in found.stretches)
    exact: dict[int, list] = {}
    for row in stretches:
        exact.setdefault(row[0], []).append(row)
    for stretch in found.stretches:
        rows = exact[stretch.cpu]
        _, start, _, cr3, pid, name, _ = rows[bisect.bisect_right([r[1] for r in rows], stretch.from_position) - 1]
        assert start <= stretch.from_position
        assert (cr3 & 0xFFFFFFFF, pid, name) == (stretch.cr3, stretch.pid, stretch.name)


# ---------------------------------------------------------------- --processes without xv6
FAKE_XV6 = r"""
struct taskstate { char bytes[104]; };
struct segdesc { unsigned int lo, hi; };
struct context;
struct proc;
struct cpu {
  unsigned char apicid; struct context *scheduler; struct taskstate ts; struct segdesc gdt[6];
  volatile unsigned int started; int ncli; int intena; struct proc *proc;
};
enum procstate { UNUSED, EMBRYO, SLEEPING, RUNNABLE, RUNNING, ZOMBIE };
struct proc {
  unsigned int sz; unsigned int *pgdir; char *kstack; enum procstate state; int pid;
  struct proc *parent; void *tf; struct context *context; void *chan; int killed;
  void *ofile[16]; void *cwd; char name[16];
};
struct spinlock { unsigned int locked; char *name; struct cpu *cpu; unsigned int pcs[10]; };
struct cpu cpus[8];
struct { struct spinlock lock; struct proc proc[64]; } ptable;
"""


def fake_xv6_kernel(tmp_path, debug: bool):
    """An object file with xv6-public's `cpus` and `ptable` (and, with `debug`, their DWARF)."""
    import subprocess

    source = tmp_path / "proc.c"
    source.write_text(FAKE_XV6)
    target = tmp_path / ("kernel-g.o" if debug else "kernel.o")
    subprocess.run(["gcc", "-m32", "-fno-common", "-c", *(["-g"] if debug else []), "-o", target, source],
                   check=True)
    return target


@pytest.mark.parametrize("debug", [True, False], ids=["dwarf", "no-dwarf"])
def test_the_xv6_layout_comes_from_dwarf_or_is_xv6_publics(tmp_path, debug):
    from replayvm.analyze.processes import XV6_PUBLIC_LAYOUT, xv6_layout

    from elftools.elf.elffile import ELFFile

    kernel = fake_xv6_kernel(tmp_path, debug)
    layout = xv6_layout([kernel])
    with kernel.open("rb") as f:
        ptable = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name("ptable")[0]["st_value"]
    assert layout.source.startswith("DWARF of" if debug else "xv6-public's layout")
    assert (layout.ncpu, layout.nproc) == (8, 64)
    found = {"cpu_size": layout.cpu_size, "cpu_apicid": layout.cpu_apicid, "cpu_proc": layout.cpu_proc,
             "ptable_proc": layout.ptable_procs - ptable,
             "proc_size": layout.proc_size, "proc_pgdir": layout.proc_pgdir, "proc_state": layout.proc_state,
             "proc_pid": layout.proc_pid, "proc_name": layout.proc_name}
    assert found == XV6_PUBLIC_LAYOUT          # gcc -m32 lays xv6's structs out as the fallback says


def test_the_cr3_writes_are_found_at_their_link_and_load_addresses(tmp_path):
    """Only `mov %reg, %cr3` counts (not a read of CR3, nor a write of CR0 or CR4), at the
    address after it, and again where the segment is loaded when that differs."""
    import subprocess

    from replayvm.analyze.processes import cr3_write_sites

    source = tmp_path / "entry.S"
    source.write_text(".text\n.globl _start\n_start:\n mov %cr3, %eax\n mov %eax, %cr0\n mov %ebx, %cr4\n"
                      " nop\n mov %edx, %cr3\n ret\n mov %eax, %cr3\n")
    kernel = tmp_path / "kernel"
    subprocess.run(["gcc", "-m32", "-nostdlib", "-static", "-Wl,-Ttext=0x80100000", "-Wl,--build-id=none",
                    "-o", kernel, source], check=True)
    linked = [0x80100000 + 3 + 3 + 3 + 1 + 3, 0x80100000 + 3 + 3 + 3 + 1 + 3 + 1 + 3]
    assert cr3_write_sites(kernel) == linked
    loaded = tmp_path / "kernel-low"                    # linked high, loaded at 1 MiB, as xv6
    subprocess.run(["objcopy", "--change-section-lma", ".text-0x80000000", kernel, loaded], check=True)
    assert cr3_write_sites(loaded) == [site - 0x80000000 for site in linked] + linked


def test_processes_refuses_what_it_cannot_read_in_one_line(tmp_path):
    from replayvm.errors import UsageError

    with pytest.raises(UsageError, match="--processes needs xv6's kernel among --symbols"):
        load_trace(SAMPLES / "0.6.0" / "demo-shell.zst", tmp_path / "a.db", processes=True)
    with pytest.raises(UsageError, match="needs a trace that records address spaces"):
        load_trace(SAMPLES / "0.6.0" / "demo-shell.zst", tmp_path / "b.db", processes=True,
                   symbols=[fake_xv6_kernel(tmp_path, True)])
    assert not (tmp_path / "a.db").exists() and not (tmp_path / "b.db").exists()


def test_info_counts_the_address_spaces(demo_trace):
    from replayvm.trace.summary import format_summary, summarize

    summary = summarize(demo_trace)
    assert (summary["address_spaces"], summary["address_space_changes"]) == (2, 2)
    assert "address      2 address spaces (CR3), 2 changes seen at events" in format_summary(summary)
