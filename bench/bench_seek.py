"""Seeking in a replay with checkpoints, against replaying from the start.

    python bench/bench_seek.py [--trace T] [--every N]

Without --trace, records a long demo-guest session (the CPU-bound `spin` and a race; with
REPLAYVM_XV6_DIR, also an xv6 session: boot, ls, echo, cat README). For each trace it prints:
a plain replay's time; a first pass of the timeline to the end (taking checkpoints every N
instructions: their count, page-delta size and time); then a seek back to the middle, a seek to
3/4, a reverse-stepi there and a row of 300 more, keeping the checkpoints in a (temporary) cache, a seek to the middle on
a fresh timeline (which has to replay from the start), and one in a new timeline that loads the
kept checkpoints (what `replay --seek` costs the second time). Asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import replay
from replayvm.replay.timeline import DEFAULT_CHECKPOINT_EVERY, Timeline


def timed(action) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def measure(name: str, trace: Path, every: int) -> None:
    plain, result = timed(lambda: replay(trace))
    assert result.verified
    print(f"{name}: {result.instructions:,} instructions, {result.events:,} events, "
          f"{trace.stat().st_size:,} B trace")
    print(f"  plain replay, start to end              {plain:8.3f} s")
    opened, timeline = timed(lambda: Timeline(trace, checkpoint_every=every, keep_checkpoints=True))
    print(f"  open a timeline (RAM shadow, 1st ckpt)  {opened:8.3f} s")
    first, _ = timed(lambda: timeline.seek(timeline.end))
    stats = timeline.checkpoints.stats
    print(f"  first pass to the end, with checkpoints {first:8.3f} s  ({stats.taken} checkpoints every "
          f"{every:,} instructions, {stats.delta_bytes / 2**20:.1f} MiB of page deltas, "
          f"{stats.take_seconds:.3f} s taking them: {first / plain:.2f}x a plain replay)")
    middle, three_quarters = timeline.end // 2, timeline.end * 3 // 4
    back, _ = timed(lambda: timeline.seek(middle))
    print(f"  seek back to the middle                 {back:8.3f} s  ({plain / back:.0f}x faster than "
          f"replaying to it)")
    forward, _ = timed(lambda: timeline.seek(three_quarters))
    print(f"  seek forward to 3/4                     {forward:8.3f} s")
    reverse, _ = timed(timeline.reverse_step)
    print(f"  reverse-stepi there                     {reverse:8.3f} s  (a lone step: restore, re-execute)")
    row, _ = timed(lambda: [timeline.reverse_step() for _ in range(300)])
    print(f"  300 more reverse-stepi in a row         {row:8.3f} s  ({row / 300 * 1000:.1f} ms each, "
          f"through fine checkpoints; gdb's reverse-next makes such rows)")
    kept, _ = timed(timeline.save_checkpoints)
    print(f"  keep the checkpoints in the cache       {kept:8.3f} s  "
          f"({timeline.checkpoint_file.stat().st_size / 2**20:.1f} MiB file)")
    timeline.close()
    fresh = Timeline(trace, checkpoint_every=every)
    cold, _ = timed(lambda: fresh.seek(middle))
    print(f"  seek to the middle on a fresh timeline  {cold:8.3f} s  (replays from the start)")
    fresh.close()
    reopened, warm = timed(lambda: Timeline(trace, checkpoint_every=every, keep_checkpoints=True))
    seek, _ = timed(lambda: warm.seek(middle))
    print(f"  a new run with the kept checkpoints     {reopened + seek:8.3f} s  (open and load "
          f"{reopened:.3f} s, seek {seek:.3f} s: what `replay --seek` costs the second time)")
    warm.close()


def record(trace: Path, **options) -> None:
    outcome, _ = run_session(SessionOptions(engine="emu", trace=trace, timeout_s=600, **options),
                             output=io.BytesIO())
    assert outcome.reason == "script-done", outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path)
    parser.add_argument("--every", type=int, default=DEFAULT_CHECKPOINT_EVERY)
    args = parser.parse_args()
    if args.trace:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["REPLAYVM_CACHE"] = tmp
            measure(str(args.trace), args.trace, args.every)
        return
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["REPLAYVM_CACHE"] = str(Path(tmp) / "cache")      # kept checkpoints go here
        demo = Path(tmp) / "demo.zst"
        record(demo, script=b"spin 300\nrace\necho done\n")
        measure("demo: spin 300, race", demo, args.every)
        xv6_dir = os.environ.get("REPLAYVM_XV6_DIR")
        if xv6_dir:
            xv6 = Path(tmp) / "xv6.zst"
            record(xv6, disks=[Path(xv6_dir) / "xv6.img", Path(xv6_dir) / "fs.img"],
                   script=b"ls\necho hello\ncat README\n")
            measure("xv6: boot, ls, echo hello, cat README", xv6, args.every)


if __name__ == "__main__":
    main()
