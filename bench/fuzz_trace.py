"""Fuzz the trace readers: thousands of seeded mutants through info, analyze and replay.

    python bench/fuzz_trace.py [--mutants N] [--sample-mutants M] [--seed S]
                                                            (REPLAYVM_XV6_DIR adds an xv6 trace)

Traces: the tiny echo guest of tests/fuzzing.py (a replay takes milliseconds), a demo-guest
session and, with REPLAYVM_XV6_DIR, an xv6 session (both recorded here with the virtual clock,
format 1.1), and the 0.1.0 sample `traces/0.1.0/demo-shell.zst` (format 1.0: no record digest).
Mutants (tests/fuzzing.py): raw byte flips, truncations, insertions, deletions; records re-encoded
with valid frame checksums (fields, types, kinds, arities, records dropped, duplicated, swapped);
and well-typed tampering of what the guest saw (read values, interrupt vectors and positions,
typed bytes, clock values). Every mutant goes through the Python APIs of all three verbs. A
replay is bounded by position (twice the recording's length plus a million), never by wall time:
one that reaches the bound counts as a hang.

Prints per trace the outcomes per verb and the counts that must all be 0: tracebacks, errors of
more than one line, hangs, tampered-but-verified; then the peak memory of this process. Exits 1
when any of them is not 0.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fuzzing import Tally, mutants, record_echo_trace, run_verbs  # noqa: E402


def record(directory: Path, name: str, script: bytes, disks: list[Path] | None = None) -> Path:
    from replayvm.record.session import SessionOptions, run_session

    trace = directory / f"{name}.zst"
    outcome, _ = run_session(SessionOptions(engine="emu", disks=disks or [], script=script, trace=trace,
                                            virtual_clock=True, timeout_s=600), output=io.BytesIO())
    assert outcome.reason == "script-done", outcome
    return trace


def fuzz(name: str, trace: Path, count: int, seed: int, work: Path, tamper_share: float) -> Tally:
    from replayvm.trace.summary import summarize

    end = summarize(trace)["position_at_end"]
    bound = 2 * end + 1_000_000
    tally = Tally()
    started = time.perf_counter()
    for n, mutant in enumerate(mutants(trace.read_bytes(), seed=seed, count=count, tamper_share=tamper_share)):
        path = work / f"{name}-{n}.zst"
        path.write_bytes(mutant.data)
        tally.add(mutant, run_verbs(path, work / f"{name}-{n}.db", bound))
        path.unlink()
    elapsed = time.perf_counter() - started
    print(f"{name}: {tally.mutants:,} mutants ({tally.tampered:,} tampered) in {elapsed:.0f} s; "
          f"tracebacks {len(tally.tracebacks)}, multi-line errors {len(tally.multiline)}, "
          f"hangs {len(tally.hangs)}, tampered-but-verified {len(tally.tampered_verified)}")
    for verb, outcomes in tally.outcomes.items():
        print(f"  {verb:8s} " + ", ".join(f"{k} {v:,}" for k, v in sorted(outcomes.items())))
    for line in (tally.tracebacks + tally.multiline + tally.hangs + tally.tampered_verified)[:10]:
        print(f"  ! {line}")
    sys.stdout.flush()
    return tally


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mutants", type=int, default=2000, help="per trace (default 2000)")
    parser.add_argument("--sample-mutants", type=int, default=300,
                        help="of the 0.1.0 sample, whose mutants all replay: no digest (default 300)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        traces = [("echo", record_echo_trace(work), 0.25, args.mutants),
                  ("demo", record(work, "demo", b"echo hello\n"), 0.25, args.mutants),
                  ("demo-0.1.0", ROOT / "traces" / "0.1.0" / "demo-shell.zst", 0.0, args.sample_mutants)]
        xv6 = os.environ.get("REPLAYVM_XV6_DIR")
        if xv6:
            traces.append(("xv6", record(work, "xv6", b"echo hi\n",
                                         [Path(xv6) / "xv6.img", Path(xv6) / "fs.img"]), 0.25, args.mutants))
        for i, (name, trace, tamper_share, count) in enumerate(traces):
            # A format 1.0 trace has no record digest: its tampered mutants could replay verified
            # when the guest ignores the change, so it is fuzzed for robustness only.
            tally = fuzz(name, trace, count, args.seed + i, work, tamper_share)
            failures += len(tally.tracebacks) + len(tally.multiline) + len(tally.hangs) + \
                len(tally.tampered_verified)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS of this process) {peak:,.0f} MiB")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
