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
    for trace, wrong in failing[:3]:                 # replays are exact: the same wrong counters
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
