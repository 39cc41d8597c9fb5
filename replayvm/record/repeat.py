"""Recording a scripted session again and again until its console shows a bug: the Python API
behind `replayvm record --repeat K --until-fail PATTERN`.

Each run records into a temporary file next to the trace path and is told about in one line
(run k of K, its chaos seed, how it ended, whether it matched). Only a matching run's trace is
kept: it is renamed onto the trace path, so a run that did not match never replaces what was
there, and when no run matches no trace is left behind at all.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from replayvm.errors import GuestFault, UsageError
from replayvm.machine import Machine, RunOutcome
from replayvm.record.session import SessionOptions, check_trace_path, run_session


@dataclass
class RepeatResult:
    runs: int                            # how many runs were made
    matched_run: int | None              # 1-based number of the matching run, None if none matched
    seed: int | None                     # the matching run's chaos seed
    console: bytes                       # the matching run's console output (b"" if none matched)
    outcome: RunOutcome | None
    machine: Machine | None
    trace: Path | None                   # where the matching run's trace was kept


def record_until_match(options: SessionOptions, pattern: re.Pattern[bytes], runs: int, *,
                       first_seed: int | None = None,
                       report: Callable[[str], None] | None = None) -> RepeatResult:
    """Run the session of `options` up to `runs` times, stopping at the first run whose console
    output matches `pattern`. With `first_seed`, run k (from 0) records under chaos seed
    first_seed + k. `report` gets one line per run."""
    if runs < 1:
        raise ValueError("runs must be at least 1")
    if options.trace is not None:
        check_trace_path(options.trace)
    for run in range(runs):
        seed = None if first_seed is None else first_seed + run
        scratch = _scratch_trace(options.trace) if options.trace is not None else None
        captured = io.BytesIO()
        try:
            try:
                outcome, machine = run_session(replace(options, chaos_seed=seed, trace=scratch),
                                               output=captured)
                ended = outcome.reason
            except GuestFault as fault:
                outcome = machine = None
                ended = "guest fault: " + str(fault).splitlines()[0]
            console = captured.getvalue()
            matched = pattern.search(console) is not None
            if report is not None:
                chaos = f" (chaos seed {seed})" if seed is not None else ""
                report(f"run {run + 1} of {runs}{chaos}: {ended}, "
                       + ("matched" if matched else "no match"))
            if matched:
                if scratch is not None:
                    os.replace(scratch, options.trace)
                    scratch = None
                return RepeatResult(run + 1, run + 1, seed, console, outcome, machine, options.trace)
        finally:
            if scratch is not None:
                scratch.unlink(missing_ok=True)
    return RepeatResult(runs, None, None, b"", None, None, None)


def _scratch_trace(trace: Path) -> Path:
    """A new, hidden file in the trace's folder (so that keeping it is a rename, never a copy)."""
    trace = Path(trace)
    try:
        handle, name = tempfile.mkstemp(dir=trace.parent, prefix=f".{trace.name}.", suffix=".run")
    except OSError as error:
        raise UsageError(f"cannot write trace {trace}: {error.strerror or error}") from None
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)          # as a trace written directly would be, not mkstemp's 0600
    return Path(name)
