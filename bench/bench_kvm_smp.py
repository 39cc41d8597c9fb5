"""Two CPUs on both engines against QEMU (issue 13): the smp64 test guest (guests/smp64, ours)
recorded with `--cpus 2` on kvm and on emu, each trace replayed, and `qemu-system-x86_64 -accel
tcg -smp 2` running the same kernel to the same line, in one run.

    python bench/bench_kvm_smp.py [--runs N] [--no-qemu]

Not in CI; asserts nothing. Prints, per configuration, the median and fastest of --runs (rounds
interleaved, so every configuration sees the same host load) of: the recording (wall seconds from
machine creation to the guest's end, trace written), the replay (verified), and for kvm the
exits, switches and switches made between exits (at a landmark). QEMU's figure is a whole
process, from its start until the guest prints its last line (QEMU has no replayvm debug-exit
port, so the process is then killed). emu runs on the wall clock like kvm, so the two engines
see the same guest time.
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

from replayvm.engines.probe import choose_engine
from replayvm.guests import guest_file
from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import replay
from replayvm.trace import Kind, TraceReader
from replayvm.trace.records import SWITCH
from replayvm.trace.summary import summarize

DONE = b"smp64: locked counter"             # the guest's last line begins so
RAM_MIB = 16


def switches_between_exits(trace: Path) -> int:
    """SWITCH records that carry a landmark (kvm switched after a CPU ran its time without exits)."""
    with TraceReader(trace) as reader:
        return sum(1 for record in reader if record[0] == Kind.SWITCH and SWITCH.get(record, "landmark"))


def record_and_replay(engine: str, trace: Path) -> dict:
    start = time.perf_counter()
    outcome, _ = run_session(SessionOptions(engine=engine, kernel=guest_file("smp64", "kernel.elf"),
                                            ram_mib=RAM_MIB, trace=trace, timeout_s=120, cpus=2),
                             output=io.BytesIO())
    recorded = time.perf_counter() - start
    if outcome.reason != "shutdown":
        return {"error": f"{engine}: the guest did not reach its end: {outcome.reason} {outcome.detail}"}
    start = time.perf_counter()
    result = replay(trace)
    replayed = time.perf_counter() - start
    summary = summarize(trace)
    return {"record": recorded, "replay": replayed, "verified": result.verified,
            "position": summary["final_position"], "unit": summary["position_unit"],
            "switches": summary["events_by_kind"].get("switch", 0),
            "landmarks": switches_between_exits(trace)}


def qemu_to_done() -> float | None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    command = [qemu, "-accel", "tcg", "-smp", "2", "-m", str(RAM_MIB), "-nographic", "-no-reboot",
               "-monitor", "none", "-serial", "stdio", "-kernel", str(guest_file("smp64", "kernel.elf"))]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = b""
    try:
        while DONE not in seen or not seen.split(DONE, 1)[1].count(b"\n"):
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return None
            seen += chunk
        return time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()


def line(name: str, values: list[float]) -> str:
    return f"{name:34s} median {statistics.median(values):6.3f} s  (fastest {min(values):.3f}, n={len(values)})"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-qemu", action="store_true")
    args = parser.parse_args()
    engines = ["emu"]
    kvm, why = choose_engine("auto", long_mode=True, cpus=2)
    if kvm == "kvm":
        engines.insert(0, "kvm")
    else:
        print(f"kvm: not usable here ({why}); emu only")
    results: dict[str, list[dict]] = {engine: [] for engine in engines}
    qemu: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            for engine in engines:
                outcome = record_and_replay(engine, Path(tmp) / f"{engine}-{run}.zst")
                if "error" in outcome:
                    print(outcome["error"])
                    return 1
                results[engine].append(outcome)
            if not args.no_qemu:
                seconds = qemu_to_done()
                if seconds is not None:
                    qemu.append(seconds)
    print(f"smp64, 2 CPUs, {args.runs} interleaved rounds (host: {os.cpu_count()} CPUs)")
    for engine, runs in results.items():
        print(line(f"{engine}: record", [r["record"] for r in runs]))
        print(line(f"{engine}: replay (verified {sum(r['verified'] for r in runs)}/{len(runs)})",
                   [r["replay"] for r in runs]))
        first = runs[0]
        print(f"{engine}: {statistics.median(r['position'] for r in runs):,.0f} {first['unit']} (median), "
              f"switches {min(r['switches'] for r in runs)}-{max(r['switches'] for r in runs)}"
              + (f", of them between exits {min(r['landmarks'] for r in runs)}-{max(r['landmarks'] for r in runs)}"
                 if engine == "kvm" else ""))
    if qemu:
        print(line("qemu-system-x86_64 -accel tcg -smp 2", qemu))
        for engine, runs in results.items():
            print(f"{engine} record / QEMU: {statistics.median(r['record'] for r in runs) / statistics.median(qemu):.2f}x")
    elif not args.no_qemu:
        print("QEMU: qemu-system-x86_64 not found (apt install qemu-system-x86), skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
