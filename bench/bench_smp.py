"""Several CPUs (issue 13): xv6 on 2 CPUs against 1 CPU, on the emu engine and under
`qemu-system-i386 -accel tcg -smp N`, in one run.

    REPLAYVM_XV6_DIR=/path/to/xv6 python bench/bench_smp.py [--runs N] [--no-usertests] [--no-qemu]

Slow (minutes) and not in CI; asserts nothing. Prints, for 1 and 2 CPUs:
- boot to `$ ` (wall seconds from machine creation, no trace; the median and fastest of --runs,
  interleaved with QEMU's, whose figure is a whole process);
- `usertests` to ALL TESTS PASSED: recorded (virtual clock, so both recordings are a fixed function
  of the images: a wall-clock 2-CPU run can meet xv6-public's create/unlink deadlock, README),
  the instructions of each CPU, the recording replayed verified, and QEMU's run to the same line.

QEMU runs its CPUs as threads in turns on one host thread too (TCG without MTTCG for i386 hosts
here is round robin), so 2 CPUs against 1 compares like with like. Wall times on a shared host
are noisy: say so beside the figures.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_boot import boot_to_prompt, qemu_boot_to_prompt
from bench_usertests import DONE, qemu_usertests, xv6_dir

from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import replay
from replayvm.trace.summary import summarize


def usertests(disks: list[Path], trace: Path, cpus: int) -> dict:
    """Record usertests on `cpus` CPUs (virtual clock), then replay the trace: seconds and counts."""
    start = time.perf_counter()
    outcome, machine = run_session(SessionOptions(engine="emu", disks=disks, script=b"usertests\n", until=DONE,
                                                  trace=trace, timeout_s=3600, cpus=cpus, virtual_clock=True),
                                   output=io.BytesIO())
    recorded = time.perf_counter() - start
    if outcome.reason != "until":
        return {"error": f"the recording did not reach {DONE.decode()}: {outcome.reason} {outcome.detail}"}
    summary = summarize(trace)
    start = time.perf_counter()
    result = replay(trace)
    replayed = time.perf_counter() - start
    return {"record": recorded, "replay": replayed, "verified": result.verified,
            "instructions": machine.engine.icount, "per_cpu": summary.get("cpu_instructions"),
            "switches": summary["events_by_kind"].get("switch", 0), "size": trace.stat().st_size}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3, help="boots per configuration (medians)")
    parser.add_argument("--no-usertests", action="store_true")
    parser.add_argument("--no-qemu", action="store_true")
    args = parser.parse_args()
    xv6 = xv6_dir()
    if xv6 is None:
        return 0
    qemu_here = not args.no_qemu and shutil.which("qemu-system-i386") is not None
    disks = [xv6 / "xv6.img", xv6 / "fs.img"]
    print("boot to '$ ' (wall seconds; median / fastest)")
    for cpus in (1, 2):
        ours, theirs, counts = [], [], []
        for _ in range(args.runs):
            elapsed, instructions = boot_to_prompt(disks, cpus=cpus)
            ours.append(elapsed)
            counts.append(instructions)
            if qemu_here:
                qemu = qemu_boot_to_prompt(xv6, cpus=cpus)
                if qemu is not None:
                    theirs.append(qemu)
        line = (f"  {cpus} CPU{'s' if cpus > 1 else ' '}  emu {statistics.median(ours):6.3f} / {min(ours):6.3f} s"
                f"  ({counts[0] / 1e6:.1f} M instructions)")
        if theirs:
            line += (f"   qemu -smp {cpus} {statistics.median(theirs):6.3f} / {min(theirs):6.3f} s"
                     f"   fastest emu / qemu {min(ours) / min(theirs):.2f}x")
        print(line, flush=True)
    if args.no_usertests:
        return 0
    print("usertests to ALL TESTS PASSED (wall seconds)")
    with tempfile.TemporaryDirectory() as tmp:
        copies = []
        for disk in disks:
            shutil.copy(disk, Path(tmp) / disk.name)
            copies.append(Path(tmp) / disk.name)
        for cpus in (1, 2):
            for disk in disks:                       # each recording from the pristine images
                shutil.copy(disk, Path(tmp) / disk.name)
            figures = usertests(copies, Path(tmp) / f"usertests{cpus}.zst", cpus)
            if "error" in figures:
                print(f"  {cpus} CPU(s): {figures['error']}")
                continue
            qemu = qemu_usertests(xv6, cpus=cpus) if qemu_here else None
            per_cpu = f", per CPU {', '.join(f'{n / 1e9:.2f} G' for n in figures['per_cpu'])}" \
                if figures["per_cpu"] else ""
            line = (f"  {cpus} CPU{'s' if cpus > 1 else ' '}  record {figures['record']:6.1f} s "
                    f"({figures['instructions'] / 1e9:.2f} G instructions{per_cpu}, {figures['switches']:,} "
                    f"switches, trace {figures['size'] / 2**20:.1f} MiB)  replay "
                    f"{'verified' if figures['verified'] else 'NOT VERIFIED'} {figures['replay']:6.1f} s")
            if qemu is not None:
                line += f"   qemu -smp {cpus} {qemu:6.1f} s   record / qemu {figures['record'] / qemu:.2f}x"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
