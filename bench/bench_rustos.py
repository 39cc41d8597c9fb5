"""rustos (guests/rustos) on an engine: boot to its prompt, and a CPU-bound ring-3 loop.

    python bench/bench_rustos.py [--engine kvm|emu] [--rounds 200] [--iterations 1000000] [--runs 3]

Boot: wall seconds from machine creation to the shell's first prompt (a session whose script is
empty). Ring 3: the `user ROUNDS ITERATIONS` program (ROUNDS x ITERATIONS xorshift steps in
registers, a system call after each round) recorded, then replayed; prints wall seconds for each,
how often the timer preempted the task, and how many timer interrupts the kvm engine held back
while ring-3 code ran (delivered at the task's next entry into the kernel: see engines/kvm.py).
Prints figures; asserts nothing but that the replay verifies.
"""

from __future__ import annotations

import argparse
import io
import re
import statistics
import tempfile
import time
from pathlib import Path

from replayvm.engines.base import HardwareDebugEngine
from replayvm.guests import guest_boot
from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import replay

RAM_MIB = 64


def session(engine: str, script: bytes, trace: Path | None = None) -> tuple[float, str, object]:
    boot = guest_boot("rustos")
    out = io.BytesIO()
    start = time.perf_counter()
    _, machine = run_session(SessionOptions(engine=engine, kernel=boot.kernel, disks=list(boot.disks),
                                            script=script, trace=trace, ram_mib=RAM_MIB, timeout_s=600),
                             output=out)
    return time.perf_counter() - start, out.getvalue().decode(errors="replace"), machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("kvm", "emu"), default="kvm")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    guest_boot("rustos")                                   # build outside the timings
    boots, records, replays, preempted, deferred = [], [], [], [], []
    script = f"user {args.rounds} {args.iterations}\n".encode()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "rustos.zst"
        for _ in range(args.runs):
            seconds, _, _ = session(args.engine, b"")
            boots.append(seconds)
            seconds, text, machine = session(args.engine, script, trace)
            records.append(seconds)
            found = re.search(r"preempted (\d+) times", text)
            preempted.append(int(found.group(1)) if found else -1)
            engine = machine.engine
            deferred.append(engine.deferred_interrupts() if isinstance(engine, HardwareDebugEngine) else 0)
            start = time.perf_counter()
            result = replay(trace)
            replays.append(time.perf_counter() - start)
            assert result.verified, "replay not verified"
    steps = args.rounds * args.iterations
    print(f"rustos on {args.engine}, median of {args.runs}")
    print(f"  boot to the prompt           {statistics.median(boots):7.2f} s")
    print(f"  ring 3: {steps:,} steps recorded {statistics.median(records):7.2f} s "
          f"(whole session, boot included), preempted {preempted} times, "
          f"{deferred} ticks held to the next kernel entry")
    print(f"  ring 3: replayed             {statistics.median(replays):7.2f} s")


if __name__ == "__main__":
    main()
