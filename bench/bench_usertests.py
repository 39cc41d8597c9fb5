"""xv6 `usertests` to ALL TESTS PASSED: recorded, replayed, and under QEMU TCG, in one run.

    REPLAYVM_XV6_DIR=/path/to/xv6 python bench/bench_usertests.py [--qemu-only] [--no-qemu]

Slow (minutes) and not in CI. Prints wall seconds for: recording on the emu engine (the wall
clock, as a user would record), replaying that trace verified, and `qemu-system-i386 -accel
tcg` running the same images to the same line (when installed); then the ratios record/QEMU
and replay/record, and the recording's instructions per second. Asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import replay

DONE = b"ALL TESTS PASSED"


def qemu_usertests(xv6: Path, timeout_s: float = 1800) -> float | None:
    """Seconds from QEMU's start to ALL TESTS PASSED, `usertests` typed at the first prompt."""
    qemu = shutil.which("qemu-system-i386")
    if qemu is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("xv6.img", "fs.img"):
            shutil.copy(xv6 / name, Path(tmp) / name)
        command = [qemu, "-accel", "tcg", "-nographic", "-no-reboot", "-smp", "1", "-m", "512",
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU run")
    parser.add_argument("--qemu-only", action="store_true", help="only the QEMU run")
    args = parser.parse_args()
    value = os.environ.get("REPLAYVM_XV6_DIR")
    if not value:
        print("REPLAYVM_XV6_DIR is not set: nothing to measure")
        return 0
    xv6 = Path(value)
    qemu = None if args.no_qemu else qemu_usertests(xv6)
    if qemu is not None:
        print(f"{'qemu-system-i386 -accel tcg':34s} {qemu:8.1f} s")
    elif not args.no_qemu:
        print("qemu-system-i386: not installed (or no ALL TESTS PASSED), comparison skipped")
    if args.qemu_only:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        disks = []
        for name in ("xv6.img", "fs.img"):
            shutil.copy(xv6 / name, Path(tmp) / name)
            disks.append(Path(tmp) / name)
        trace = Path(tmp) / "usertests.zst"
        out = io.BytesIO()
        start = time.perf_counter()
        outcome, machine = run_session(SessionOptions(engine="emu", disks=disks, script=b"usertests\n",
                                                      until=DONE, trace=trace, timeout_s=3600), output=out)
        recorded = time.perf_counter() - start
        if outcome.reason != "until":
            print(f"the recording did not reach {DONE.decode()}: {outcome}")
            return 1
        instructions = machine.engine.icount
        print(f"{'record (emu, wall clock)':34s} {recorded:8.1f} s  {instructions:,} instructions, "
              f"{instructions / recorded / 1e6:.0f} MIPS, trace {trace.stat().st_size:,} B")
        start = time.perf_counter()
        result = replay(trace)
        replayed = time.perf_counter() - start
        print(f"{'replay, verified' if result.verified else 'replay, NOT verified':34s} {replayed:8.1f} s")
    if qemu is not None:
        print(f"{'ratio record / qemu-tcg':34s} {recorded / qemu:8.2f}x")
    print(f"{'ratio replay / record':34s} {replayed / recorded:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
