"""TraceWriter: cheap appends on the VMM thread, frames packed and written by a flusher thread.

Crash safety: a complete zstd frame (with its length and CRC) is written at least every
`flush_interval_s` (100 ms) and whenever `flush_every` records are waiting, so a recorder killed
at any moment leaves a file readable up to its last frame. Appends go to a deque (thread-safe
append/popleft), so the hot path takes no lock.

The writer never writes what the reader refuses: a frame is cut before its body passes
FRAME_BODY_TARGET (far below both frame limits), the header and footer are checked against their
layouts before they are written (over-long strings cut), and the recorder splits long runs (see
replayvm.record.recorder). The footer goes alone in the last frame with the record digest: the
sha256 of the file header and every frame body before it (format 1.1), computed here as the frames
are packed, so that a reader can tell a trace altered after recording.
"""

from __future__ import annotations

import hashlib
import os
import threading
import zlib
from collections import deque
from pathlib import Path
from typing import Any

import msgpack
import zstandard

from replayvm.trace.format import (BRANCH_MAJOR, BRANCH_MINOR, FEATURES_MAJOR, FEATURES_MINOR, FILE_HEADER, FORMAT_MAJOR,
                                   FORMAT_MINOR, FRAME_BODY_TARGET, FRAME_HEADER, MAGIC, MAX_FRAME_COMPRESSED)
from replayvm.trace.records import FOOTER, FOOTER_FIELDS, HEADER, HEADER_FIELDS, fit_map

ZSTD_LEVEL = 3
MAX_RECORDS_PER_FRAME = 200_000


def format_version(header: dict[str, Any]) -> tuple[int, int]:
    """The oldest format that says what a reader must know to replay this header's trace: 3.0 if
    it names machine features, 2.0 for a branch (it starts inside another trace), else 1.x."""
    if header.get("features"):
        return FEATURES_MAJOR, FEATURES_MINOR
    if "parent" in header:
        return BRANCH_MAJOR, BRANCH_MINOR
    return FORMAT_MAJOR, FORMAT_MINOR


class TraceWriter:
    def __init__(self, path: Path, header: dict[str, Any], *, flush_interval_s: float = 0.1,
                 flush_every: int = 50_000) -> None:
        self.path = Path(path)
        header = fit_map(header, HEADER_FIELDS, "header")     # ValueError before anything is written
        file_header = FILE_HEADER.pack(MAGIC, *format_version(header))
        self._file = open(self.path, "wb")
        self._file.write(file_header)
        self._digest = hashlib.sha256(file_header)
        self._queue: deque = deque()
        self.append = self._queue.append            # the hot path: writer.append(LAYOUT.build(...))
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
        self.append(HEADER.build(header))
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
            pack = self._packer.pack
            popleft = queue.popleft
            while queue:
                packed = [pack(popleft()) for _ in range(min(len(queue), MAX_RECORDS_PER_FRAME))]
                if sum(map(len, packed)) <= FRAME_BODY_TARGET:
                    self._write_body(b"".join(packed), len(packed))
                    continue
                start, size = 0, 0                   # big records: frames of at most the target
                for i, data in enumerate(packed):
                    if size and size + len(data) > FRAME_BODY_TARGET:
                        self._write_body(b"".join(packed[start:i]), i - start)
                        start, size = i, 0
                    size += len(data)
                self._write_body(b"".join(packed[start:]), len(packed) - start)

    def _write_body(self, body: bytes, count: int) -> None:
        compressed = self._compressor.compress(body)
        if len(compressed) > MAX_FRAME_COMPRESSED:    # cannot happen below FRAME_BODY_TARGET
            raise ValueError("trace frame too large")
        self._file.write(FRAME_HEADER.pack(len(compressed), zlib.crc32(compressed)))
        self._file.write(compressed)
        self._file.flush()                          # to the OS: survives the process being killed
        self._digest.update(body)
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
        try:
            self._write_frame()
            if footer is not None and self.error is None:
                footer = fit_map({k: v for k, v in footer.items() if k != "trace_sha256"}, FOOTER_FIELDS,
                                 "footer")
                footer["trace_sha256"] = self._digest.hexdigest()     # of everything before it
                with self._lock:
                    self._write_body(self._packer.pack(FOOTER.build(footer)), 1)
        finally:
            self._file.close()
        if self.error is not None:
            raise self.error

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def file_size(path: Path) -> int:
    return os.stat(path).st_size
