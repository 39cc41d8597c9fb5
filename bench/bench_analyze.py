"""SQLite load throughput on a large synthetic trace.

    python bench/bench_analyze.py [--events N]     (default 5,000,000)

Writes a trace of N events with the real TraceWriter (a mix like an xv6 session: IDE status polls,
UART writes, sector reads as runs, LAPIC EOIs, timer interrupts), then loads it with
`replayvm.analyze.loader.load_trace` and prints rows/s end to end. Asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

from replayvm.analyze.loader import load_trace
from replayvm.trace import Kind, TraceWriter
from replayvm.trace.records import INTERRUPT, LAYOUTS, RUN, SECTOR

PIO_READ, PIO_WRITE, MMIO_WRITE = (LAYOUTS[kind].build for kind in (Kind.PIO_READ, Kind.PIO_WRITE, Kind.MMIO_WRITE))


def synthesize(path: Path, events: int) -> None:
    writer = TraceWriter(path, {"engine": "emu", "position_unit": "instructions", "ram_bytes": 1 << 28})
    sector = bytes(range(256)) * 2
    digest = hashlib.sha256(sector).digest()[:16]          # a sector record names its content
    writer.append(SECTOR.build(digest, sector))
    append = writer.append
    for i in range(events):
        r = i % 10
        if r < 4:
            append(PIO_READ(7, 0x1F7, 1, 0x58, 0x80102345, 0))
        elif r < 7:
            append(PIO_WRITE(20, 0x3F8, 1, 0x41 + i % 26, 0x80106000, 0))
        elif r == 7:
            append(RUN.build(3, 0x1F0, 4, 128, [digest], 0x80102400, 0))
        elif r == 8:
            append(MMIO_WRITE(50, 0xFEE000B0, 4, 0, 0x80102989, 0))
        else:
            append(INTERRUPT.build(1000, 32, "timer", 0x80104000, 3))
        if i & 0xFFFF == 0:
            writer.maybe_wake()
    writer.close({"position": events * 100})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=5_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trace, db = Path(tmp) / "big.zst", Path(tmp) / "big.db"
        start = time.perf_counter()
        synthesize(trace, args.events)
        written = time.perf_counter() - start
        print(f"synthesised {args.events:,} events in {written:.1f} s ({args.events / written:,.0f} events/s "
              f"through TraceWriter), {trace.stat().st_size:,} bytes")
        start = time.perf_counter()
        counts = load_trace(trace, db)
        elapsed = time.perf_counter() - start
        rows = sum(v for k, v in counts.items() if k != "trace_id")
        print(f"loaded {rows:,} rows in {elapsed:.1f} s: {rows / elapsed:,.0f} rows/s, "
              f"{args.events / elapsed:,.0f} events/s end to end (indexes built after the load)")


if __name__ == "__main__":
    main()
