"""Seeking in a replay with checkpoints, against replaying from the start.

    python bench/bench_seek.py [--trace [NAME=]T ...] [--every N] [--reverse-steps N] [--json FILE]

Without --trace, records a long demo-guest session (the CPU-bound `spin` and a race; with
REPLAYVM_XV6_DIR, also an xv6 session: boot, ls, echo, cat README). For each trace it prints:
a plain replay's time; a first pass of the timeline to the end (taking checkpoints every N
instructions: their count, page-delta size and time); then a seek back to the middle, a seek to
3/4, a reverse-stepi there and a row of 300 more, keeping the checkpoints in a (temporary) cache, a seek to the middle on
a fresh timeline (which has to replay from the start), and one in a new timeline that loads the
kept checkpoints (what `replay --seek` costs the second time). Asserts nothing but that the
replay verifies. With --json, also writes the figures (wall and CPU seconds per metric, see
bench_figures.py) to FILE: what bench/compare_revisions.py compares between two trees.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

from bench_figures import Figures, named_trace
from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import replay
from replayvm.replay.timeline import DEFAULT_CHECKPOINT_EVERY, Timeline

REVERSE_ROW = 300           # reverse steps in a row after the lone one (gdb's reverse-next makes rows)


def measure(figures: Figures, name: str, trace: Path, every: int, reverse_steps: int = REVERSE_ROW) -> None:
    def timed(step: str, action):
        return figures.timed(f"seek {name}: {step}", action)

    plain, result = timed("plain replay", lambda: replay(trace))
    assert result.verified
    print(f"{name}: {result.instructions:,} instructions, {result.events:,} events, "
          f"{trace.stat().st_size:,} B trace")
    print(f"  plain replay, start to end              {plain:8.3f} s")
    opened, timeline = timed("open a timeline", lambda: Timeline(trace, checkpoint_every=every,
                                                                  keep_checkpoints=True))
    print(f"  open a timeline (RAM shadow, 1st ckpt)  {opened:8.3f} s")
    first, _ = timed("first pass to the end", lambda: timeline.seek(timeline.end))
    stats = timeline.checkpoints.stats
    print(f"  first pass to the end, with checkpoints {first:8.3f} s  ({stats.taken} checkpoints every "
          f"{every:,} instructions, {stats.delta_bytes / 2**20:.1f} MiB of page deltas, "
          f"{stats.take_seconds:.3f} s taking them: {first / plain:.2f}x a plain replay)")
    middle, three_quarters = timeline.end // 2, timeline.end * 3 // 4
    back, _ = timed("seek back to the middle", lambda: timeline.seek(middle))
    print(f"  seek back to the middle                 {back:8.3f} s  ({plain / back:.0f}x faster than "
          f"replaying to it)")
    forward, _ = timed("seek forward to 3/4", lambda: timeline.seek(three_quarters))
    print(f"  seek forward to 3/4                     {forward:8.3f} s")
    reverse, _ = timed("a lone reverse-stepi", timeline.reverse_step)
    print(f"  reverse-stepi there                     {reverse:8.3f} s  (a lone step: restore, re-execute)")
    row, _ = timed(f"{reverse_steps} more reverse-stepi",
                   lambda: [timeline.reverse_step() for _ in range(reverse_steps)])
    row_label = f"{reverse_steps} more reverse-stepi in a row"
    print(f"  {row_label:40s}{row:8.3f} s  ({row / max(reverse_steps, 1) * 1000:.1f} ms each, "
          f"through fine checkpoints; gdb's reverse-next makes such rows)")
    kept, _ = timed("keep the checkpoints", timeline.save_checkpoints)
    print(f"  keep the checkpoints in the cache       {kept:8.3f} s  "
          f"({timeline.checkpoint_file.stat().st_size / 2**20:.1f} MiB file)")
    timeline.close()
    fresh = Timeline(trace, checkpoint_every=every)
    cold, _ = timed("seek to the middle, fresh timeline", lambda: fresh.seek(middle))
    print(f"  seek to the middle on a fresh timeline  {cold:8.3f} s  (replays from the start)")
    fresh.close()

    def open_and_seek() -> tuple[Timeline, float]:
        opening = time.perf_counter()
        warm = Timeline(trace, checkpoint_every=every, keep_checkpoints=True)
        opened = time.perf_counter() - opening
        warm.seek(middle)
        return warm, opened

    new_run, (warm, reopened) = timed("new run with kept checkpoints", open_and_seek)
    print(f"  a new run with the kept checkpoints     {new_run:8.3f} s  (open and load "
          f"{reopened:.3f} s, seek {new_run - reopened:.3f} s: what `replay --seek` costs the second time)")
    warm.close()


def record(trace: Path, **options) -> None:
    outcome, _ = run_session(SessionOptions(engine="emu", trace=trace, timeout_s=600, **options),
                             output=io.BytesIO())
    assert outcome.reason == "script-done", outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=named_trace, action="append", default=[], metavar="[NAME=]PATH",
                        help="measure this trace instead of recording the sessions (repeatable)")
    parser.add_argument("--every", type=int, default=DEFAULT_CHECKPOINT_EVERY)
    parser.add_argument("--reverse-steps", type=int, default=REVERSE_ROW, metavar="N",
                        help=f"length of the row of reverse steps (default {REVERSE_ROW})")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args()
    figures = Figures("seek")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["REPLAYVM_CACHE"] = str(Path(tmp) / "cache")      # kept checkpoints go here
        if args.trace:
            for name, trace in args.trace:
                measure(figures, name, trace, args.every, args.reverse_steps)
            figures.write(args.json)
            return
        demo = Path(tmp) / "demo.zst"
        record(demo, script=b"spin 300\nrace\necho done\n")
        measure(figures, "demo: spin 300, race", demo, args.every, args.reverse_steps)
        xv6_dir = os.environ.get("REPLAYVM_XV6_DIR")
        if xv6_dir:
            xv6 = Path(tmp) / "xv6.zst"
            record(xv6, disks=[Path(xv6_dir) / "xv6.img", Path(xv6_dir) / "fs.img"],
                   script=b"ls\necho hello\ncat README\n")
            measure(figures, "xv6: boot, ls, echo hello, cat README", xv6, args.every, args.reverse_steps)
    figures.write(args.json)


if __name__ == "__main__":
    main()
