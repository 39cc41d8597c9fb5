"""TraceWriter: cheap appends on the VMM thread, frames packed and written by a flusher thread.

Crash safety: a complete zstd frame (with its length and CRC) is written at least every
`flush_interval_s` (100 ms) and whenever `flush_every` records are waiting, so a recorder killed
at any moment leaves a file readable up to its last frame. Appends go to a deque (thread-safe
append/popleft), so the hot path takes no lock.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections import deque
from pathlib import Path
from typing import Any

import msgpack
import zstandard

from replayvm.trace.format import (FILE_HEADER, FORMAT_MAJOR, FORMAT_MINOR, FRAME_HEADER, MAGIC,
                                   MAX_FRAME_COMPRESSED, Kind)

ZSTD_LEVEL = 3
MAX_RECORDS_PER_FRAME = 200_000


class TraceWriter:
    def __init__(self, path: Path, header: dict[str, Any], *, flush_interval_s: float = 0.1,
                 flush_every: int = 50_000) -> None:
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._file.write(FILE_HEADER.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR))
        self._queue: deque = deque()
        self.append = self._queue.append            # the hot path: writer.append((kind, ...))
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self._packer = msgpack.Packer(use_bin_type=True)
        self._flush_interval_s = flush_interval_s
        self._flush_every = flush_every
        self._wake = threading.Event()
        self._closed = False
        self._lock = threading.Lock()              # one frame written at a time
        self.frames = 0
        self.records = 0
        self.bytes_written = FILE_HEADER.size
        self.error: BaseException | None = None
        self.append((Kind.HEADER, header))
        self._write_frame()                        # the header is on disk before anything runs
        self._thread = threading.Thread(target=self._flush_loop, name="trace-flusher", daemon=True)
        self._thread.start()

    def maybe_wake(self) -> None:
        """Called now and then by the producer: wake the flusher early when much is waiting."""
        if len(self._queue) >= self._flush_every:
            self._wake.set()

    def _flush_loop(self) -> None:
        while not self._closed:
            self._wake.wait(self._flush_interval_s)
            self._wake.clear()
            try:
                self._write_frame()
            except BaseException as error:          # keep the error for close() to report
                self.error = error
                return

    def _write_frame(self) -> None:
        with self._lock:
            queue = self._queue
            while queue:
                count = min(len(queue), MAX_RECORDS_PER_FRAME)
                pack = self._packer.pack
                body = b"".join(pack(queue.popleft()) for _ in range(count))
                compressed = self._compressor.compress(body)
                if len(compressed) > MAX_FRAME_COMPRESSED:
                    raise ValueError("trace frame too large")
                self._file.write(FRAME_HEADER.pack(len(compressed), zlib.crc32(compressed)))
                self._file.write(compressed)
                self._file.flush()                  # to the OS: survives the process being killed
                self.frames += 1
                self.records += count
                self.bytes_written += FRAME_HEADER.size + len(compressed)

    def flush(self) -> None:
        self._write_frame()

    def close(self, footer: dict[str, Any] | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join()
        if footer is not None:
            self.append((Kind.FOOTER, footer))
        self._write_frame()
        self._file.close()
        if self.error is not None:
            raise self.error

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def file_size(path: Path) -> int:
    return os.stat(path).st_size
