"""Replay from the trace alone: verified sessions, the race reproduced, tampering caught."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from replayvm import hw
from tests.small_guests import SHUTDOWN

from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import Divergence, replay
from replayvm.trace import Kind, TraceReader, TraceWriter
from replayvm.trace.format import POSITIONED

HANG_S = 120                     # a deadline that only detects a hang, never judges speed


def record(trace: Path, script: bytes, **kwargs) -> bytes:
    out = io.BytesIO()
    outcome, _ = run_session(SessionOptions(engine="emu", script=script, trace=trace, timeout_s=120,
                                            **kwargs), output=out)
    assert outcome.reason == "script-done", outcome
    return out.getvalue()


def test_demo_with_serial_input_replays_verified_with_the_same_console(tmp_path):
    shown = record(tmp_path / "t.zst", b"echo hello\ndisk\ndate\n")
    result = replay(tmp_path / "t.zst")
    assert result.verified and result.console == shown
    assert result.events > 100


def test_cpu_bound_guest_preempted_between_exits_replays_verified(tmp_path):
    # The virtual clock: how many ticks land inside the spin must not depend on the host's speed.
    shown = record(tmp_path / "t.zst", b"ticks\nspin 20\nticks\n", virtual_clock=True)
    ticks = [int(t) for t in re.findall(rb"ticks: (\d+)", shown)]
    assert ticks[1] - ticks[0] >= 3                       # timer interrupts landed inside the spin
    with TraceReader(tmp_path / "t.zst") as reader:
        positions, previous = [], 0
        for rec in reader:
            if rec[0] in POSITIONED:
                previous += rec[1]
                if rec[0] == Kind.INTERRUPT:
                    positions.append(previous)
    assert len(positions) >= 3
    assert replay(tmp_path / "t.zst").verified


def test_the_race_recorded_once_replays_the_same_wrong_counter_every_time(tmp_path):
    # On the virtual clock the timer lands where it always does, and the boot race loses updates
    # on every run (on the wall clock whether a race loses any is chance: a retry loop's verdict).
    trace = tmp_path / "race.zst"
    shown = record(trace, b"race\n", virtual_clock=True)
    assert b"LOST UPDATES" in shown, shown.decode()
    wrong = re.findall(rb"race: counter=(\d+) expected=(\d+)\nrace: LOST UPDATES", shown)
    assert wrong and wrong[0][0] != wrong[0][1]
    for _ in range(3):
        result = replay(trace)
        assert result.verified
        assert re.findall(rb"race: counter=(\d+) expected=(\d+)\nrace: LOST UPDATES", result.console) == wrong


def test_xv6_session_replays_without_the_disk_images(xv6_dir, tmp_path):
    for name in ("xv6.img", "fs.img"):
        shutil.copy(xv6_dir / name, tmp_path / name)
    shown = record(tmp_path / "xv6.zst", b"ls\necho hello\ncat README\n",
                   disks=[tmp_path / "xv6.img", tmp_path / "fs.img"])
    (tmp_path / "xv6.img").unlink()
    (tmp_path / "fs.img").unlink()
    result = replay(tmp_path / "xv6.zst")
    assert result.verified and result.console == shown


# ------------------------------------------------------------------------------- tampering
def rewrite(source: Path, target: Path, edit) -> None:
    """Copy a trace record by record through `edit(records) -> records`."""
    with TraceReader(source) as reader:
        header, records = reader.header, list(reader)
    records = edit(records)
    writer = TraceWriter(target, header)
    footer = None
    for rec in records:
        if rec[0] == Kind.FOOTER:
            footer = rec[1]
        else:
            writer.append(tuple(rec))
    writer.close(footer)


def event_index(records: list, predicate) -> tuple[int, int]:
    """(list index, event index) of the first positioned record matching predicate."""
    n = 0
    for i, rec in enumerate(records):
        if rec[0] in POSITIONED:
            if predicate(rec):
                return i, n
            n += 1
    raise AssertionError("no such record")


def divergence_event(trace: Path) -> int:
    with pytest.raises(Divergence) as info:
        replay(trace)
    match = re.search(r"at event (\d+)", str(info.value))
    assert match, str(info.value)
    return int(match.group(1))


@pytest.fixture(scope="module")
def demo_trace(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("r") / "demo.zst"
    record(path, b"echo hello\n", virtual_clock=True)        # the same events on every run
    return path


def test_a_changed_read_value_is_caught_where_it_changes_the_guest(demo_trace, tmp_path):
    def edit(records):
        i, _ = event_index(records, lambda r: r[0] == Kind.PIO_READ and r[2] == 0x3F8 and r[4] == ord("e"))
        records[i] = [*records[i][:4], ord("x"), *records[i][5:]]      # the typed 'e' becomes 'x'
        typed, _ = event_index(records, lambda r: r[0] == Kind.INPUT)
        records[typed] = [*records[typed][:3], records[typed][3].replace(b"e", b"x", 1)]  # and was typed
        edit.event = event_index(records, lambda r: r is records[i])[1]
        return records
    rewrite(demo_trace, tmp_path / "t.zst", edit)
    where = divergence_event(tmp_path / "t.zst")
    assert edit.event < where <= edit.event + 100      # where the echo of the character differs


def test_a_uart_read_that_is_not_what_was_typed_is_caught_at_the_read(demo_trace, tmp_path):
    """The INPUT record says what was typed; the UART reads must deliver exactly that."""
    def edit(records):
        i, n = event_index(records, lambda r: r[0] == Kind.PIO_READ and r[2] == 0x3F8 and r[4] == ord("e"))
        records[i] = [*records[i][:4], ord("x"), *records[i][5:]]      # only the read changes
        edit.event = n
        return records
    rewrite(demo_trace, tmp_path / "t.zst", edit)
    # replay's UART, fed the typed bytes, answers 0x65 ('e'): the recording's 0x78 differs
    with pytest.raises(Divergence, match=r"at event (\d+): com1\.data \(0x3f8\) read 0x65 in the replay, "
                                         r"0x78 in the recording") as info:
        replay(tmp_path / "t.zst")
    assert f"at event {edit.event}:" in str(info.value)


def test_typed_input_moved_after_its_reads_is_caught(demo_trace, tmp_path):
    """An INPUT record's position is checked by the replayed UART: moved past the read that took
    its first byte, the UART has raised no receive interrupt and holds nothing to read yet."""
    def later(records):
        typed, _ = event_index(records, lambda r: r[0] == Kind.INPUT)
        record = records[typed]
        first_read = next(k for k in range(typed + 1, len(records))
                          if records[k][0] == Kind.PIO_READ and records[k][2] == 0x3F8)
        following = records[typed + 1]
        records[typed + 1] = [following[0], following[1] + record[1], *following[2:]]
        records.insert(first_read + 1, [record[0], 0, *record[2:]])     # right after that read
        del records[typed]
        return records
    rewrite(demo_trace, tmp_path / "late.zst", later)
    with pytest.raises(Divergence, match=r"interrupt vector 36 \(com1\) here; the replayed devices had not "
                                         r"raised it|com1\.(lsr|data) \(0x3f[d8]\) read"):
        replay(tmp_path / "late.zst")


def test_a_dropped_interrupt_is_caught_at_its_event(demo_trace, tmp_path):
    def edit(records):
        i, n = event_index(records, lambda r: r[0] == Kind.INTERRUPT and r[3] == "timer")
        j, _ = event_index(records[i + 1:], lambda r: True)
        records[i + 1 + j] = [records[i + 1 + j][0], records[i + 1 + j][1] + records[i][1], *records[i + 1 + j][2:]]
        edit.event = n
        return records[:i] + records[i + 1:]
    rewrite(demo_trace, tmp_path / "t.zst", edit)
    assert divergence_event(tmp_path / "t.zst") == edit.event


def test_a_shifted_position_is_caught_at_its_event(demo_trace, tmp_path):
    def edit(records):
        i, n = event_index(records, lambda r: r[0] == Kind.PIO_WRITE and r[2] == 0x3F8)
        j, _ = event_index(records[i + 1:], lambda r: True)
        records[i] = [records[i][0], records[i][1] + 3, *records[i][2:]]
        nxt = records[i + 1 + j]
        records[i + 1 + j] = [nxt[0], nxt[1] - 3, *nxt[2:]]
        edit.event = n
        return records
    rewrite(demo_trace, tmp_path / "t.zst", edit)
    assert divergence_event(tmp_path / "t.zst") == edit.event


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replayvm.cli", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_cli_reports_divergence_and_truncation_without_tracebacks(demo_trace, tmp_path):
    result = cli("replay", "--quiet", str(demo_trace))
    assert result.returncode == 0 and result.stdout.startswith("replay verified:"), result
    data = demo_trace.read_bytes()
    (tmp_path / "cut.zst").write_bytes(data[:len(data) * 2 // 3])
    result = cli("replay", "--quiet", str(tmp_path / "cut.zst"))
    assert "Traceback" not in result.stderr
    assert result.returncode == 1
    assert "ended early" in result.stdout or "diverged" in result.stderr
    (tmp_path / "junk.zst").write_bytes(b"garbage" * 10)
    result = cli("replay", str(tmp_path / "junk.zst"))
    assert result.returncode == 2 and "not a replayvm trace" in result.stderr


def typed_session(tmp_path: Path, disks: list[Path]) -> None:
    """Keystrokes arrive while the guest runs (not at prompts), 40 ms apart, as a person types.
    (How much faster such a replay runs than the recording is measured in bench/bench_replay.py.)"""
    import threading

    from replayvm.console import Console
    from replayvm.machine import Machine, MachineConfig
    from replayvm.record.session import finish_recording, start_recording

    out = io.BytesIO()
    console = Console(out, until=b"\ntyped-done\n$ ")
    machine = Machine(MachineConfig(disks=disks, engine="emu"), console)
    options = SessionOptions(engine="emu", trace=tmp_path / "typed.zst")
    recording = start_recording(machine, options)
    text = b"echo typed-done\n"

    def typist() -> None:
        # Each key waits until the guest has taken the one before (then 40 ms more): keys arrive
        # one by one however slowly the host runs the guest. The deadline only detects a hang.
        deadline = time.monotonic() + HANG_S
        while b"$ " not in console.transcript and time.monotonic() < deadline:
            threading.Event().wait(0.01)
        for byte in text:
            console.keystrokes(bytes((byte,)))
            while console.input_ready.is_set() and time.monotonic() < deadline:
                threading.Event().wait(0.005)
            threading.Event().wait(0.04)

    thread = threading.Thread(target=typist, daemon=True)
    thread.start()
    outcome = machine.run(timeout_s=60)
    finish_recording(machine, *recording, outcome.reason, outcome.detail)
    machine.close()
    assert outcome.reason == "until"
    inputs = result_inputs(tmp_path / "typed.zst")
    assert b"".join(inputs) == text and len(inputs) == len(text)   # keystrokes arrived separately
    result = replay(tmp_path / "typed.zst")
    assert result.verified and result.console == out.getvalue()


def test_demo_session_typed_with_delays_replays_verified(tmp_path):
    from replayvm.record.session import bundled_demo_disk

    typed_session(tmp_path, [bundled_demo_disk()])


def test_xv6_session_typed_with_delays_replays_verified(xv6_dir, tmp_path):
    typed_session(tmp_path, [xv6_dir / "xv6.img", xv6_dir / "fs.img"])


def result_inputs(trace: Path) -> list[bytes]:
    with TraceReader(trace) as reader:
        return [bytes(rec[3]) for rec in reader if rec[0] == Kind.INPUT]


def test_until_stops_at_an_event_or_instruction_and_shows_the_same_state_each_time(demo_trace):
    first = cli("replay", "--quiet", "--until", "i200000", str(demo_trace))
    again = cli("replay", "--quiet", "--until", "i200000", str(demo_trace))
    assert first.returncode == 0 and "instruction 200000" in first.stdout and "rip=" in first.stdout
    assert first.stdout == again.stdout
    by_event = cli("replay", "--quiet", "--until", "100", str(demo_trace))
    assert by_event.returncode == 0 and "stopped at event 100," in by_event.stdout
    bad = cli("replay", "--until", "soon", str(demo_trace))
    assert bad.returncode == 2 and "--until takes" in bad.stderr


@pytest.mark.slow
def test_xv6_usertests_recorded_and_replayed_verified(xv6_dir, tmp_path):
    out = io.BytesIO()
    outcome, _ = run_session(SessionOptions(engine="emu", disks=[xv6_dir / "xv6.img", xv6_dir / "fs.img"],
                                            script=b"usertests\n", until=b"ALL TESTS PASSED",
                                            trace=tmp_path / "usertests.zst", timeout_s=1800), output=out)
    assert outcome.reason == "until", out.getvalue()[-2000:]
    result = replay(tmp_path / "usertests.zst")
    assert result.verified and result.console == out.getvalue()


# A busy loop without exits that only the LAPIC timer ends: on kvm the kicker stops the guest at
# the deadline and injects the tick between exits, so the recording places it by a landmark.
LAPIC_TIMER_IN_A_BUSY_LOOP = f"""
    cli
    movl    $handler, %eax
    movw    %ax, idt + 0x30 * 8
    movw    %cs, %bx
    movw    %bx, idt + 0x30 * 8 + 2
    movw    $0x8E00, idt + 0x30 * 8 + 4
    shrl    $16, %eax
    movw    %ax, idt + 0x30 * 8 + 6
    lidt    idtr
    movl    $0x1FF, {hw.LAPIC_ADDR + 0xF0:#x}         # SVR: enabled
    movl    $0x0B, {hw.LAPIC_ADDR + 0x3E0:#x}         # divide by 1
    movl    $0x30, {hw.LAPIC_ADDR + 0x320:#x}         # LVT timer: vector 0x30, one-shot
    movl    $2000000, {hw.LAPIC_ADDR + 0x380:#x}      # initial count: starts the timer
    sti
busy:
    incl    %ecx
    jmp     busy
handler:
    movl    $0, {hw.LAPIC_ADDR + 0xB0:#x}             # EOI
    {SHUTDOWN}
idtr:
    .word   0x31 * 8 - 1
    .long   idt
    .align  8
idt:
    .fill   0x31 * 8, 1, 0
"""


def test_kvm_trace_replays_on_kvm_including_an_interrupt_placed_by_landmark(require_kvm, tmp_path):
    from replayvm.replay.replayer import Replayer
    from tests.small_guests import multiboot_kernel, record as record_small

    trace = tmp_path / "kvm.zst"
    reason, _ = record_small(trace, "kvm", kernel=multiboot_kernel(tmp_path, LAPIC_TIMER_IN_A_BUSY_LOOP))
    assert reason == "shutdown"
    with TraceReader(trace) as reader:
        landmarks = [rec for rec in reader if rec[0] == Kind.INTERRUPT and len(rec) > 6]
    assert len(landmarks) == 1
    replayer = Replayer(trace)
    try:
        result = replayer.run()
        assert result.verified, result
        assert replayer.landmark_hits >= 1             # the kicked interrupt was found by breakpoint
    finally:
        replayer.close()


def test_kvm_landmark_interrupt_right_after_a_lapic_id_read_is_taken(require_kvm, tmp_path):
    """The last exit before a kicked tick is an unlogged read of the LAPIC ID (xv6 reads it on
    every lock operation): that exit reaches the interrupt's position, so replay must stop there
    and run to the landmark. It used to run on past it (swetland/xv6 on PVM: "expected interrupt
    vector 32 (timer) at position N; the guest did a pio_read at N+1"); here: no exit follows."""
    from replayvm.replay.replayer import Replayer
    from tests.small_guests import multiboot_kernel, record as record_small

    guest = LAPIC_TIMER_IN_A_BUSY_LOOP.replace(
        "    sti\nbusy:", f"    sti\n    movl    {hw.LAPIC_ADDR + 0x20:#x}, %edx\nbusy:")
    assert guest != LAPIC_TIMER_IN_A_BUSY_LOOP
    trace = tmp_path / "kvm.zst"
    reason, _ = record_small(trace, "kvm", kernel=multiboot_kernel(tmp_path, guest))
    assert reason == "shutdown"
    with TraceReader(trace) as reader:
        records = list(reader)
    landmarks = [rec for rec in records if rec[0] == Kind.INTERRUPT and len(rec) > 6]
    assert len(landmarks) == 1
    replayer = Replayer(trace)
    try:
        result = replayer.run()
        assert result.verified, result
        assert replayer.landmark_hits >= 1
    finally:
        replayer.close()


def test_replay_engine_must_match_the_recording(demo_trace):
    same = cli("replay", "--quiet", "--engine", "emu", str(demo_trace))
    assert same.returncode == 0
    other = cli("replay", "--quiet", "--engine", "kvm", str(demo_trace))
    assert other.returncode == 2 and "recorded on emu" in other.stderr and "not supported" in other.stderr
