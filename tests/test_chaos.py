"""Chaos recording: the demo race fails clearly more often, and every failing run replays exactly."""

from __future__ import annotations

import io
import re

from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import replay

RUNS = 20
LOST = re.compile(rb"race: counter=(\d+) expected=(\d+)\nrace: LOST UPDATES")


def race_once(chaos_seed: int | None, trace=None) -> bytes:
    out = io.BytesIO()
    outcome, _ = run_session(SessionOptions(engine="emu", script=b"race\n", chaos_seed=chaos_seed,
                                            trace=trace, timeout_s=60), output=out)
    assert outcome.reason == "script-done"
    return out.getvalue()


def test_chaos_makes_the_race_fail_more_often_and_failures_replay(tmp_path, capsys):
    # Each run has two races: the boot race and the typed `race`. Only the typed one is counted.
    plain = sum(bool(LOST.search(race_once(None).split(b"$ race")[1])) for _ in range(RUNS))
    chaotic, failing = 0, []
    for seed in range(RUNS):
        trace = tmp_path / f"chaos-{seed}.zst"
        text = race_once(1000 + seed, trace)
        if LOST.search(text.split(b"$ race")[1]):
            chaotic += 1
            failing.append((trace, LOST.findall(text)))
    with capsys.disabled():
        print(f"\nrace lost updates: {plain}/{RUNS} runs without chaos, {chaotic}/{RUNS} with --chaos")
    assert chaotic > plain and chaotic >= RUNS * 3 // 5, (plain, chaotic)
    for trace, wrong in failing:                     # replays are exact: the same wrong counters
        result = replay(trace)
        assert result.verified and LOST.findall(result.console) == wrong


def test_cli_repeats_chaos_runs_until_the_bug_shows_and_keeps_that_trace(tmp_path):
    import subprocess
    import sys

    from replayvm.trace import TraceReader

    trace = tmp_path / "bug.zst"
    result = subprocess.run([sys.executable, "-m", "replayvm.cli", "record", "--engine", "emu", "--chaos",
                             "--seed", "5", "--repeat", "20", "--until-fail", "LOST UPDATES", "--input",
                             r"race\n", "-o", str(trace)], capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    matched = re.search(r"run (\d+) of 20 matched", result.stderr)
    assert matched and "LOST UPDATES" in result.stdout
    with TraceReader(trace) as reader:
        assert reader.header["chaos_seed"] == 5 + int(matched.group(1)) - 1
    result = replay(trace)
    assert result.verified and LOST.search(result.console)


def device_waits(trace) -> tuple[int, int]:
    """(IDE status reads that found the disk busy, UART LSR reads that found THR full)."""
    from replayvm import hw
    from replayvm.trace import Kind, TraceReader

    busy = full = 0
    with TraceReader(trace) as reader:
        for record in reader:
            if record[0] == Kind.PIO_READ:
                port, value = record[2], record[4]
                if port == hw.IDE0_CMD_PORT + 7 and value & 0x80:
                    busy += 1
                elif port == hw.COM1_PORT + 5 and not value & 0x20:
                    full += 1
    return busy, full


def test_chaos_gives_disk_and_serial_completion_latency_that_replays(tmp_path):
    plain, chaotic = tmp_path / "plain.zst", tmp_path / "chaos.zst"
    for trace, seed in ((plain, None), (chaotic, 7)):
        out = io.BytesIO()
        outcome, _ = run_session(SessionOptions(engine="emu", script=b"disk\necho hi\n", chaos_seed=seed,
                                                trace=trace, timeout_s=60), output=out)
        assert outcome.reason == "script-done" and b"disk: ok" in out.getvalue()
    assert device_waits(plain) == (0, 0)                 # default devices complete at once
    busy, full = device_waits(chaotic)
    assert busy > 0 and full > 0, (busy, full)           # the guest waited for both devices
    assert replay(chaotic).verified
