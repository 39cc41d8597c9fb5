"""Machine-readable figures for the bench scripts (`--json FILE`), beside their human output.

bench/compare_revisions.py runs the same bench scripts against two trees and compares what they
write here, metric by metric. Each figure is timed twice: wall time (what a user waits) and the
process's CPU time (user + system, all threads), which moves less when other jobs share the cores.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

Result = TypeVar("Result")


class Figures:
    """Named timings gathered during one bench run, written as one JSON document."""

    def __init__(self, bench: str) -> None:
        self.bench = bench
        self.metrics: dict[str, dict[str, float]] = {}

    def timed(self, metric: str | None, action: Callable[[], Result]) -> tuple[float, Result]:
        """Run `action`; keep its wall and CPU seconds under `metric` (None: do not keep them).
        Returns the wall seconds (what the human output prints) and the action's result."""
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        result = action()
        wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
        if metric is not None:
            self.metrics[metric] = {"wall_s": wall, "cpu_s": cpu}
        return wall, result

    def write(self, path: Path | None) -> None:
        """Write the figures to `path` (nothing without one), naming the replayvm that ran."""
        if path is None:
            return
        import replayvm

        document: dict[str, Any] = {
            "bench": self.bench,
            "replayvm_file": str(Path(replayvm.__file__).resolve()),
            "replayvm_version": getattr(replayvm, "__version__", None),
            "python": platform.python_version(),
            "metrics": self.metrics,
        }
        path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


def named_trace(text: str) -> tuple[str, Path]:
    """Parse a `--trace [NAME=]PATH` argument: the name labels its figures (default: the path)."""
    name, separator, path = text.partition("=")
    if not separator:
        return text, Path(text)
    return name, Path(path)
