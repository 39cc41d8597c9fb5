"""Boot-to-prompt times: the demo guest and (when REPLAYVM_XV6_DIR is set) xv6 on the emu engine,
and xv6 under `qemu-system-i386 -accel tcg` when QEMU is installed — the same run, as a ratio.

    python bench/bench_boot.py [--runs N]

Prints figures; asserts nothing. Boot-to-prompt is wall time from machine creation until the
console first shows the prompt (`$ `), process start-up excluded.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from replayvm.console import Console
from replayvm.machine import Machine, MachineConfig
from replayvm.record.session import bundled_demo_disk


def boot_to_prompt(disks: list[Path], engine: str = "emu", prompt: bytes = b"$ ", cpus: int = 1,
                   ) -> tuple[float, int]:
    console = Console(io.BytesIO(), until=prompt)
    start = time.perf_counter()
    machine = Machine(MachineConfig(disks=disks, engine=engine, cpus=cpus), console)
    outcome = machine.run(timeout_s=120)
    elapsed = time.perf_counter() - start
    machine.close()
    if outcome.reason != "until":
        raise RuntimeError(f"no prompt: {outcome}")
    return elapsed, machine.engine.icount or 0


def qemu_boot_to_prompt(xv6: Path, cpus: int = 1) -> float | None:
    qemu = shutil.which("qemu-system-i386")
    if qemu is None:
        return None
    command = [qemu, "-accel", "tcg", "-nographic", "-no-reboot", "-smp", str(cpus), "-m", "512",
               "-drive", f"file={xv6 / 'fs.img'},index=1,media=disk,format=raw,snapshot=on",
               "-drive", f"file={xv6 / 'xv6.img'},index=0,media=disk,format=raw,snapshot=on"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen = b""
    try:
        while b"$ " not in seen:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return None
            seen += chunk
        return time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()


def report(name: str, times: list[float], extra: str = "") -> float:
    median = statistics.median(times)
    print(f"{name:40s} median {median:7.3f} s  (min {min(times):.3f}, max {max(times):.3f}, n={len(times)}){extra}")
    return median


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    demo = bundled_demo_disk()
    runs = [boot_to_prompt([demo]) for _ in range(args.runs)]
    report("demo guest boot-to-prompt (emu)", [t for t, _ in runs], f"  {runs[0][1]:,} instructions")
    xv6 = os.environ.get("REPLAYVM_XV6_DIR")
    if not xv6:
        print("xv6: REPLAYVM_XV6_DIR not set, skipped")
        return
    xv6_dir = Path(xv6)
    # Interleaved, ours then QEMU's in each round: the host's memory state (a first touch of
    # fresh guest RAM costs much here, and varies) then weighs on both alike.
    runs, qemu_times = [], []
    for _ in range(args.runs):
        runs.append(boot_to_prompt([xv6_dir / "xv6.img", xv6_dir / "fs.img"]))
        qemu_times.append(qemu_boot_to_prompt(xv6_dir))
    ours = report("xv6 boot-to-prompt (emu)", [t for t, _ in runs], f"  {runs[0][1]:,} instructions")
    if None in qemu_times:
        print("qemu-system-i386: not installed (or no prompt), comparison skipped")
        return
    theirs = report("xv6 boot-to-prompt (qemu -accel tcg)", qemu_times)
    print(f"{'ratio emu / qemu-tcg':40s} {ours / theirs:7.2f}x  (of the fastest runs: "
          f"{min(t for t, _ in runs) / min(qemu_times):.2f}x)")

if __name__ == "__main__":
    sys.exit(main())
