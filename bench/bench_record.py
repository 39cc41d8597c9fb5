"""Recording cost: the same guest and input run plain and recorded, in one run.

    python bench/bench_record.py [--runs N]

Prints: record overhead (recorded / plain wall time) for the demo guest and, with
REPLAYVM_XV6_DIR, for xv6 `ls` + `echo hello`; trace bytes per event; and the xv6 trace's size
beside QEMU's record/replay log of the same session when qemu-system-i386 is installed.
Uses the deterministic instruction clock so both runs execute the same instructions.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from replayvm.record.session import SessionOptions, run_session
from replayvm.trace.summary import summarize


def timed(options: SessionOptions) -> float:
    start = time.perf_counter()
    outcome, _ = run_session(options, output=io.BytesIO())
    assert outcome.reason == "script-done", outcome
    return time.perf_counter() - start


def compare(name: str, disks: list[Path], script: bytes, runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "t.zst"
        base = dict(engine="emu", disks=disks, script=script, virtual_clock=True, timeout_s=600)
        plain = [timed(SessionOptions(**base)) for _ in range(runs)]
        recorded = [timed(SessionOptions(**base, trace=trace)) for _ in range(runs)]
        summary = summarize(trace)
    p, r = statistics.median(plain), statistics.median(recorded)
    print(f"{name:28s} plain {p:6.3f} s  recorded {r:6.3f} s  overhead {r / p:5.2f}x  "
          f"trace {summary['file_bytes']:,} B, {summary['events']:,} events, "
          f"{summary['bytes_per_event']} B/event")
    return summary


def qemu_rr_log_bytes(xv6: Path, script: bytes) -> int | None:
    qemu = shutil.which("qemu-system-i386")
    if qemu is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "rr.bin"
        for name in ("xv6.img", "fs.img"):
            shutil.copy(xv6 / name, Path(tmp) / name)
        command = [qemu, "-accel", "tcg", "-nographic", "-no-reboot", "-smp", "1", "-m", "512",
                   "-icount", f"shift=auto,rr=record,rrfile={log}",
                   "-drive", f"file={tmp}/fs.img,if=none,id=d1,format=raw",
                   "-device", "ide-hd,drive=d1,bus=ide.0,unit=1",
                   "-drive", f"file={tmp}/xv6.img,if=none,id=d0,format=raw",
                   "-device", "ide-hd,drive=d0,bus=ide.0,unit=0"]
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        seen = b""
        lines = script.splitlines(keepends=True)
        deadline = time.monotonic() + 60
        prompts = 0
        while time.monotonic() < deadline:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
            if seen.count(b"$ ") > prompts:
                prompts = seen.count(b"$ ")
                if not lines:
                    break
                for ch in lines.pop(0):             # paced: QEMU's UART has no FIFO either
                    proc.stdin.write(bytes((ch,)))
                    proc.stdin.flush()
                    time.sleep(0.05)
        proc.kill()
        proc.wait()
        return log.stat().st_size if log.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from replayvm.record.session import bundled_demo_disk

    compare("demo: echo, race, disk", [bundled_demo_disk()], b"echo hello\nrace\ndisk\n", args.runs)
    xv6 = os.environ.get("REPLAYVM_XV6_DIR")
    if not xv6:
        print("xv6: REPLAYVM_XV6_DIR not set, skipped")
        return
    xv6_dir = Path(xv6)
    script = b"ls\necho hello\n"
    summary = compare("xv6: boot, ls, echo hello", [xv6_dir / "xv6.img", xv6_dir / "fs.img"], script, args.runs)
    qemu_bytes = qemu_rr_log_bytes(xv6_dir, script)
    if qemu_bytes is None:
        print("qemu record/replay log: qemu-system-i386 not installed (or no log), skipped")
        return

    print(f"{'QEMU rr log, same session':28s} {qemu_bytes:,} B raw (needs the disk images besides); "
          f"our self-contained trace {summary['file_bytes']:,} B")


if __name__ == "__main__":
    main()
