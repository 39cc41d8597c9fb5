"""rustos (guests/rustos) on kvm and emu in the same run: boot to its prompt, and a CPU-bound
ring-3 loop.

    python bench/bench_rustos.py [--engines kvm,emu] [--rounds 200] [--iterations 1000000] [--runs 3]

Boot: wall seconds from machine creation to the shell's first prompt (a session whose script is
empty). Ring 3: the `user ROUNDS ITERATIONS` program (ROUNDS x ITERATIONS xorshift steps in
registers, 11 instructions a step, a system call after each round) recorded, then replayed;
prints wall seconds for each, how often the timer preempted the task, and how many timer
interrupts the kvm engine held back while ring-3 code ran (delivered at the task's next entry
into the kernel: see engines/kvm.py). MIPS: the ring-3 program's instructions over the session's
seconds less the boot's (both engines); on emu also every instruction the trace counted (kernel
included) over the whole session's seconds. Engines run one after the other, each run of each
engine before the next run, so both see the same host load. Prints figures; asserts nothing but
that the replays verify.
"""

from __future__ import annotations

import argparse
import io
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from replayvm.engines.base import HardwareDebugEngine
from replayvm.guests import guest_boot
from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import replay
from replayvm.trace import TraceReader

RAM_MIB = 64
INSTRUCTIONS_PER_STEP = 11      # guests/rustos/src/user.rs: 3 shifts, 3 xors, 3 moves, dec, jnz


@dataclass
class Figures:
    boots: list[float] = field(default_factory=list)
    records: list[float] = field(default_factory=list)
    replays: list[float] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)
    deferred: list[int] = field(default_factory=list)
    instructions: list[int] = field(default_factory=list)      # emu: the trace's count


def session(engine: str, script: bytes, trace: Path | None = None) -> tuple[float, str, object]:
    boot = guest_boot("rustos")
    out = io.BytesIO()
    start = time.perf_counter()
    _, machine = run_session(SessionOptions(engine=engine, kernel=boot.kernel, disks=list(boot.disks),
                                            script=script, trace=trace, ram_mib=RAM_MIB, timeout_s=600),
                             output=out)
    return time.perf_counter() - start, out.getvalue().decode(errors="replace"), machine


def traced_instructions(trace: Path) -> int:
    with TraceReader(trace) as reader:
        for _ in reader:
            pass
        return int(reader.footer.get("instructions") or 0)


def measure(engine: str, script: bytes, trace: Path, figures: Figures) -> None:
    seconds, _, _ = session(engine, b"")
    figures.boots.append(seconds)
    seconds, text, machine = session(engine, script, trace)
    figures.records.append(seconds)
    found = re.search(r"preempted (\d+) times", text)
    figures.preempted.append(int(found.group(1)) if found else -1)
    cpu = machine.engine
    figures.deferred.append(cpu.deferred_interrupts() if isinstance(cpu, HardwareDebugEngine) else 0)
    figures.instructions.append(traced_instructions(trace) if engine == "emu" else 0)
    start = time.perf_counter()
    result = replay(trace)
    figures.replays.append(time.perf_counter() - start)
    assert result.verified, "replay not verified"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="kvm,emu", help="comma-separated: kvm, emu")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    if not engines or set(engines) - {"kvm", "emu"}:
        parser.error("--engines: kvm, emu or both")
    guest_boot("rustos")                                   # build outside the timings
    figures = {engine: Figures() for engine in engines}
    script = f"user {args.rounds} {args.iterations}\n".encode()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            for engine in engines:
                measure(engine, script, Path(tmp) / f"rustos-{engine}.zst", figures[engine])
    steps = args.rounds * args.iterations
    program = steps * INSTRUCTIONS_PER_STEP
    for engine in engines:
        f = figures[engine]
        boot, record, replayed = (statistics.median(x) for x in (f.boots, f.records, f.replays))
        print(f"rustos on {engine}, median of {args.runs}")
        print(f"  boot to the prompt           {boot:7.2f} s")
        print(f"  ring 3: {steps:,} steps recorded {record:7.2f} s "
              f"(whole session, boot included), preempted {f.preempted} times, "
              f"{f.deferred} ticks held to the next kernel entry")
        print(f"  ring 3: replayed             {replayed:7.2f} s")
        ring3_s = record - boot
        if ring3_s > 0:
            print(f"  ring 3: {program / ring3_s / 1e6:,.0f} MIPS recording "
                  f"({program:,} program instructions over the session less the boot)")
        if engine == "emu":
            counted = statistics.median(f.instructions)
            print(f"  all instructions counted     {counted:,.0f}: {counted / record / 1e6:,.0f} MIPS "
                  f"recording, {counted / replayed / 1e6:,.0f} MIPS replaying")


if __name__ == "__main__":
    main()
