"""TraceReader: stream a trace's records, treating the file as untrusted input.

Every problem is a TraceFormatError with one line naming it and where it is (byte offset, frame
index). Every record is validated once, here, against its layout (`replayvm.trace.records`), so
what the reader hands out is well typed: consumers index fields without checking them again.
Nothing in the file is silently ignored: a second zstd frame or trailing bytes inside a trace
frame, an incomplete record at a frame's end, a frame or bytes after the footer are errors.
A file cut short inside its last frame (a recorder that was killed) is not an error: the complete
frames before it are read and `truncated` says where the readable part ends.

From format 1.1 the footer, alone in the last frame, carries `trace_sha256`: the sha256 of the
file header and every decompressed frame body before it. The reader recomputes it as it reads and
raises TraceAlteredError on a mismatch: the trace was changed after it was recorded.
"""

from __future__ import annotations

import hashlib
import zlib
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import msgpack
import zstandard

from replayvm import __version__
from replayvm.trace.format import (BRANCH_MAJOR, DIGEST_MINOR, FEATURES_MAJOR, FILE_HEADER, FORMAT_MAJOR, FRAME_HEADER,
                                   KNOWN_FEATURES, MAGIC, READABLE_MAJORS,
                                   MAX_ARRAY_LEN, MAX_BIN_LEN, MAX_FRAME_COMPRESSED,
                                   MAX_FRAME_DECOMPRESSED, MAX_MAP_LEN, MAX_STR_LEN, OPTIONAL_KIND_MIN,
                                   Kind, TraceAlteredError, TraceFormatError)
from replayvm.trace.records import FOOTER, FOOTER_FIELDS, HEADER, HEADER_FIELDS, I63, KIND_INDEX, PAGE_SIZE, \
    build_validator, map_problem, record_problem

UNPACK_ERRORS = (msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError,
                 msgpack.exceptions.StackError, ValueError, TypeError)
CHUNK = 4096                     # records unpacked and validated together by `for record in reader`
FEED = 1024                      # compressed bytes per decompression step: at most ~32 MiB of output
_VALIDATE = build_validator()
KNOWN_KINDS = frozenset(int(k) for k in Kind)


class TraceReader:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._file: BinaryIO = open(self.path, "rb")
        except OSError as error:
            raise TraceFormatError(f"cannot open trace {self.path}: {error.strerror}") from None
        try:
            self._open()
        except BaseException:
            self._file.close()
            raise

    def _open(self) -> None:
        try:
            raw = self._file.read(FILE_HEADER.size)
        except OSError as error:
            raise TraceFormatError(f"cannot read trace {self.path}: {error.strerror}") from None
        if len(raw) < FILE_HEADER.size or raw[:len(MAGIC)] != MAGIC:
            raise TraceFormatError(f"{self.path}: not a replayvm trace (bad magic at byte 0)")
        _, self.major, self.minor = FILE_HEADER.unpack(raw)
        if self.major not in READABLE_MAJORS:
            newer = self.major > max(READABLE_MAJORS)
            readable = " and ".join(f"{major}.x" for major in READABLE_MAJORS)
            raise TraceFormatError(f"{self.path}: trace format {self.major}.{self.minor} is "
                                   f"{'newer' if newer else 'older'} than this replayvm reads "
                                   f"({readable}); {'upgrade replayvm' if newer else 'use an older replayvm'}")
        self.truncated = False
        self.truncated_at: int | None = None
        self.frames_read = 0
        self.header: dict[str, Any] = {}
        self.footer: dict[str, Any] | None = None
        self.digest: str | None = None         # "verified", "absent" (format 1.0), None: no footer
        self.sectors: set[bytes] = set()       # hashes of the SECTOR records read so far
        self.position = 0                      # the sum of the position deltas read so far
        self._ram_pages = 0
        self._decompressor = zstandard.ZstdDecompressor()
        self._hash = hashlib.sha256(raw)       # the record digest: file header, then frame bodies
        self._digest_before_frame = ""
        self._where = (0, FILE_HEADER.size)    # frame index and byte offset being validated
        self._chunk: list = []
        self._chunk_start = 0                  # index in its frame of the chunk's first record
        self._footer_record: Any = None
        self._frames_iter = self._frames()
        self._read_header()

    # ---------------------------------------------------------------- frames
    def _frames(self) -> Iterator[tuple[int, int, bytes]]:
        """(frame index, byte offset, decompressed body) of each complete frame."""
        f = self._file
        while True:
            offset = f.tell()
            head = f.read(FRAME_HEADER.size)
            if not head:
                return
            if self.footer is not None:
                rest = len(head) + len(f.read())
                raise TraceFormatError(f"{self.path}: {rest} bytes after the footer's frame (byte {offset})")
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
            body = self._decompress(data, self.frames_read, offset)
            self._digest_before_frame = self._hash.hexdigest()
            self._hash.update(body)
            index = self.frames_read
            self.frames_read += 1
            yield index, offset, body

    def _decompress(self, data: bytes, index: int, offset: int) -> bytes:
        """One frame's body: exactly one zstd frame, at most MAX_FRAME_DECOMPRESSED bytes whatever
        it declares, decompressed a little at a time so that memory stays bounded."""
        where = f"{self.path}: frame {index} at byte {offset}"
        try:
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as error:
            raise TraceFormatError(f"{where} does not decompress ({error})") from None
        if declared > MAX_FRAME_DECOMPRESSED:
            raise TraceFormatError(f"{where} declares {declared} decompressed bytes (limit "
                                   f"{MAX_FRAME_DECOMPRESSED}): corrupt trace")
        stream = self._decompressor.decompressobj()
        pieces, total = [], 0
        view = memoryview(data)
        try:
            for start in range(0, len(data), FEED):
                piece = stream.decompress(view[start:start + FEED])
                total += len(piece)
                if total > MAX_FRAME_DECOMPRESSED:
                    raise TraceFormatError(f"{where} decompresses to more than {MAX_FRAME_DECOMPRESSED} "
                                           f"bytes: corrupt trace")
                pieces.append(piece)
                if stream.eof:
                    if start + FEED < len(data) or stream.unused_data:
                        raise TraceFormatError(f"{where} holds data after its zstd frame (a second frame "
                                               f"or trailing bytes): corrupt trace")
                    break
        except zstandard.ZstdError as error:
            raise TraceFormatError(f"{where} does not decompress ({error})") from None
        if not stream.eof:
            raise TraceFormatError(f"{where} holds an incomplete zstd frame: corrupt trace")
        return b"".join(pieces)

    def _mark_truncated(self, offset: int) -> None:
        self.truncated = True
        self.truncated_at = offset

    def _unpacker(self, body: bytes, use_list: bool) -> msgpack.Unpacker:
        unpacker = msgpack.Unpacker(raw=False, use_list=use_list, max_buffer_size=MAX_FRAME_DECOMPRESSED,
                                    max_bin_len=MAX_BIN_LEN, max_str_len=MAX_STR_LEN,
                                    max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN,
                                    strict_map_key=True)
        unpacker.feed(body)                    # (fed, not a file: tell() is then what was unpacked)
        return unpacker

    # ---------------------------------------------------------------- records
    def _read_header(self) -> None:
        """Frame 0 holds the header record alone."""
        frame = next(self._frames_iter, None)
        if frame is None:
            if self.truncated:
                raise TraceFormatError(f"{self.path}: truncated before its header was complete "
                                       f"(frame 0 at byte {FILE_HEADER.size} is cut short)")
            raise TraceFormatError(f"{self.path}: no header (the file ends at byte {FILE_HEADER.size})")
        index, offset, body = frame
        unpacker = self._unpacker(body, use_list=True)
        try:
            records = list(islice(unpacker, 2))
        except UNPACK_ERRORS as error:
            raise self.malformed(index, offset, error) from None
        if len(records) != 1 or not _ends_cleanly(unpacker):
            raise TraceFormatError(f"{self.path}: frame 0 (byte {offset}) must hold the header record "
                                   f"alone")
        record = records[0]
        if type(record) is not list or len(record) != HEADER.arity or record[KIND_INDEX] != Kind.HEADER \
                or type(record[KIND_INDEX]) is not int:
            raise TraceFormatError(f"{self.path}: first record is not a header (frame 0, byte {offset})")
        problem = map_problem(record[HEADER.header], HEADER_FIELDS, "header")
        if problem is None:
            problem = self._version_problem(record[HEADER.header])
        if problem is not None:
            raise TraceFormatError(f"{self.path}: {problem} (frame 0, byte {offset})")
        self.header = record[HEADER.header]
        self._ram_pages = self.header.get("ram_bytes", 0) // PAGE_SIZE

    def _version_problem(self, header: dict[str, Any]) -> str | None:
        """What is wrong with a header for this file's format version, or None."""
        features = header.get("features")
        if self.major == FEATURES_MAJOR:
            if not features:
                return f"a format {self.major}.{self.minor} header without its features"
            unknown = sorted(set(features) - KNOWN_FEATURES)
            if unknown:
                raise TraceFormatError(
                    f"{self.path}: this trace needs machine features this replayvm does not have "
                    f"({', '.join(unknown)}; recorded by replayvm {header.get('replayvm')}, this is "
                    f"replayvm {__version__}); upgrade replayvm")
            return None
        if features is not None:
            return (f"a format {self.major}.{self.minor} header with features (format "
                    f"{FEATURES_MAJOR}.x is the format of traces that name them)")
        if ("parent" in header) != (self.major == BRANCH_MAJOR):
            return (f"a format {self.major}.{self.minor} header "
                    f"{'without' if self.major == BRANCH_MAJOR else 'with'} a parent (format "
                    f"{BRANCH_MAJOR}.x is the format of branch traces, and only of them)")
        return None

    def chunks(self, size: int = CHUNK, use_list: bool = True) -> Iterator[tuple[int, int, list]]:
        """The records after the header, validated, `size` at a time: (frame index, byte offset of
        the frame, list of records). Bulk readers (analysis) take these; `for record in reader`
        goes through them too. Records are lists, or tuples with `use_list=False` (arrays inside
        them too). Optional kinds this version does not know are left out. A reader is read once."""
        for index, offset, body in self._frames_iter:
            self._where = (index, offset)
            unpacker = self._unpacker(body, use_list)
            self._chunk_start = 0
            while True:
                try:
                    chunk = list(islice(unpacker, size))
                except UNPACK_ERRORS as error:
                    raise self.malformed(index, offset, error) from None
                if not chunk:
                    break
                yield index, offset, self._validated(chunk)
                self._chunk_start += len(chunk)
            if not _ends_cleanly(unpacker):
                raise TraceFormatError(f"{self.path}: frame {index} (byte {offset}) ends with an incomplete "
                                       f"record")

    def _validated(self, chunk: list) -> list:
        if self.footer is not None:
            raise self._error("a record after the footer", 0)
        self._chunk = chunk
        position, dropped = _VALIDATE(chunk, self.sectors, self._ram_pages, self.position, self._irregular)
        if position > I63:
            raise self._error(f"positions past 2^63-1 (at {position})", len(chunk) - 1)
        self.position = position
        if self._footer_record is not None and chunk[-1] is not self._footer_record:
            raise self._error("a record after the footer", len(chunk) - 1)
        if dropped:
            dropped_ids = {id(r) for r in dropped}
            chunk = [r for r in chunk if id(r) not in dropped_ids]
        return chunk

    def _irregular(self, record: Any) -> bool:
        """A record the generated checks did not accept: the footer (checked here, with the record
        digest), an optional kind to skip (False), or an error naming the record."""
        at = next((i for i, r in enumerate(self._chunk) if r is record), 0)
        if type(record) in (list, tuple) and record and type(record[KIND_INDEX]) is int:
            kind = record[KIND_INDEX]
            if kind == Kind.FOOTER and len(record) == FOOTER.arity:
                self._take_footer(record, at)
                return True
            if kind == Kind.HEADER:
                raise self._error("a second header", at)
            if kind >= OPTIONAL_KIND_MIN and kind not in KNOWN_KINDS:
                return False
            if kind not in KNOWN_KINDS:
                index, offset = self._where
                raise TraceFormatError(f"{self.path}: unknown record kind {kind} in frame {index} (byte "
                                       f"{offset}); written by a newer replayvm?")
        raise self._error(record_problem(record, self.sectors, self._ram_pages), at)

    def _take_footer(self, record: Any, at: int) -> None:
        footer = record[FOOTER.footer]
        if self._footer_record is not None:
            raise self._error("a second footer", at)
        problem = map_problem(footer, FOOTER_FIELDS, "footer")
        if problem is not None:
            raise self._error(problem, at)
        recorded = footer.get("trace_sha256")
        if recorded is not None:
            if self._chunk_start + at != 0:
                raise self._altered("its footer does not stand alone in the last frame")
            if recorded != self._digest_before_frame:
                raise self._altered("the record digest in the footer does not match the records")
            self.digest = "verified"
        elif (self.major, self.minor) >= (FORMAT_MAJOR, DIGEST_MINOR):
            raise self._altered(f"a format {self.major}.{self.minor} footer without its record digest")
        else:
            self.digest = "absent"
        self.footer = footer
        self._footer_record = record

    def _altered(self, why: str) -> TraceAlteredError:
        index, offset = self._where
        return TraceAlteredError(f"{self.path}: this trace was altered after recording ({why}; frame "
                                 f"{index}, byte {offset})")

    def _error(self, what: str, at: int) -> TraceFormatError:
        index, offset = self._where
        return TraceFormatError(f"{self.path}: {what} (record {self._chunk_start + at} of frame {index}, "
                                f"byte {offset})")

    def malformed(self, index: int, offset: int, error: BaseException) -> TraceFormatError:
        """The error for a frame whose msgpack does not decode (one of UNPACK_ERRORS)."""
        return TraceFormatError(f"{self.path}: frame {index} (byte {offset}) holds malformed "
                                f"msgpack ({error.__class__.__name__})")

    def __iter__(self) -> Iterator[list]:
        """Every record after the header, validated, in order (a reader is iterated once)."""
        for _, _, chunk in self.chunks():
            yield from chunk

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "TraceReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ends_cleanly(unpacker: msgpack.Unpacker) -> bool:
    """Whether an exhausted unpacker stopped between records rather than inside one (its tell()
    counts the bytes of a partly read record too). Fed a nil byte, a clean one returns None at
    once; one inside a record returns that record's kind of object, or nothing."""
    unpacker.feed(b"\xc0")
    try:
        return unpacker.unpack() is None
    except (msgpack.exceptions.OutOfData, *UNPACK_ERRORS):
        return False


def check_unaltered(path: Path) -> None:
    """Read a whole trace, validating every record and its record digest: raises TraceFormatError
    (TraceAlteredError when the records are not the recorder's), returns when it is intact."""
    with TraceReader(path) as reader:
        for _ in reader.chunks(size=1 << 16, use_list=False):
            pass
