"""Several CPUs (`--cpus N`, issue 13): the machine (APIC bus, IPIs, AP start-up, IOAPIC routing),
the emu engine's turns and their SWITCH records, replay of the interleaving, and the races it
shows: the demo guest's SMP mode in CI, unmodified xv6 with REPLAYVM_XV6_DIR."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from replayvm.clock import VirtualClock
from replayvm.devices.ioapic import Ioapic
from replayvm.devices.lapic import ApicBus, Lapic
from replayvm.devices.uart import Uart16550
from replayvm.record.live import replay_and_go_live
from replayvm.record.session import SessionOptions, run_session
from replayvm.replay import checkpoint_file
from replayvm.replay.replayer import Divergence, Replayer, replay
from replayvm.replay.timeline import Timeline
from replayvm.trace import Kind, TraceReader
from replayvm.trace.format import POSITIONED
from replayvm.trace.records import DPOS_INDEX, SWITCH
from replayvm.trace.summary import summarize

DEMO_SMP_RACE = re.compile(rb"race: counter=(\d+) expected=(\d+) \(2 CPUs\)")


# ---------------------------------------------------------------- the APIC bus
def apic_bus(cpus: int = 3):
    inits, startups = [], []
    lapics = [Lapic(VirtualClock(), apic_id=cpu) for cpu in range(cpus)]
    for lapic in lapics:
        lapic.write(0xF0, 4, 0x1FF)                       # software-enabled
    bus = ApicBus(lapics, inits.append, lambda cpu, vector: startups.append((cpu, vector)))
    return lapics, bus, inits, startups


def send(lapic: Lapic, destination: int, low: int) -> None:
    lapic.write(0x310, 4, destination << 24)
    lapic.write(0x300, 4, low)


def test_init_and_startup_ipis_reach_the_machine_as_xv6_sends_them():
    lapics, _, inits, startups = apic_bus()
    send(lapics[0], 2, 0x500 | 0x8000 | 0x4000)           # INIT, level, assert
    send(lapics[0], 2, 0x500 | 0x8000)                    # INIT de-assert: arbitration IDs only
    send(lapics[0], 0, 0x80000 | 0x500 | 0x8000)          # xv6's broadcast de-assert at lapicinit
    send(lapics[0], 2, 0x600 | 0x07)                      # STARTUP, page 7
    assert inits == [2]
    assert startups == [(2, 7)]


def test_a_fixed_ipi_reaches_the_other_cpus_irr_only():
    lapics, _, _, _ = apic_bus()
    send(lapics[0], 1, 48)
    assert lapics[1].has_pending() and lapics[1].acknowledge() == 48
    assert not lapics[0].has_pending() and not lapics[2].has_pending()
    send(lapics[1], 0, 0xC0000 | 50)                      # all excluding self
    assert lapics[0].acknowledge() == 50 and lapics[2].acknowledge() == 50
    assert not lapics[1].has_pending()


def test_the_ioapic_sends_a_pin_to_the_cpu_its_entry_names():
    lapics, _, _, _ = apic_bus()
    ioapic = Ioapic(lapics[0], others=lapics[1:])
    for index, value in ((0x10 + 2 * 14, 32 + 14), (0x11 + 2 * 14, 2 << 24)):   # xv6: IDE to cpu ncpu-1
        ioapic.write(0x00, 4, index)
        ioapic.write(0x10, 4, value)
    ioapic.set_irq(14, True)
    assert lapics[2].has_pending() and lapics[2].acknowledge() == 46
    assert not lapics[0].has_pending() and not lapics[1].has_pending()


def test_each_cpu_sees_its_own_lapic_at_the_one_address():
    from replayvm import hw
    from replayvm.console import Console
    from replayvm.machine import Machine, MachineConfig
    from replayvm.record.session import bundled_demo_disk

    machine = Machine(MachineConfig(disks=[bundled_demo_disk()], engine="emu", cpus=2, virtual_clock=True),
                      Console(io.BytesIO()))
    try:
        ids = []
        for cpu in (0, 1):
            machine.select_cpu(cpu)
            ids.append(machine.mmio.read(hw.LAPIC_ADDR + 0x20, 4) >> 24)
            machine.mmio.write(hw.LAPIC_ADDR + 0x80, 4, 0x10 * (cpu + 1))        # TPR
        assert ids == [0, 1]
        assert [lapic.tpr for lapic in machine.lapics] == [0x10, 0x20]
        assert machine.interrupts is machine.lapics[1]       # the running CPU's interrupts
    finally:
        machine.close()
        machine.release_ram()


# ---------------------------------------------------------------- the demo guest on two CPUs
def demo_session(trace: Path, script: bytes, cpus: int = 2, chaos_seed: int | None = None) -> bytes:
    out = io.BytesIO()
    outcome, _ = run_session(SessionOptions(engine="emu", script=script, trace=trace, timeout_s=300,
                                            virtual_clock=True, cpus=cpus, chaos_seed=chaos_seed),
                             output=out)
    assert outcome.reason == "script-done", (outcome, out.getvalue()[-1000:])
    return out.getvalue()


def records_of(trace: Path) -> tuple[tuple[int, int], dict, list]:
    with TraceReader(trace) as reader:
        return (reader.major, reader.minor), reader.header, [list(record) for record in reader]


@pytest.fixture(scope="module")
def demo_smp_trace(tmp_path_factory) -> tuple[Path, bytes]:
    trace = tmp_path_factory.mktemp("smp") / "demo2.zst"
    return trace, demo_session(trace, b"race\nrace\necho hi\n")


def test_the_demo_guest_starts_its_ap_and_races_across_two_cpus(demo_smp_trace):
    trace, console = demo_smp_trace
    assert b"cpus: 2\n" in console and b"cpu1: started\n" in console
    assert b"CPUID leaf 1 says" not in console               # CPUID's APIC ID is the running CPU's
    assert len(DEMO_SMP_RACE.findall(console)) == 2
    version, header, records = records_of(trace)
    assert version == (3, 0)
    assert header["features"] == ["aspace", "smp"] and header["cpus"] == 2
    switches = [record for record in records if record[0] == Kind.SWITCH]
    assert len(switches) >= 4                  # the AP starts, then runs once per race (else halted)
    assert {record[2] for record in switches} == {0, 1}
    footer = records[-1][1]
    assert len(footer["cpu_states"]) == 2
    assert all("regs" in state for state in footer["cpu_states"])        # both CPUs ran
    assert footer["counts"]["switch"] == len(switches)
    summary = summarize(trace)                  # each CPU's own count, from the switches
    assert summary["cpus"] == 2 and all(summary["cpu_instructions"])
    assert sum(summary["cpu_instructions"]) == footer["position"]


def test_a_two_cpu_demo_trace_replays_verified(demo_smp_trace):
    trace, console = demo_smp_trace
    result = replay(trace)
    assert result.verified, result.mismatches
    assert result.console == console


def test_a_divergence_on_the_ap_names_that_cpu(demo_smp_trace, monkeypatch):
    """The AP prints `cpu1: started`: a UART whose line status lies while CPU 1 runs makes the
    replay diverge there, and the message says which CPU was running."""
    trace, _ = demo_smp_trace
    replayer = Replayer(trace)
    original = Uart16550.read

    def broken(self, offset, size):
        value = original(self, offset, size)
        return value ^ 0x20 if offset == 5 and replayer.engine.cpu == 1 else value

    monkeypatch.setattr(Uart16550, "read", broken)
    try:
        with pytest.raises(Divergence, match=r"on CPU 1: .*com1\.lsr"):
            replayer.run()
    finally:
        replayer.close()


def test_a_one_cpu_trace_is_as_before(tmp_path):
    trace = tmp_path / "one.zst"
    console = demo_session(trace, b"echo one\n", cpus=1)
    assert b"cpu1" not in console and b"cpus:" not in console
    version, header, records = records_of(trace)
    assert version == (3, 0)                                  # every recording names "aspace"
    assert header["features"] == ["aspace"] and "cpus" not in header
    assert not any(record[0] == Kind.SWITCH for record in records)
    assert "cpu_states" not in records[-1][1]
    assert replay(trace).verified


def test_chaos_makes_the_two_cpu_race_lose_updates_far_more_often(tmp_path):
    """20 races in one session each, plain and under chaos (seeded turns), on the virtual clock:
    every verdict is a fixed function of the code and the seeds, never of host timing. A plain
    run's turns (50,000 instructions) are longer than the whole race (~6,000 per CPU), which
    starts early in a turn: the CPUs take turns without interleaving inside it."""
    runs = 20
    script = b"race\n" * runs
    counts = {}
    failing = None
    for name, seed in (("plain", None), ("chaos", 4)):
        trace = tmp_path / f"{name}.zst"
        console = demo_session(trace, script, chaos_seed=seed)
        results = [(int(a), int(b)) for a, b in DEMO_SMP_RACE.findall(console)]
        assert len(results) == runs
        counts[name] = sum(1 for counter, expected in results if counter != expected)
        if name == "chaos":
            failing = trace, console
    print(f"\ndemo SMP race, {runs} runs each: lost updates in {counts['plain']} without chaos, "
          f"{counts['chaos']} with chaos (seed 4)")
    assert counts["chaos"] >= 3 and counts["chaos"] > 2 * counts["plain"], counts
    trace, console = failing
    result = replay(trace)                     # the failing trace replays to the same wrong counters
    assert result.verified and result.console == console


def test_cpus_out_of_range_is_a_one_line_error():
    """(More CPUs than the host's KVM runs: tests/test_kvm_smp.py.)"""
    for args, fragment in ((["--cpus", "9"], "--cpus must be between 1 and 8"),):
        result = subprocess.run([sys.executable, "-m", "replayvm.cli", "record", *args], capture_output=True,
                                text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr, result.stderr


def cpu_turns(trace: Path) -> list[tuple[int, int, int]]:
    """(cpu, from, to): who ran when, from the trace's SWITCH records (the last turn ends at the
    footer's position)."""
    turns, cpu, start, position = [], 0, 0, 0
    with TraceReader(trace) as reader:
        for record in reader:
            if record[0] in POSITIONED:
                position += record[DPOS_INDEX]
            if record[0] == Kind.SWITCH:
                turns.append((cpu, start, position))
                cpu, start = record[SWITCH.cpu], position
        turns.append((cpu, start, int(reader.footer["position"])))
    return [turn for turn in turns if turn[2] > turn[1]]


def ap_turn(trace: Path) -> tuple[int, int]:
    """The AP's longest turn (it runs the demo's race there)."""
    _, start, end = max((turn for turn in cpu_turns(trace) if turn[0] == 1), key=lambda t: t[2] - t[1])
    assert end - start > 1000
    return start, end


def test_seeking_a_two_cpu_replay_restores_every_cpu(demo_smp_trace):
    """Checkpoints hold every CPU: one is taken inside the AP's turn (CPU 1 running, CPU 0 saved)
    and one inside the BSP's; going back to positions on either side of switches through them
    gives each CPU exactly the state the first pass had there, and which CPU runs."""
    trace, _ = demo_smp_trace
    start, end = ap_turn(trace)
    middle = (start + end) // 2
    timeline = Timeline(trace, checkpoint_every=middle // 2)       # a checkpoint at `middle`
    try:
        targets = [middle + 1, end - 1, end, end + 5, start - 3, start + 1]
        seen = {}
        for position in sorted(targets):
            assert timeline.seek(position).position == position
            seen[position] = (timeline.replayer.machine.running_cpu, timeline.engine.cpu_states())
        assert seen[middle + 1][0] == 1 and seen[end + 5][0] == 0 and seen[start - 3][0] == 0
        at_middle = [c for c in timeline.checkpoints.checkpoints if c.position == middle]
        assert at_middle and at_middle[0].cpu.cpus["current"] == 1
        assert at_middle[0].cpu.cpus["contexts"][0] is not None          # CPU 0 saved, not running
        timeline.seek(timeline.end)
        for position in targets:                     # back, through the checkpoints
            timeline.seek(position)
            assert (timeline.replayer.machine.running_cpu, timeline.engine.cpu_states()) == seen[position]
        assert "CPU 1 of 2 running" in (timeline.seek(middle + 1) and timeline.when())
    finally:
        timeline.close()


def test_stepping_one_cpu_forward_and_back_across_the_others_turns(demo_smp_trace):
    """A debugger's step of one CPU: from inside the BSP's turn, reverse_step(cpu=1) lands at the
    AP's last instruction before (its previous turn), with the AP's registers as a forward pass
    saw them there; step(cpu=1) from there executes that instruction; per-CPU registers of the CPU
    not running come from its saved context."""
    trace, _ = demo_smp_trace
    start, end = ap_turn(trace)
    timeline = Timeline(trace, checkpoint_every=1_000_000)
    try:
        timeline.seek(end - 1)
        before = timeline.registers(1)
        timeline.seek(end)
        after = timeline.registers(1)
        assert after.regs["rip"] != before.regs["rip"]
        timeline.seek(end + 200)                    # the BSP runs; the AP's state is as it left it
        assert timeline.cpu_at(timeline.position) == 0 and timeline.registers(1).to_dict() == after.to_dict()
        stop = timeline.reverse_step(cpu=1)
        assert (stop.position, stop.cpu) == (end - 1, 1)
        assert timeline.registers(1).to_dict() == before.to_dict()
        stop = timeline.step(cpu=1)
        assert (stop.position, stop.cpu) == (end, 1) and timeline.registers(1).to_dict() == after.to_dict()
        assert timeline.previous_on(1, start) < start and timeline.next_on(1, end) > end
    finally:
        timeline.close()


def test_kept_checkpoints_of_two_cpus_restore_in_another_replay(demo_smp_trace, tmp_path, monkeypatch):
    """The checkpoint file keeps every CPU's context (format 5): a new replay that adopts it seeks
    into the AP's turn from the kept checkpoint and finds both CPUs as a plain replay has them."""
    monkeypatch.setenv("REPLAYVM_CACHE", str(tmp_path))
    trace, _ = demo_smp_trace
    start, end = ap_turn(trace)
    middle = (start + end) // 2
    every = middle // 2
    plain = Timeline(trace, checkpoint_every=every)
    try:
        plain.seek(middle + 7)
        expected = (plain.replayer.machine.running_cpu, plain.engine.cpu_states())
    finally:
        plain.close()
    first = Timeline(trace, checkpoint_every=every, keep_checkpoints=True)
    try:
        first.seek(first.end)
        assert first.save_checkpoints()
    finally:
        first.close()
    assert checkpoint_file.MAGIC == b"RVMCKPT\x06"        # 6: with the trace reading's address spaces
    second = Timeline(trace, checkpoint_every=every, keep_checkpoints=True)
    try:
        assert second.checkpoints_loaded >= 2 and not second.checkpoint_file_note
        second.seek(middle + 7)
        assert second.checkpoints.stats.restores == 1                  # from the kept one, not a replay
        assert (second.replayer.machine.running_cpu, second.engine.cpu_states()) == expected
    finally:
        second.close()


def test_going_live_inside_the_aps_turn_records_a_branch_that_replays_verified(demo_smp_trace, tmp_path):
    """replay --seek iN --live on two CPUs: the branch's header has every CPU (start_cpus, CPU 1
    running), the live part runs the race on both CPUs again, and the branch replays verified."""
    trace, _ = demo_smp_trace
    start, end = ap_turn(trace)
    branch = tmp_path / "branch.zst"
    out = io.BytesIO()
    outcome, position = replay_and_go_live(
        trace, SessionOptions(engine="emu", script=b"race\necho after\n", trace=branch, timeout_s=300,
                              virtual_clock=True), seek=f"i{start + 100}", output=out, keep_checkpoints=False)
    assert outcome.reason == "script-done" and position == start + 100
    live = out.getvalue()
    # the race under way when it went live ends live, then the one typed live runs
    assert len(DEMO_SMP_RACE.findall(live)) == 2 and live.endswith(b"after\n$ ")
    version, header, records = records_of(branch)
    assert header["cpus"] == 2 and header["start_cpus"]["current"] == 1
    assert header["start_cpus"]["states"][0] is not None and header["start_cpus"]["states"][1] is None
    assert [r[SWITCH.cpu] for r in records if r[0] == Kind.SWITCH][:1] == [0]
    result = replay(branch)
    assert result.verified, result.mismatches


def test_cli_seek_and_live_on_two_cpus(demo_smp_trace, tmp_path):
    """The command line: --seek names the CPU running; --live from there records a branch."""
    trace, _ = demo_smp_trace
    start, _ = ap_turn(trace)
    env = {**os.environ, "REPLAYVM_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "replayvm.cli", "replay", str(trace), "--seek", f"i{start + 50}"],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, env=env)
    assert result.returncode == 0, result.stderr
    assert f"replay at instruction {start + 50} of" in result.stdout and "CPU 1 of 2 running" in result.stdout


# ---------------------------------------------------------------- unmodified xv6
def xv6_smp_session(xv6_dir: Path, trace: Path, script: bytes, cpus: int) -> str:
    out = io.BytesIO()
    options = SessionOptions(disks=[xv6_dir / "xv6.img", xv6_dir / "fs.img"], engine="emu", script=script,
                             timeout_s=300, trace=trace, cpus=cpus, virtual_clock=True)
    outcome, _ = run_session(options, output=out)
    text = out.getvalue().decode("utf-8", "replace")
    assert outcome.reason == "script-done", (outcome, text[-2000:])
    return text


def test_xv6_on_two_cpus_as_make_qemu_runs_it(xv6_dir, tmp_path):
    trace = tmp_path / "xv6-2.zst"
    text = xv6_smp_session(xv6_dir, trace, b"ls\necho hi\ncat README\n", cpus=2)
    assert "cpu1: starting 1" in text and "cpu0: starting 0" in text
    assert any(line.startswith("README") and line.split()[1] == "2" for line in text.splitlines())
    assert "\nhi\n" in text
    assert "xv6 is a re-implementation of Dennis Ritchie's" in text
    _, header, records = records_of(trace)
    assert header["cpus"] == 2
    switched_to = [record[2] for record in records if record[0] == Kind.SWITCH]
    assert 1 in switched_to and 0 in switched_to
    result = replay(trace)
    assert result.verified, result.mismatches
    assert result.console.decode("utf-8", "replace") == text


def test_xv6_boots_on_four_cpus(xv6_dir, tmp_path):
    trace = tmp_path / "xv6-4.zst"
    text = xv6_smp_session(xv6_dir, trace, b"echo four\n", cpus=4)
    for cpu in range(4):
        assert f"cpu{cpu}: starting {cpu}" in text
    assert "\nfour\n" in text
    assert replay(trace).verified


def test_sql_rows_carry_their_cpu_and_the_schedule_covers_the_run(demo_smp_trace, tmp_path):
    """Every row of a two-CPU trace sits where replay puts its event and names the CPU that ran
    (from the SWITCH records: the AP's `cpu1: started` line is CPU 1's, its LAPIC writes too);
    `schedule` is the trace's turns, end to end without gaps; instructions_per_cpu sums them."""
    from replayvm.analyze.loader import load_trace
    from replayvm.analyze.sql import query

    trace, _ = demo_smp_trace
    database = tmp_path / "smp.db"
    load_trace(trace, database)
    turns = cpu_turns(trace)
    with TraceReader(trace) as reader:
        position, halts = 0, []
        for record in reader:
            if record[0] in POSITIONED:
                position += record[1]
            if record[0] == Kind.HALT:
                halts.append(position)
        end = reader.footer["position"]
    assert [row[0] for row in query(database, "SELECT position FROM halts ORDER BY seq").rows] == halts
    schedule = query(database, "SELECT cpu, from_position, to_position FROM schedule ORDER BY from_position").rows
    assert [tuple(row) for row in schedule] == turns
    assert schedule[0][1] == 0 and schedule[-1][2] == end
    assert all(a[2] == b[1] for a, b in zip(schedule, schedule[1:]))          # no gaps
    def cpu_at(position: int) -> int:
        return next(cpu for cpu, start, stop in turns if start <= position < stop or position == stop == end)
    for table in ("exits", "interrupts", "halts", "clock_reads", "inputs"):
        rows = query(database, f"SELECT position, cpu FROM {table}").rows
        assert rows and all(cpu == cpu_at(position) or any(p == position for _, p, _ in turns)
                            for position, cpu in rows), table
    assert query(database, "SELECT cpu FROM console WHERE text = 'cpu1: started'").rows == [(1,)]
    assert query(database, "SELECT count(*) FROM exits WHERE cpu = 1 AND space = 'mmio'").rows[0][0] > 0
    per_cpu = query(database, "SELECT cpu, instructions FROM instructions_per_cpu").rows
    assert [row[1] for row in per_cpu] == summarize(trace)["cpu_instructions"]


def test_sql_on_one_cpu_has_cpu_zero_and_one_turn(tmp_path):
    """A one-CPU trace: every row's cpu is 0, and the schedule is one turn over the whole run."""
    from replayvm.analyze.sql import query

    trace = tmp_path / "one.zst"
    demo_session(trace, b"echo one\n", cpus=1)
    end = cpu_turns(trace)[-1][2]
    assert query(trace, "SELECT DISTINCT cpu FROM exits").rows == [(0,)]
    assert query(trace, "SELECT cpu, from_position, to_position FROM schedule").rows == [(0, 0, end)]


@pytest.mark.slow
def test_xv6_usertests_pass_on_two_cpus_and_replay(xv6_dir, tmp_path):
    """On the virtual clock the session is a fixed function of the code: it passes (a wall-clock
    recording can meet xv6-public's own create/unlink deadlock in linkunlink, as one did)."""
    trace = tmp_path / "usertests-2.zst"
    out = io.BytesIO()
    options = SessionOptions(disks=[xv6_dir / "xv6.img", xv6_dir / "fs.img"], engine="emu",
                             script=b"usertests\n", until=b"ALL TESTS PASSED", timeout_s=1800, trace=trace,
                             cpus=2, virtual_clock=True)
    outcome, _ = run_session(options, output=out)
    assert outcome.reason == "until", out.getvalue()[-3000:]
    assert replay(trace).verified
