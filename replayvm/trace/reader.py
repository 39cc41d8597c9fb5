"""TraceReader: stream a trace's records, treating the file as untrusted input.

Every problem is a TraceFormatError with one line naming it and where it is (byte offset, frame
index). A file cut short inside its last frame (a recorder that was killed) is not an error: the
complete frames before it are read and `truncated` says where the readable part ends.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import msgpack
import zstandard

from replayvm.trace.format import (FILE_HEADER, FORMAT_MAJOR, FRAME_HEADER, MAGIC, MAX_ARRAY_LEN,
                                   MAX_BIN_LEN, MAX_FRAME_COMPRESSED, MAX_FRAME_DECOMPRESSED,
                                   MAX_MAP_LEN, MAX_STR_LEN, OPTIONAL_KIND_MIN, Kind,
                                   TraceFormatError)

KNOWN_KINDS = {int(k) for k in Kind}
UNPACK_ERRORS = (msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError,
                 msgpack.exceptions.StackError, ValueError)


class TraceReader:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._file: BinaryIO = open(self.path, "rb")
        except OSError as error:
            raise TraceFormatError(f"cannot open trace {self.path}: {error.strerror}") from None
        raw = self._file.read(FILE_HEADER.size)
        if len(raw) < FILE_HEADER.size or raw[:len(MAGIC)] != MAGIC:
            self._file.close()
            raise TraceFormatError(f"{self.path}: not a replayvm trace (bad magic at byte 0)")
        _, self.major, self.minor = FILE_HEADER.unpack(raw)
        if self.major != FORMAT_MAJOR:
            newer = "newer" if self.major > FORMAT_MAJOR else "older"
            self._file.close()
            raise TraceFormatError(f"{self.path}: trace format {self.major}.{self.minor} is {newer} than "
                                   f"this replayvm reads ({FORMAT_MAJOR}.x); "
                                   f"{'upgrade replayvm' if newer == 'newer' else 'use an older replayvm'}")
        self.truncated = False
        self.truncated_at: int | None = None
        self.frames_read = 0
        self._decompressor = zstandard.ZstdDecompressor()
        self.header: dict[str, Any] = {}
        self.footer: dict[str, Any] | None = None
        self._current: tuple[int, int, Iterator] | None = None
        self._iter = self._records()
        first = next(self._iter, None)
        if first is None and self.truncated:
            raise TraceFormatError(f"{self.path}: truncated before its header was complete "
                                   f"(frame 0 at byte {FILE_HEADER.size} is cut short)")
        if first is None or first[0] != Kind.HEADER or not isinstance(first[1], dict):
            raise TraceFormatError(f"{self.path}: first record is not a header (frame 0, byte "
                                   f"{FILE_HEADER.size})")
        self.header = first[1]

    def _frames(self) -> Iterator[tuple[int, int, bytes]]:
        """(frame index, byte offset, decompressed body) of each complete frame."""
        f = self._file
        while True:
            offset = f.tell()
            head = f.read(FRAME_HEADER.size)
            if not head:
                return
            if len(head) < FRAME_HEADER.size:
                self._mark_truncated(offset)
                return
            length, crc = FRAME_HEADER.unpack(head)
            if length == 0 or length > MAX_FRAME_COMPRESSED:
                raise TraceFormatError(f"{self.path}: frame {self.frames_read} at byte {offset} declares "
                                       f"{length} bytes (limit {MAX_FRAME_COMPRESSED}): corrupt trace")
            data = f.read(length)
            if len(data) < length:
                self._mark_truncated(offset)
                return
            if zlib.crc32(data) != crc:
                raise TraceFormatError(f"{self.path}: frame {self.frames_read} at byte {offset} is corrupt "
                                       f"(checksum mismatch)")
            try:
                body = self._decompressor.decompress(data, max_output_size=MAX_FRAME_DECOMPRESSED)
            except zstandard.ZstdError as error:
                raise TraceFormatError(f"{self.path}: frame {self.frames_read} at byte {offset} does not "
                                       f"decompress ({error})") from None
            index = self.frames_read
            self.frames_read += 1
            yield index, offset, body

    def _mark_truncated(self, offset: int) -> None:
        self.truncated = True
        self.truncated_at = offset

    def _unpacker(self, body: bytes, use_list: bool = True) -> msgpack.Unpacker:
        unpacker = msgpack.Unpacker(raw=False, use_list=use_list, max_buffer_size=MAX_FRAME_DECOMPRESSED,
                                    max_bin_len=MAX_BIN_LEN, max_str_len=MAX_STR_LEN,
                                    max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN,
                                    strict_map_key=False)
        unpacker.feed(body)
        return unpacker

    def check_record(self, record: Any, index: int, offset: int) -> bool:
        """Check a record's shape and kind (frame `index` at byte `offset`): raise TraceFormatError
        for a malformed record or an unknown required kind, return False for an optional kind to
        skip, True otherwise; notes the footer."""
        if not isinstance(record, (list, tuple)) or not record or not isinstance(record[0], int):
            raise TraceFormatError(f"{self.path}: malformed record in frame {index} (byte {offset})")
        kind = record[0]
        if kind not in KNOWN_KINDS:
            if kind >= OPTIONAL_KIND_MIN:
                return False
            raise TraceFormatError(f"{self.path}: unknown record kind {kind} in frame {index} "
                                   f"(byte {offset}); written by a newer replayvm?")
        if kind == Kind.FOOTER:
            self.footer = record[1] if len(record) > 1 and isinstance(record[1], dict) else {}
        return True

    def malformed(self, index: int, offset: int, error: BaseException) -> TraceFormatError:
        """The error for a frame whose msgpack does not decode (one of UNPACK_ERRORS)."""
        return TraceFormatError(f"{self.path}: frame {index} (byte {offset}) holds malformed "
                                f"msgpack ({error.__class__.__name__})")

    def _records(self) -> Iterator[list]:
        known = KNOWN_KINDS
        for index, offset, body in self._frames():
            unpacker = self._unpacker(body)
            self._current = (index, offset, unpacker)
            try:
                for record in unpacker:
                    if type(record) is not list or not record or type(record[0]) is not int \
                            or record[0] not in known or record[0] == Kind.FOOTER:
                        if not self.check_record(record, index, offset):
                            continue
                    yield record
            except UNPACK_ERRORS as error:
                raise self.malformed(index, offset, error) from None
        self._current = None

    def frames(self) -> Iterator[tuple[int, int, Iterator]]:
        """The records after the header a frame at a time, for bulk readers that check records
        themselves: (frame index, byte offset, iterator over the frame's records). Records are
        tuples (lists in the header's own frame) and come unchecked: give every record that is
        not one of the kinds the caller handles to `check_record`, and turn UNPACK_ERRORS raised
        while iterating into `malformed(...)`. A reader is iterated once, by this or by `for`."""
        current, self._current = self._current, None
        if current is not None:                     # the rest of the frame that held the header
            yield current
        for index, offset, body in self._frames():
            yield index, offset, self._unpacker(body, use_list=False)

    def __iter__(self) -> Iterator[list]:
        """Every record after the header, in order (a reader is iterated once)."""
        yield from self._iter

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "TraceReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
