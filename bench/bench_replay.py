"""Replay speed against recording speed, for the same sessions.

    python bench/bench_replay.py

Records each session once (wall clock, as a user would), then replays it; prints both wall
times and the ratio record/replay (above 1 means replay is faster: idle waiting is skipped).
Sessions: the demo guest with typed input, the demo CPU-bound `spin`, and with
REPLAYVM_XV6_DIR the xv6 session `ls`, `echo hello`, `cat README`.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

from replayvm.record.session import SessionOptions, bundled_demo_disk, run_session
from replayvm.replay.replayer import replay


def measure(name: str, disks: list[Path], script: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "t.zst"
        start = time.perf_counter()
        outcome, _ = run_session(SessionOptions(engine="emu", disks=disks, script=script, trace=trace,
                                                timeout_s=600), output=io.BytesIO())
        recorded = time.perf_counter() - start
        start = time.perf_counter()
        result = replay(trace)
        replayed = time.perf_counter() - start
    assert result.verified
    print(f"{name:34s} record {recorded:6.2f} s  replay {replayed:6.2f} s  "
          f"record/replay {recorded / replayed:5.2f}x  ({result.events:,} events, "
          f"{result.instructions / replayed / 1e6:5.1f} M instructions/s replayed)")


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
    demo = [bundled_demo_disk()]
    measure("demo: echo, date, disk", demo, b"echo hello\ndate\ndisk\n")
    measure("demo: spin 40 (CPU-bound)", demo, b"spin 40\n")
    try:
        measure_kvm_landmarks()
    except Exception as error:
        print(f"kvm landmark search: not measured ({error})")
    xv6 = os.environ.get("REPLAYVM_XV6_DIR")
    if xv6:
        d = Path(xv6)
        measure("xv6: ls, echo hello, cat README", [d / "xv6.img", d / "fs.img"], b"ls\necho hello\ncat README\n")
    else:
        print("xv6: REPLAYVM_XV6_DIR not set, skipped")


if __name__ == "__main__":
    main()
