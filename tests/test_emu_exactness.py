"""The emu engine's fast paths count the same instructions as its reference behaviour.

The reference (REPLAYVM_EMU_REFERENCE=1) is the engine as it was before its fast paths: QEMU's
own page walk, and EFLAGS.IF read through uc_reg_read by the per-instruction hook. The fast
engine walks the page tables itself (so that stores to data pages skip Unicorn's slow path) and
reads IF straight from QEMU's CPU state. A session recorded both ways, on the virtual clock,
must give the same trace event for event -- every position, value and vector -- and the same
final state (registers and a digest of RAM); each trace must also replay verified under the
other behaviour, which is how traces recorded before the fast paths keep replaying.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from replayvm.engines.emu import EmuEngine
from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import replay
from replayvm.trace import Kind, TraceReader

REFERENCE = "REPLAYVM_EMU_REFERENCE"
HOST_KEYS = {"wall_s", "trace_sha256"}       # the footer's: host time, and the file's own digest


def record(monkeypatch, trace: Path, script: bytes, reference: bool, **options):
    if reference:
        monkeypatch.setenv(REFERENCE, "1")
    else:
        monkeypatch.delenv(REFERENCE, raising=False)
    out = io.BytesIO()
    outcome, machine = run_session(SessionOptions(engine="emu", script=script, trace=trace, timeout_s=600,
                                                  virtual_clock=True, **options), output=out)
    assert outcome.reason == "script-done", outcome
    walk = machine.engine.page_walk
    assert walk == ("qemu" if reference else "engine")
    return out.getvalue()


def events_and_end(trace: Path) -> tuple[list, dict]:
    with TraceReader(trace) as reader:
        records = [list(record) for record in reader]
    assert records[-1][0] == Kind.FOOTER
    footer = records.pop()[1]
    return records, {key: value for key, value in footer.items() if key not in HOST_KEYS}


def check_same_sessions(monkeypatch, tmp_path: Path, script: bytes, **options) -> list:
    """Record `script` with the reference and with the fast paths; compare; cross-replay."""
    fast, ref = tmp_path / "fast.zst", tmp_path / "reference.zst"
    shown_fast = record(monkeypatch, fast, script, reference=False, **options)
    shown_ref = record(monkeypatch, ref, script, reference=True, **options)
    assert shown_fast == shown_ref
    fast_events, fast_end = events_and_end(fast)
    ref_events, ref_end = events_and_end(ref)
    assert len(fast_events) == len(ref_events)
    for index, (a, b) in enumerate(zip(fast_events, ref_events)):
        assert a == b, f"event {index}: fast {a} reference {b}"
    assert fast_end == ref_end                # final registers, RAM digest, position, counts
    monkeypatch.setenv(REFERENCE, "1")                    # the fast trace under the reference
    assert replay(fast).verified
    monkeypatch.delenv(REFERENCE)                         # and the other way round
    assert replay(ref).verified
    return fast_events


def test_reference_mode_is_what_it_says(monkeypatch):
    from replayvm.machine import Machine, MachineConfig
    from replayvm.console import Console
    from replayvm.record.session import bundled_demo_disk

    monkeypatch.setenv(REFERENCE, "1")
    machine = Machine(MachineConfig(disks=[bundled_demo_disk()], engine="emu"), Console(io.BytesIO()))
    try:
        assert isinstance(machine.engine, EmuEngine) and machine.engine.page_walk == "qemu"
        assert machine.engine.counting == "instructions"
    finally:
        machine.close()


def test_the_fast_side_of_these_comparisons_is_the_fast_path(monkeypatch):
    from replayvm.machine import Machine, MachineConfig
    from replayvm.console import Console
    from replayvm.record.session import bundled_demo_disk

    monkeypatch.delenv(REFERENCE, raising=False)
    machine = Machine(MachineConfig(disks=[bundled_demo_disk()], engine="emu"), Console(io.BytesIO()))
    try:
        assert machine.engine.page_walk == "engine" and machine.engine.counting == "blocks"
    finally:
        machine.close()


def test_demo_race_and_disk_are_counted_the_same(monkeypatch, tmp_path):
    events = check_same_sessions(monkeypatch, tmp_path, b"race\ndisk\necho hello\n")
    assert len(events) > 100


def test_demo_spin_is_counted_the_same(monkeypatch, tmp_path):
    check_same_sessions(monkeypatch, tmp_path, b"spin 5\nticks\n")


def test_demo_under_chaos_is_counted_the_same(monkeypatch, tmp_path):
    check_same_sessions(monkeypatch, tmp_path, b"race\n", chaos_seed=3)


def test_demo_on_two_cpus_under_chaos_is_counted_the_same(monkeypatch, tmp_path):
    """Chaos draws turns as short as one instruction: switches land anywhere inside what would be
    fast blocks, and the SWITCH records, interrupts and accesses must still fall on the same
    positions as with the per-instruction hook."""
    events = check_same_sessions(monkeypatch, tmp_path, b"race\nrace\nrace\n", cpus=2, chaos_seed=4)
    assert sum(1 for event in events if event[0] == Kind.SWITCH) >= 10


def test_demo_disk_writes_in_bulk_across_split_runs_are_counted_the_same(monkeypatch, tmp_path):
    # `rep outsl` goes to the disk in bulk on the fast side: with runs split every 100 bytes the
    # recorder must cut the bulk where it cuts one-by-one accesses, and the replay must take a
    # bulk across run records.
    from replayvm.record.recorder import Recorder

    monkeypatch.setattr(Recorder, "max_run_bytes", 100)
    events = check_same_sessions(monkeypatch, tmp_path, b"disk\n")
    runs = [e for e in events if e[0] == Kind.PIO_WRITE_RUN]
    assert len(runs) >= 6 and max(e[4] for e in runs) == 25        # 512 bytes = 5 x 25 dwords + 3


def xv6_copy(xv6_dir: Path, tmp_path: Path) -> list[Path]:
    disks = []
    for name in ("xv6.img", "fs.img"):
        shutil.copy(xv6_dir / name, tmp_path / name)
        disks.append(tmp_path / name)
    return disks


def test_xv6_boot_and_ls_are_counted_the_same(xv6_dir, monkeypatch, tmp_path):
    check_same_sessions(monkeypatch, tmp_path, b"ls\necho hello\n", disks=xv6_copy(xv6_dir, tmp_path))


def test_xv6_file_writes_are_counted_the_same(xv6_dir, monkeypatch, tmp_path):
    check_same_sessions(monkeypatch, tmp_path, b"echo hello > f\ncat f\nmkdir d\nls d\n",
                        disks=xv6_copy(xv6_dir, tmp_path))


def test_xv6_under_chaos_is_counted_the_same(xv6_dir, monkeypatch, tmp_path):
    check_same_sessions(monkeypatch, tmp_path, b"ls\ncat README\n", disks=xv6_copy(xv6_dir, tmp_path),
                        chaos_seed=7)


def test_xv6_on_two_cpus_is_counted_the_same(xv6_dir, monkeypatch, tmp_path):
    """Switches between CPUs (a context restore and a TLB flush between runs) keep the per-block
    counting exact: the same switches, interrupts and accesses at the same positions."""
    events = check_same_sessions(monkeypatch, tmp_path, b"ls\necho hi\n", disks=xv6_copy(xv6_dir, tmp_path),
                                 cpus=2)
    assert sum(1 for event in events if event[0] == Kind.SWITCH) > 100


@pytest.mark.slow
def test_xv6_usertests_page_faults_and_all_are_counted_the_same(xv6_dir, monkeypatch, tmp_path):
    # usertests forks, execs, grows and shrinks memory (sbrktest) and is killed by page faults
    # on purpose: every #PF must come at the same instruction with the same CR2 and error code.
    events = check_same_sessions(monkeypatch, tmp_path, b"usertests\n", disks=xv6_copy(xv6_dir, tmp_path))
    assert events
