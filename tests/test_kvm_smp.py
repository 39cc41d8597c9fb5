"""Several CPUs on the kvm engine (issue 13), with the smp64 test guest (guests/smp64).

smp64 is a 64-bit multiboot kernel PVM can run: the BSP starts the AP by INIT and STARTUP IPIs
through a real-mode trampoline, then both CPUs print, take a spinlock (its waiters spin on memory
without any exit), race on a counter, and the BSP waits for the AP with HLT until the AP's IPI.
The kvm engine runs the two vCPUs one at a time: it switches at an exit when a turn of exits is
over, when a CPU halts, and -- a spinning waiter makes no exit -- after a kick, at a landmark.
KVM is never mocked (skipped without /dev/kvm on a developer machine, failed on CI).
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from replayvm.guests import guest_file
from replayvm.record.live import replay_and_go_live
from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import Divergence, Replayer, replay
from replayvm.schedule import KVM_QUANTUM
from replayvm.trace import Kind, TraceReader
from replayvm.trace.format import FEATURE_KVM_SMP, FEATURE_SMP, POSITIONED
from replayvm.trace.records import SWITCH
from tests.conftest import ON_CI, kvm_usable
from tests.test_replay import rewrite

ROUNDS = 40                          # guests/smp64/kernel.S: rounds of the counters per CPU


def require_kvm_here() -> None:
    ok, why = kvm_usable()
    if not ok:
        if ON_CI:
            pytest.fail(f"CI requires KVM: {why}")
        pytest.skip(why)


def record_smp64(trace: Path, chaos_seed: int | None = None) -> tuple[bytes, object]:
    out = io.BytesIO()
    outcome, machine = run_session(SessionOptions(engine="kvm", kernel=guest_file("smp64", "kernel.elf"),
                                                  ram_mib=16, trace=trace, timeout_s=120, cpus=2,
                                                  chaos_seed=chaos_seed), output=out)
    assert outcome.reason == "shutdown" and "debug port" in outcome.detail, (outcome, out.getvalue())
    return out.getvalue(), machine


def switches(trace: Path) -> list[tuple[int, int, dict | None]]:
    """(position, cpu, landmark) of every SWITCH record."""
    found, position = [], 0
    with TraceReader(trace) as reader:
        for record in reader:
            if record[0] in POSITIONED:
                position += record[1]
            if record[0] == Kind.SWITCH:
                found.append((position, record[SWITCH.cpu], SWITCH.get(record, "landmark")))
    return found


@pytest.fixture(scope="module")
def kvm_smp(tmp_path_factory) -> tuple[Path, bytes, object]:
    require_kvm_here()
    trace = tmp_path_factory.mktemp("kvm-smp") / "smp64.zst"
    console, machine = record_smp64(trace)
    return trace, console, machine


def test_two_cpus_on_kvm_start_by_ipis_and_both_work(kvm_smp):
    """What both CPUs did: each has its own APIC ID, in its local APIC and in CPUID; each did
    its rounds under the lock (no update of the locked counter lost)."""
    trace, console, machine = kvm_smp
    text = console.decode()
    assert "smp64: cpu0 up (apic id 0, cpuid apic id 0)\n" in text
    assert "smp64: cpu1 up (apic id 1, cpuid apic id 1)\n" in text   # the AP ran, with its own CPUID
    assert "smp64: cpu0 sees cpu1 up\n" in text
    assert "smp64: cpu0 done\n" in text and "smp64: cpu1 done\n" in text
    digits = re.sub(r"smp64:[^\n]*\n?", "", text)
    assert sorted(digits.replace("\n", "")) == ["0"] * ROUNDS + ["1"] * ROUNDS
    match = re.search(r"locked counter (\d+), racy counter (\d+), of (\d+)", text)
    assert match and int(match.group(1)) == int(match.group(3)) == 2 * ROUNDS
    assert machine.engine.cpus == 2 and machine.engine.cpu_condition(1) == "halted"


def test_the_trace_names_its_switches_and_every_cpu(kvm_smp):
    """Turns of KVM_QUANTUM exits; the BSP's wait for the AP and a lock holder's waiter spin on
    memory without exits, so some switches happen between exits, each with a landmark."""
    trace, _, _ = kvm_smp
    with TraceReader(trace) as reader:
        header = reader.header
        records = list(reader)
    assert header["engine"] == "kvm" and header["cpus"] == 2
    assert FEATURE_SMP in header["features"] and FEATURE_KVM_SMP in header["features"]
    found = switches(trace)
    assert {cpu for _, cpu, _ in found} == {0, 1}
    assert any(landmark is not None for _, _, landmark in found)       # the BSP waits for the AP so
    turns = [b[0] - a[0] for a, b in zip(found, found[1:]) if b[2] is None]   # ended at an exit
    assert turns.count(KVM_QUANTUM) >= 3     # turns of exits (others end at a halt, or run alone)
    footer = records[-1][1]
    assert footer["counts"]["switch"] == len(found)
    assert footer["counts"]["switch_landmarks"] == sum(1 for *_, landmark in found if landmark)
    assert len(footer["cpu_states"]) == 2 and all("regs" in state for state in footer["cpu_states"])


def test_the_kvm_trace_replays_verified_following_its_switches(kvm_smp):
    trace, console, _ = kvm_smp
    replayer = Replayer(trace)
    followed = []
    replayer.engine.on_switch = lambda cpu, position, landmark: followed.append((position, cpu))
    try:
        result = replayer.run()
    finally:
        replayer.close()
    assert result.verified, result.mismatches
    assert result.console == console
    assert followed == [(position, cpu) for position, cpu, _ in switches(trace)]


def _mutate_first_exact_switch(trace: Path, target: Path) -> int:
    """Move the first switch made at an exit (one the next event does not follow at once) one
    exit later, keeping every later record's position; returns its event index."""
    found = {}

    def edit(records: list) -> list:
        positioned = [i for i, record in enumerate(records) if record[0] in POSITIONED]
        for event, (i, following) in enumerate(zip(positioned, positioned[1:])):
            record = records[i]
            if record[0] == Kind.SWITCH and event > 0 and SWITCH.get(record, "landmark") is None \
                    and records[following][1] >= 1:
                found["index"] = event
                record[1] += 1
                records[following][1] -= 1
                break
        return records

    rewrite(trace, target, edit)
    return found["index"]


def test_a_moved_switch_is_a_divergence_on_kvm(kvm_smp, tmp_path):
    trace, _, _ = kvm_smp
    mutated = tmp_path / "moved.zst"
    index = _mutate_first_exact_switch(trace, mutated)
    with pytest.raises(Divergence, match=r"replay diverged at event (\d+) on CPU \d") as info:
        replay(mutated)
    assert int(re.search(r"event (\d+)", str(info.value)).group(1)) <= index + 1


def test_a_switch_landmark_never_reached_is_a_divergence(kvm_smp, tmp_path):
    """A landmark whose RIP the guest never executes: the CPU spins on without exits, and the
    exit-free watch ends the replay with a divergence naming the switch (not a hang)."""
    trace, _, _ = kvm_smp
    mutated = tmp_path / "landmark.zst"

    def edit(records: list) -> list:
        for record in records:
            if record[0] == Kind.SWITCH and SWITCH.get(record, "landmark") is not None:
                record[SWITCH.landmark]["rip"] = 0xDEAD0
                break
        return records

    rewrite(trace, mutated, edit)
    with pytest.raises(Divergence, match=r"switch to CPU \d between exits"):
        replay(mutated, exit_free_limit_s=1.0)


def test_chaos_turns_on_kvm_replay_verified(tmp_path):
    """--chaos draws the turns (in exits) from the seed; the trace replays the same interleaving."""
    require_kvm_here()
    trace = tmp_path / "chaos.zst"
    console, _ = record_smp64(trace, chaos_seed=7)
    plain_quanta = {b - a for (a, *_), (b, *_) in zip(switches(trace), switches(trace)[1:])}
    assert plain_quanta != {KVM_QUANTUM}
    result = replay(trace)
    assert result.verified and result.console == console


def test_more_cpus_than_the_hosts_kvm_runs_is_refused_in_one_line():
    require_kvm_here()
    from replayvm.engines.probe import kvm_vcpu_limit

    limit = kvm_vcpu_limit()
    if limit >= 8:
        pytest.skip(f"this host's KVM runs {limit} vCPUs: no --cpus within 1..8 is too many")
    result = subprocess.run([sys.executable, "-m", "replayvm.cli", "record", "--guest", "smp64", "--engine",
                             "kvm", "--cpus", str(limit + 1)], capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{limit} vCPUs" in lines[0] and "KVM_CAP_NR_VCPUS" in lines[0], lines[0]


def test_a_kvm_smp_trace_does_not_replay_on_emu(kvm_smp):
    """kvm positions count exits, emu positions instructions: no replay across engines (yet),
    and saying so is one line."""
    trace, _, _ = kvm_smp
    result = subprocess.run([sys.executable, "-m", "replayvm.cli", "replay", str(trace), "--engine", "emu"],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result
    assert "recorded on kvm" in result.stderr
    on_kvm = subprocess.run([sys.executable, "-m", "replayvm.cli", "replay", "--quiet", str(trace)],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert re.search(r"replay verified: \d+ events, \d+ exits, state hash", on_kvm.stdout), on_kvm.stdout


def test_going_live_on_kvm_with_two_cpus_records_a_branch_that_replays_verified(kvm_smp, tmp_path):
    """replay --seek N --live on a kvm trace of two CPUs: the branch starts every CPU where the
    replay had it (start_cpus), runs the rest of the guest live on both, and replays verified."""
    trace, console, _ = kvm_smp
    seek = next(i for i, (position, cpu, _) in enumerate(switches(trace)) if cpu == 1 and i > 2)
    event = _event_of_switch(trace, seek)
    branch = tmp_path / "branch.zst"
    out = io.BytesIO()
    outcome, _ = replay_and_go_live(trace, SessionOptions(engine="kvm", trace=branch, timeout_s=120),
                                    seek=str(event), output=out, keep_checkpoints=False)
    assert outcome.reason == "shutdown", outcome
    live = out.getvalue()
    assert b"smp64: cpu1 done\n" in live and b"locked counter 80" in live   # (new turns: not console's)
    with TraceReader(branch) as reader:
        start = reader.header["start_cpus"]
    assert start["current"] == 1 and start["states"][0] is not None
    result = replay(branch)
    assert result.verified, result.mismatches


def _event_of_switch(trace: Path, nth: int) -> int:
    """The event index of the trace's nth SWITCH record."""
    event, seen = 0, 0
    with TraceReader(trace) as reader:
        for record in reader:
            if record[0] in POSITIONED:
                if record[0] == Kind.SWITCH:
                    if seen == nth:
                        return event
                    seen += 1
                event += 1
    raise AssertionError("no such switch")


def test_sql_rows_of_a_kvm_smp_trace_carry_their_cpu(kvm_smp, tmp_path):
    from replayvm.analyze import query
    from replayvm.analyze.loader import load_trace

    trace, _, _ = kvm_smp
    database = tmp_path / "smp64.db"
    load_trace(trace, database)
    rows = dict(query(database, "SELECT cpu, count(*) FROM exits GROUP BY cpu").rows)
    assert set(rows) == {0, 1} and all(rows.values())


def test_the_same_guest_on_emu_gives_each_cpu_its_own_cpuid_apic_id_and_replays(tmp_path):
    """One machine, two engines: on emu the CPUs share one Unicorn vCPU, whose CPUID would say
    APIC ID 0 on both; leaf 1 is answered with the running CPU's ID."""
    trace = tmp_path / "smp64-emu.zst"
    out = io.BytesIO()
    outcome, _ = run_session(SessionOptions(engine="emu", kernel=guest_file("smp64", "kernel.elf"), ram_mib=16,
                                            trace=trace, timeout_s=120, cpus=2, virtual_clock=True), output=out)
    text = out.getvalue().decode()
    assert outcome.reason == "shutdown", (outcome, text)
    assert "smp64: cpu0 up (apic id 0, cpuid apic id 0)\n" in text
    assert "smp64: cpu1 up (apic id 1, cpuid apic id 1)\n" in text
    match = re.search(r"locked counter (\d+), racy counter (\d+), of (\d+)", text)
    assert match and int(match.group(1)) == 2 * ROUNDS
    replayed = io.BytesIO()
    assert replay(trace, output=replayed).verified and replayed.getvalue() == out.getvalue()
