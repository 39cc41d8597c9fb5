"""CPU-bound guest code on the emu engine: the demo's `spin` run plain, recorded and replayed.

    python bench/bench_spin.py [--spin 40] [--runs 3] [--reference]

The demo guest's `spin N` is a compute loop (no stores to speak of, no device access while it
runs). The session runs on the virtual clock, so every run executes the same instructions; it
prints wall seconds and millions of instructions per second (MIPS, whole process: the boot and
prompt included) for a plain run (no trace), a recording and its verified replay, then the
recording overhead (record / plain) and replay / record. `--reference` also measures the engine
with REPLAYVM_EMU_REFERENCE=1 (the per-instruction hook everywhere) in the same run.
Prints figures; asserts nothing but that the replay verifies.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import replay


def timed_session(script: bytes, trace: Path | None) -> tuple[float, int]:
    """Wall seconds and instructions of one session on the virtual clock."""
    start = time.perf_counter()
    _, machine = run_session(SessionOptions(script=script, virtual_clock=True, trace=trace), io.BytesIO())
    elapsed = time.perf_counter() - start
    instructions = machine.engine.icount
    machine.close()
    return elapsed, instructions


def measure(label: str, script: bytes, runs: int) -> None:
    plain, record, replayed = [], [], []
    instructions = 0
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "spin.zst"
        for _ in range(runs):
            seconds, instructions = timed_session(script, None)
            plain.append(seconds)
            seconds, _ = timed_session(script, trace)
            record.append(seconds)
            start = time.perf_counter()
            result = replay(trace)
            replayed.append(time.perf_counter() - start)
            assert result.verified, "replay not verified"
    p, r, y = (statistics.median(x) for x in (plain, record, replayed))
    mips = instructions / 1e6
    print(f"{label}: {instructions:,} instructions, median of {runs}")
    print(f"  plain run  {p:7.2f} s  {mips / p:6.0f} MIPS")
    print(f"  record     {r:7.2f} s  {mips / r:6.0f} MIPS   overhead record/plain {r / p:5.2f}x")
    print(f"  replay     {y:7.2f} s  {mips / y:6.0f} MIPS   replay/record {y / r:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spin", type=int, default=40, help="the demo's spin argument")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reference", action="store_true",
                        help="also measure REPLAYVM_EMU_REFERENCE=1 (per-instruction counting)")
    args = parser.parse_args()
    script = f"spin {args.spin}\n".encode()
    measure(f"demo spin {args.spin}, emu engine", script, args.runs)
    if args.reference:
        os.environ["REPLAYVM_EMU_REFERENCE"] = "1"
        try:
            measure(f"demo spin {args.spin}, REPLAYVM_EMU_REFERENCE=1", script, args.runs)
        finally:
            del os.environ["REPLAYVM_EMU_REFERENCE"]


if __name__ == "__main__":
    main()
