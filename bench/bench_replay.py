"""Replay speed against recording speed, for the same sessions.

    python bench/bench_replay.py [--json FILE]
    python bench/bench_replay.py --trace [NAME=]PATH ... [--json FILE]

Records each session once (wall clock, as a user would), then replays it; prints both wall
times and the ratio record/replay (above 1 means replay is faster: idle waiting is skipped).
Sessions: the demo guest with typed input, the demo CPU-bound `spin`, and with
REPLAYVM_XV6_DIR the xv6 session `ls`, `echo hello`, `cat README`.

With --trace, replays the given traces instead (no recording, no kvm landmark search): what
bench/compare_revisions.py uses to time two trees on identical input. With --json, also writes
the figures (wall and CPU seconds per metric, see bench_figures.py) to FILE.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

from bench_figures import Figures, named_trace
from replayvm.record.session import SessionOptions, bundled_demo_disk, run_session
from replayvm.replay.replayer import replay


def replay_metric(name: str) -> str:
    """The --json name of a session's replay time."""
    return f"replay {name}"


def measure_replay(figures: Figures, name: str, trace: Path, recorded: float | None = None) -> None:
    """Replay `trace` verified and print its time (beside the recording's, when known)."""
    replayed, result = figures.timed(replay_metric(name), lambda: replay(trace))
    assert result.verified, f"{name}: replay not verified"
    record_part = (f"record {recorded:6.2f} s  " if recorded is not None else "")
    ratio_part = (f"record/replay {recorded / replayed:5.2f}x  " if recorded is not None else "")
    print(f"{name:34s} {record_part}replay {replayed:6.2f} s  {ratio_part}({result.events:,} events, "
          f"{result.instructions / replayed / 1e6:5.1f} M instructions/s replayed)")


def measure(figures: Figures, name: str, disks: list[Path], script: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "t.zst"
        start = time.perf_counter()
        outcome, _ = run_session(SessionOptions(engine="emu", disks=disks, script=script, trace=trace,
                                                timeout_s=600), output=io.BytesIO())
        recorded = time.perf_counter() - start
        measure_replay(figures, name, trace, recorded)


def measure_kvm_landmarks(rounds: int = 20) -> None:
    """Landmark search cost on kvm: replay the real-mode test guest, whose last interrupt was
    injected after a kick (between exits) and is found again by breakpoint + register match."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from replayvm.replay.replayer import Replayer
    from tests.harness import record_kvm_realmode_guest

    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "kvm.zst"
        record_kvm_realmode_guest(trace).engine.close()
        seek_times, hits = [], 0
        for _ in range(rounds):
            replayer = Replayer(trace)
            original = replayer._seek_landmark

            def timed_seek(event, original=original):
                start = time.perf_counter()
                original(event)
                seek_times.append(time.perf_counter() - start)

            replayer._seek_landmark = timed_seek
            assert replayer.run().verified
            hits += replayer.landmark_hits
            replayer.close()
    per = sum(seek_times) / len(seek_times)
    print(f"{'kvm landmark search (breakpoint + registers)':34s} {per * 1e6:8.1f} us per injection "
          f"({hits / len(seek_times):.1f} breakpoint hits each, {len(seek_times)} injections)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=named_trace, action="append", default=[], metavar="[NAME=]PATH",
                        help="replay this trace instead of recording the sessions (repeatable)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args()
    figures = Figures("replay")
    if args.trace:
        for name, trace in args.trace:
            measure_replay(figures, name, trace)
        figures.write(args.json)
        return
    demo = [bundled_demo_disk()]
    measure(figures, "demo: echo, date, disk", demo, b"echo hello\ndate\ndisk\n")
    measure(figures, "demo: spin 40 (CPU-bound)", demo, b"spin 40\n")
    try:
        measure_kvm_landmarks()
    except Exception as error:
        print(f"kvm landmark search: not measured ({error})")
    xv6 = os.environ.get("REPLAYVM_XV6_DIR")
    if xv6:
        d = Path(xv6)
        measure(figures, "xv6: ls, echo hello, cat README", [d / "xv6.img", d / "fs.img"],
                b"ls\necho hello\ncat README\n")
    else:
        print("xv6: REPLAYVM_XV6_DIR not set, skipped")
    figures.write(args.json)


if __name__ == "__main__":
    main()
