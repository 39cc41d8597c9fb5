"""Taking trace files apart and putting them back together below the TraceWriter: frames as
decompressed bodies, bodies as records. Tests use it to make traces the writer never would
(hand-made records over a limit, a frame re-encoded after recording with valid checksums)."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import msgpack
import zstandard

from replayvm.trace.format import FILE_HEADER, FORMAT_MAJOR, FORMAT_MINOR, FRAME_HEADER, MAGIC


def read_frames(path: Path) -> tuple[bytes, list[bytes]]:
    """(file header, decompressed body of each frame) of a well-formed trace."""
    return split_frames(Path(path).read_bytes())


def split_frames(data: bytes) -> tuple[bytes, list[bytes]]:
    """(file header, decompressed body of each frame) of a well-formed trace's bytes."""
    offset, bodies = FILE_HEADER.size, []
    while offset < len(data):
        length, _ = FRAME_HEADER.unpack_from(data, offset)
        start = offset + FRAME_HEADER.size
        bodies.append(zstandard.ZstdDecompressor().decompress(data[start:start + length]))
        offset = start + length
    return data[:FILE_HEADER.size], bodies


def frame(compressed: bytes) -> bytes:
    """A trace frame: length and CRC, then the compressed bytes."""
    return FRAME_HEADER.pack(len(compressed), zlib.crc32(compressed)) + compressed


def write_frames(path: Path, bodies: list[bytes], file_header: bytes | None = None,
                 compressed: dict[int, bytes] | None = None) -> None:
    """A trace of these frame bodies (compressed here; `compressed` gives some frames' bytes as is)."""
    out = bytearray(file_header or FILE_HEADER.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR))
    compressor = zstandard.ZstdCompressor(level=3)
    for i, body in enumerate(bodies):
        out += frame((compressed or {}).get(i) or compressor.compress(body))
    Path(path).write_bytes(bytes(out))


def pack(*records) -> bytes:
    packer = msgpack.Packer(use_bin_type=True)
    return b"".join(packer.pack(record) for record in records)


def unpack(body: bytes) -> list:
    return list(msgpack.Unpacker(io.BytesIO(body), raw=False, strict_map_key=False, max_buffer_size=1 << 30))


HEADER = {"format": "replayvm-trace", "engine": "emu", "position_unit": "instructions", "ram_bytes": 1 << 20}


def hand_made(path: Path, *records, header: dict | None = None, footer: dict | None = None) -> None:
    """A trace of `records` in one frame after the header's, with a footer frame if given."""
    bodies = [pack([0, header or HEADER]), pack(*records)]
    if footer is not None:
        bodies.append(pack([12, footer]))
    write_frames(path, bodies, FILE_HEADER.pack(MAGIC, FORMAT_MAJOR, 0))
