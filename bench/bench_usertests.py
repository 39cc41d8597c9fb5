"""xv6 `usertests` to ALL TESTS PASSED: recorded, replayed, and under QEMU TCG, in one run.

    REPLAYVM_XV6_DIR=/path/to/xv6 python bench/bench_usertests.py [--rounds N] [--qemu-only] [--no-qemu]

Slow (minutes) and not in CI. Prints wall seconds for: recording on the emu engine (the wall
clock, as a user would record), replaying that trace verified, and `qemu-system-i386 -accel
tcg` running the same images to the same line (when installed); then the ratios record/QEMU
and replay/record, and the recording's instructions per second. Asserts nothing.

With --rounds N (default 1) it records and replays N times, alternating, and prints the median
of each figure. Beside wall seconds it prints the CPU seconds of the thread that runs the guest
(`time.thread_time`): the recorder's trace compression runs on a thread of its own, and other
jobs on a shared host stretch wall time far more than this thread's CPU time, so replay/record
compares best in these.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import replay

DONE = b"ALL TESTS PASSED"


def qemu_usertests(xv6: Path, timeout_s: float = 1800, cpus: int = 1) -> float | None:
    """Seconds from QEMU's start to ALL TESTS PASSED, `usertests` typed at the first prompt
    (`-smp cpus`)."""
    qemu = shutil.which("qemu-system-i386")
    if qemu is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("xv6.img", "fs.img"):
            shutil.copy(xv6 / name, Path(tmp) / name)
        command = [qemu, "-accel", "tcg", "-nographic", "-no-reboot", "-smp", str(cpus), "-m", "512",
                   "-drive", f"file={tmp}/fs.img,index=1,media=disk,format=raw",
                   "-drive", f"file={tmp}/xv6.img,index=0,media=disk,format=raw"]
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        seen, typed = b"", False
        try:
            while DONE not in seen:
                if time.perf_counter() - start > timeout_s:
                    return None
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    return None
                seen += chunk
                if not typed and b"$ " in seen:
                    proc.stdin.write(b"usertests\n")
                    proc.stdin.flush()
                    typed = True
            return time.perf_counter() - start
        finally:
            proc.kill()
            proc.wait()


def xv6_dir() -> Path | None:
    """REPLAYVM_XV6_DIR, or None (and a line saying so) when it is not set."""
    value = os.environ.get("REPLAYVM_XV6_DIR")
    if not value:
        print("REPLAYVM_XV6_DIR is not set: nothing to measure")
        return None
    return Path(value)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU run")
    parser.add_argument("--qemu-only", action="store_true", help="only the QEMU run")
    parser.add_argument("--rounds", type=int, default=1, help="record and replay this many times (medians)")
    args = parser.parse_args()
    xv6 = xv6_dir()
    if xv6 is None:
        return 0
    qemu = None if args.no_qemu else qemu_usertests(xv6)
    if qemu is not None:
        print(f"{'qemu-system-i386 -accel tcg':34s} {qemu:8.1f} s")
    elif not args.no_qemu:
        print("qemu-system-i386: not installed (or no ALL TESTS PASSED), comparison skipped")
    if args.qemu_only:
        return 0
    records: list[tuple[float, float]] = []
    replays: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        disks = []
        for name in ("xv6.img", "fs.img"):
            shutil.copy(xv6 / name, Path(tmp) / name)
            disks.append(Path(tmp) / name)
        trace = Path(tmp) / "usertests.zst"
        for round_number in range(1, args.rounds + 1):
            start, thread_start = time.perf_counter(), time.thread_time()
            outcome, machine = run_session(SessionOptions(engine="emu", disks=disks, script=b"usertests\n",
                                                          until=DONE, trace=trace, timeout_s=3600),
                                           output=io.BytesIO())
            records.append((time.perf_counter() - start, time.thread_time() - thread_start))
            if outcome.reason != "until":
                print(f"the recording did not reach {DONE.decode()}: {outcome}")
                return 1
            instructions = machine.engine.icount
            size = trace.stat().st_size
            start, thread_start = time.perf_counter(), time.thread_time()
            result = replay(trace)
            replays.append((time.perf_counter() - start, time.thread_time() - thread_start))
            print(f"round {round_number}: record {records[-1][0]:.1f} s wall, {records[-1][1]:.1f} s CPU; "
                  f"replay{'' if result.verified else ' NOT VERIFIED'} {replays[-1][0]:.1f} s wall, "
                  f"{replays[-1][1]:.1f} s CPU", flush=True)
            if not result.verified:
                return 1
    recorded, recorded_cpu = (statistics.median(r[i] for r in records) for i in (0, 1))
    replayed, replayed_cpu = (statistics.median(r[i] for r in replays) for i in (0, 1))
    print(f"{'record (emu, wall clock)':34s} {recorded:8.1f} s  {instructions:,} instructions, "
          f"{instructions / recorded / 1e6:.0f} MIPS, trace {size:,} B")
    print(f"{'replay, verified':34s} {replayed:8.1f} s")
    if qemu is not None:
        print(f"{'ratio record / qemu-tcg':34s} {recorded / qemu:8.2f}x")
    print(f"{'ratio replay / record':34s} {replayed / recorded:8.2f}x  (wall)")
    print(f"{'ratio replay / record':34s} {replayed_cpu / recorded_cpu:8.2f}x  (CPU of the guest's thread: "
          f"{replayed_cpu:.1f} s / {recorded_cpu:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
