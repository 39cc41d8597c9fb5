"""A one-line progress bar for a terminal: records done and the percentage of a file read.

Our own, a few lines long, so that a verb shown on a terminal needs no extra dependency (the
`analyze` bar once imported tqdm, which replayvm does not depend on, and crashed on every tty).
Drawn on a text stream (stderr) with carriage returns, at most `REDRAWS_PER_S` times a second;
`close()` ends the line, so whatever is printed next (the summary) starts on a line of its own.
"""

from __future__ import annotations

import shutil
import time
from typing import TextIO

REDRAWS_PER_S = 10
MIN_BAR_CELLS = 10


class ProgressBar:
    """`label [#####.....]  42%  12,345 records` for `total_bytes` of input."""

    def __init__(self, stream: TextIO, total_bytes: int, *, label: str = "loading",
                 unit: str = "records") -> None:
        self.stream = stream
        self.total_bytes = max(total_bytes, 0)
        self.label = label
        self.unit = unit
        self.done = 0
        self.bytes_read = 0
        self._last_draw = float("-inf")
        self._drawn = False

    def update(self, done: int, bytes_read: int) -> None:
        """`done` records so far, `bytes_read` bytes of the input read; redrawn if it is time."""
        self.done, self.bytes_read = done, min(max(bytes_read, 0), self.total_bytes)
        now = time.monotonic()
        if now - self._last_draw >= 1 / REDRAWS_PER_S:
            self._last_draw = now
            self._draw()

    def line(self, width: int) -> str:
        """The bar as text, at most `width` characters."""
        fraction = self.bytes_read / self.total_bytes if self.total_bytes else 1.0
        tail = f" {fraction:4.0%}  {self.done:,} {self.unit}"
        cells = width - len(self.label) - len(tail) - 3
        if cells < MIN_BAR_CELLS:
            return f"{self.label}{tail}"[:width]
        filled = int(cells * fraction)
        return f"{self.label} [{'#' * filled}{'.' * (cells - filled)}]{tail}"

    def _draw(self) -> None:
        width = shutil.get_terminal_size().columns - 1     # never the last column: no line wrap
        self.stream.write("\r" + self.line(width))
        self.stream.flush()
        self._drawn = True

    def close(self, *, finished: bool = True) -> None:
        """End the bar's line: drawn full when `finished`, erased when the work failed."""
        if finished:
            self.bytes_read = self.total_bytes
            self._draw()
            self.stream.write("\n")
        elif self._drawn:
            self.stream.write("\r\x1b[K")                 # the error line gets a clean line
        self.stream.flush()
