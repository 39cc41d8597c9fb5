"""The trace file as untrusted input, and no recording ever lost.

- The writer never writes what the reader refuses: every limit tested from both sides (the
  writer's output at and just over a limit reads back; a hand-made record over it is refused in
  one line).
- The decompression limit holds whatever a zstd frame declares, in bounded memory.
- Every record is validated once, at the reader, against its layout (replayvm.trace.records).
- Nothing is silently ignored: data after a zstd frame, an incomplete record, records or bytes
  after the footer; a footer that cannot verify a replay; a trace altered after recording.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from replayvm.trace.format import FEATURES_MAJOR, FEATURES_MINOR, FORMAT_MAJOR, FORMAT_MINOR
import zstandard

from replayvm.analyze.loader import load_trace
from replayvm.record.recorder import Recorder
from replayvm.replay.replayer import replay
from replayvm.trace import Kind, TraceFormatError, TraceReader, TraceWriter
from replayvm.trace import records as codec
from replayvm.trace.format import (FILE_HEADER, FORMAT_MAJOR, MAGIC, MAX_ARRAY_LEN, MAX_BIN_LEN,
                                   MAX_FRAME_DECOMPRESSED, MAX_MAP_LEN, MAX_STR_LEN, TraceAlteredError)
from replayvm.trace.summary import format_summary, summarize
from tests.trace_tools import HEADER, frame, hand_made, pack, read_frames, unpack, write_frames

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "traces" / "0.1.0"


def read_all(path: Path) -> list:
    with TraceReader(path) as reader:
        return list(reader)


def refused(path: Path, match: str) -> str:
    """`info`'s reading of the trace fails with one line matching `match`."""
    with pytest.raises(TraceFormatError, match=match) as error:
        summarize(path)
    assert "\n" not in str(error.value)
    return str(error.value)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replayvm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, cwd=ROOT)


# ---------------------------------------------------------------- item 5: limits, both sides
class FakeEngine:
    """The part of the Engine protocol the recorder uses, over no guest."""

    name = "emu"
    position = 0
    exact_positions = True

    def exit_context(self) -> tuple[int, int]:
        return 0x7C00, 0

    def address_space(self) -> int:
        return 0

    def interrupt_landmark(self) -> None:
        return None

    def pure_read_sites(self) -> dict[int, int]:
        return {}


def fake_recorder(writer: TraceWriter) -> tuple[Recorder, FakeEngine]:
    """A Recorder over a stand-in machine: what it writes is what is tested, not a guest."""
    engine = FakeEngine()
    bus = SimpleNamespace(kind="pio")
    machine = SimpleNamespace(engine=engine, pio=bus, mmio=SimpleNamespace(kind="mmio"), input_observers=[], disks=[],
                              read_tsc=lambda: 0, interrupt_source=lambda vector: "timer",
                              cmos=SimpleNamespace(index=0))
    return Recorder(machine, writer), engine


def test_a_read_run_at_the_byte_limit_is_one_record_and_one_more_byte_starts_the_next(tmp_path):
    """A `rep insb` longer than MAX_BIN_LEN (16 MiB) used to be one bytes field the reader refused:
    the whole recording was lost. It is now consecutive runs, each readable, positions exact."""
    writer = TraceWriter(tmp_path / "t.zst", dict(HEADER))
    recorder, engine = fake_recorder(writer)
    start = 1000
    engine.position = start + MAX_BIN_LEN - 1
    recorder._run = [Kind.PIO_READ_RUN, start, 0x60, 1, bytearray(b"\xAA" * (MAX_BIN_LEN - 1)), 0x7C00, 0,
                     engine.position, 0]                    # the run so far: one byte short of the limit
    for value in (0xBB, 0xCC, 0xDD):                         # the last byte that fits, then two more
        recorder.read(False, 0x60, 1, value)
        engine.position += 1
    recorder.finish()
    writer.close({"position": engine.position})
    runs = [r for r in read_all(tmp_path / "t.zst") if r[0] == Kind.PIO_READ_RUN]
    assert [(r[codec.RUN.dpos], r[codec.RUN.count]) for r in runs] == [(start, MAX_BIN_LEN), (MAX_BIN_LEN, 2)]
    assert len(runs[0][codec.RUN.data]) == MAX_BIN_LEN // 512      # whole sectors: stored as hashes
    assert runs[1][codec.RUN.data] == b"\xCC\xDD"


def test_a_demo_session_with_runs_split_short_replays_verified(tmp_path, monkeypatch):
    """The split runs replay exactly (a continuation run's delta is the element count before it):
    recorded with the run limit lowered to 256 bytes, every 512-byte sector read is two runs."""
    from replayvm.record.session import SessionOptions, run_session

    monkeypatch.setattr(Recorder, "max_run_bytes", 256)
    trace = tmp_path / "split.zst"
    outcome, _ = run_session(SessionOptions(engine="emu", script=b"echo hi\n", trace=trace, timeout_s=120,
                                            virtual_clock=True), output=io.BytesIO())
    assert outcome.reason == "script-done"
    runs = [r for r in read_all(trace) if r[0] == Kind.PIO_READ_RUN]
    assert runs and max(len(r[codec.RUN.data]) for r in runs) == 256
    assert replay(trace).verified
    counts = load_trace(trace, tmp_path / "split.db")
    assert counts["exits"] > 0


def test_bytes_at_the_limit_read_back_and_over_it_are_refused(tmp_path):
    writer = TraceWriter(tmp_path / "at.zst", dict(HEADER))
    writer.append((Kind.PIO_WRITE_RUN, 0, 0xE9, 1, MAX_BIN_LEN, bytes(MAX_BIN_LEN), 0, 0))
    writer.append((Kind.PIO_WRITE_RUN, 1, 0xE9, 1, MAX_BIN_LEN, bytes(MAX_BIN_LEN), 0, 0))
    writer.append((Kind.PIO_WRITE_RUN, 1, 0xE9, 1, MAX_BIN_LEN, bytes(MAX_BIN_LEN), 0, 0))
    writer.close({"position": 2})
    assert writer.frames >= 4                  # 48 MiB of records cut into frames the reader takes
    assert [len(r[5]) for r in read_all(tmp_path / "at.zst") if r[0] == Kind.PIO_WRITE_RUN] == [MAX_BIN_LEN] * 3
    hand_made(tmp_path / "over.zst", [13, 0, 0xE9, 1, MAX_BIN_LEN + 1, bytes(MAX_BIN_LEN + 1), 0, 0])
    refused(tmp_path / "over.zst", "malformed msgpack")


def test_strings_at_the_limit_read_back_longer_are_cut_and_hand_made_ones_refused(tmp_path):
    for length, kept in ((MAX_STR_LEN, MAX_STR_LEN), (MAX_STR_LEN + 1, MAX_STR_LEN)):
        path = tmp_path / f"s{length}.zst"
        writer = TraceWriter(path, {**HEADER, "command_line": ["replayvm", "x" * length]})
        writer.close({"position": 0, "detail": "y" * length})
        with TraceReader(path) as reader:
            list(reader)
            assert len(reader.header["command_line"][1]) == kept
            assert len(reader.footer["detail"]) == kept
    hand_made(tmp_path / "over.zst", header={**HEADER, "command_line": ["x" * (MAX_STR_LEN + 1)]})
    refused(tmp_path / "over.zst", "malformed msgpack")


def test_arrays_at_the_limit_read_back_longer_are_split_and_hand_made_ones_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(Recorder, "max_sites", 3)          # PURE_READS call sites: split like runs
    writer = TraceWriter(tmp_path / "t.zst", dict(HEADER))
    recorder, _ = fake_recorder(writer)
    recorder._id_read_sites.update({0x1000 + i: i + 1 for i in range(7)})
    recorder.finish()
    writer.close({"position": 0})
    pure = [r for r in read_all(tmp_path / "t.zst") if r[0] == Kind.PURE_READS]
    assert [len(r[2]) for r in pure] == [3, 3, 1]
    assert summarize(tmp_path / "t.zst")["pure_read_sites"] == 7
    writer = TraceWriter(tmp_path / "at.zst", dict(HEADER))
    writer.append((Kind.PURE_READS, "lapic.id", [[0, 1]] * MAX_ARRAY_LEN))
    writer.close({"position": 0})
    assert len(read_all(tmp_path / "at.zst")[0][2]) == MAX_ARRAY_LEN
    hand_made(tmp_path / "over.zst", [14, "lapic.id", [[0, 1]] * (MAX_ARRAY_LEN + 1)])
    refused(tmp_path / "over.zst", "malformed msgpack")


def test_maps_at_the_limit_read_back_and_over_it_the_writer_refuses_before_writing(tmp_path):
    big = {f"k{i}": i for i in range(MAX_MAP_LEN)}
    writer = TraceWriter(tmp_path / "at.zst", {**HEADER, "extra": big})
    writer.close({"position": 0, "counts": big})
    with TraceReader(tmp_path / "at.zst") as reader:
        list(reader)
        assert len(reader.header["extra"]) == len(reader.footer["counts"]) == MAX_MAP_LEN
    with pytest.raises(ValueError, match="would not be readable"):
        TraceWriter(tmp_path / "over.zst", {**HEADER, "extra": {**big, "one more": 1}})
    assert not (tmp_path / "over.zst").exists()
    hand_made(tmp_path / "over.zst", header={**HEADER, "extra": {**big, "one more": 1}})
    refused(tmp_path / "over.zst", "malformed msgpack")


# ---------------------------------------------------------------- item 6: decompression bombs
def bomb(path: Path, declare: bool) -> None:
    """A valid header frame, then a frame of 320 MiB of zeros compressed to a few KB."""
    size = 320 << 20
    compressor = zstandard.ZstdCompressor(level=3, write_content_size=declare)
    stream = compressor.compressobj(size=size if declare else -1)
    chunk = bytes(1 << 20)
    compressed = b"".join(stream.compress(chunk) for _ in range(size >> 20)) + stream.flush()
    write_frames(path, [pack([0, HEADER]), b""], compressed={1: compressed})


@pytest.mark.parametrize("declare", [True, False], ids=["declared", "undeclared"])
def test_a_decompression_bomb_is_refused_in_one_line_in_bounded_memory(tmp_path, declare):
    trace = tmp_path / "bomb.zst"
    bomb(trace, declare)
    assert trace.stat().st_size < 100_000
    # Peak memory of the reading process: VmHWM (ru_maxrss would include the forking parent's).
    probe = ("import re, sys\nfrom replayvm.cli import main\n"
             "status = main(['info', sys.argv[1]])\n"
             "peak = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
             "print(peak, status)\n")
    result = subprocess.run([sys.executable, "-c", probe, str(trace)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    maxrss_kib, status = result.stdout.split()[-2:]
    assert status == "2" and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert re.search(r"(declares \d+ decompressed|decompresses to more than) ", result.stderr)
    # the limit is 256 MiB of body; what a reader may hold is bounded by it, not by the bomb
    limit = (64 << 20) if declare else MAX_FRAME_DECOMPRESSED + (128 << 20)   # refused before / as it grows
    assert int(maxrss_kib) << 10 < limit


# ---------------------------------------------------------------- item 7: every record validated
BAD_RECORDS = {
    "non-map footer": ([], [12, [1, 2]], "footer is not a map"),
    "RAM page outside RAM": ([], [11, 256, bytes(4096)], "RAM_PAGE field page is 256"),
    "unknown sector hash": ([], [5, 0, 0x1F0, 2, 256, [b"\x01" * 16], 0, 0],
                            "refers to a sector hash with no SECTOR record before it"),
    "sector whose hash is not its content": ([], [10, b"\x01" * 16, bytes(512)], "SECTOR field data"),
    "map with list keys": ([], [6, 0, 32, "timer", 0, 0, {(1, 2): 3}], "malformed msgpack"),
    "int of 2^63": ([], [9, 1 << 63], "HALT field dpos is 9223372036854775808"),
    "negative delta": ([], [9, -1], "HALT field dpos is -1"),
    "value wider than its size": ([], [1, 0, 0x3F8, 1, 256, 0, 0], "PIO_READ field value is 256"),
    "size 3": ([], [1, 0, 0x3F8, 3, 1, 0, 0], "PIO_READ field size is 3"),
    "float position": ([], [2, 1.5, 0x3F8, 1, 65, 0, 0], "PIO_WRITE field dpos is 1.5"),
    "bool kind": ([], [True, 0, 0x3F8, 1, 65, 0, 0], "not an array starting with its kind"),
    "landmark with a nested value": ([], [6, 0, 32, "timer", 0, 0, {"rip": [1]}], "INTERRUPT field landmark"),
    "input of no bytes": ([], [7, 0, "com1", b""], "INPUT field data"),
    "input as text": ([], [7, 0, "com1", "typed"], "INPUT field data"),
    "run count that does not match its data": ([], [13, 0, 0xE9, 1, 5, b"abc", 0, 0], "PIO_WRITE_RUN field data"),
    "pure reads with a bad site": ([], [14, "lapic.id", [[1, 2, 3]]], "PURE_READS field sites"),
    "a second header": ([], [0, HEADER], "a second header"),
    "not an array": ([], 5, "not an array starting with its kind"),
    "unknown required kind": ([], [42, 1], "unknown record kind 42"),
}


@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_an_ill_typed_record_is_refused_by_info_replay_and_analyze(tmp_path, name):
    _, record, match = BAD_RECORDS[name]
    trace = tmp_path / "bad.zst"
    hand_made(trace, [9, 5], record)
    refused(trace, match)
    with pytest.raises(TraceFormatError, match=match):
        load_trace(trace, tmp_path / "bad.db")
    assert not (tmp_path / "bad.db").exists()


def test_positions_past_2_63_are_refused(tmp_path):
    hand_made(tmp_path / "far.zst", [9, (1 << 63) - 1], [9, 1])
    refused(tmp_path / "far.zst", "positions past 2")


BAD_HEADERS = {
    "bytes in a string field": ({"replayvm": b"0.1.0"}, "header's replayvm is b'0.1.0'"),
    "bytes in an unknown field": ({"extra": {"a": b"x"}}, "header's extra holds a value of an unsupported type"),
    "too deep": ({"extra": [[[[[1]]]]]}, "unsupported type"),
    "ram_bytes not pages": ({"ram_bytes": 1000}, "header's ram_bytes is 1000"),
    "RAM over the device window": ({"ram_bytes": 1 << 32}, "header's ram_bytes is 4294967296"),
    "initial state with a list register": ({"initial_state": {"regs": {"rax": [1]}}}, "header's initial_state"),
    "initial state with an unknown segment field": ({"initial_state": {"cs": {"bogus": 1}}}, "initial_state"),
    "engine unknown": ({"engine": "qemu"}, "header's engine is 'qemu'"),
    "int of 2^63 in an unknown field": ({"extra": 1 << 63}, "unsupported type"),
}


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_an_ill_typed_header_is_refused_in_one_line(tmp_path, name):
    fields, match = BAD_HEADERS[name]
    hand_made(tmp_path / "bad.zst", header={**HEADER, **fields})
    refused(tmp_path / "bad.zst", re.escape(match))


def test_frame_0_must_hold_the_header_alone(tmp_path):
    write_frames(tmp_path / "t.zst", [pack([0, HEADER], [9, 1])])
    refused(tmp_path / "t.zst", "frame 0 .* must hold the header record alone")


def test_a_64_bit_rip_is_readable_and_analysable(tmp_path):
    """RIPs of 64-bit kernels are above 2^63: the reader takes them, SQLite gets two's complement."""
    rip = 0xFFFFFFFF81000000
    writer = TraceWriter(tmp_path / "t.zst", dict(HEADER))
    writer.append((Kind.PIO_WRITE, 1, 0xE9, 1, 0x41, rip, 0))
    writer.append((Kind.MMIO_READ, 1, 0xFEE00030, 8, (1 << 64) - 1, rip, 0))
    writer.close({"position": 2})
    load_trace(tmp_path / "t.zst", tmp_path / "t.db")
    import sqlite3
    rows = sqlite3.connect(tmp_path / "t.db").execute("SELECT rip, value FROM exits ORDER BY seq").fetchall()
    assert rows == [(rip - (1 << 64), 0x41), (rip - (1 << 64), -1)]


# ---------------------------------------------------------------- item 8: nothing ignored
def test_a_second_zstd_frame_or_trailing_bytes_inside_a_trace_frame_are_refused(tmp_path):
    compressor = zstandard.ZstdCompressor()
    body = pack([9, 1])
    for name, compressed in (("second", compressor.compress(body) + compressor.compress(pack([9, 2]))),
                             ("trailing", compressor.compress(body) + b"\x00junk")):
        write_frames(tmp_path / f"{name}.zst", [pack([0, HEADER]), b""], compressed={1: compressed})
        refused(tmp_path / f"{name}.zst", r"frame 1 at byte \d+ holds data after its zstd frame")


def test_an_incomplete_record_at_the_end_of_a_frame_is_refused(tmp_path):
    write_frames(tmp_path / "t.zst", [pack([0, HEADER]), pack([9, 1], [1, 0, 0x3F8, 1, 65, 0, 0])[:-2]])
    refused(tmp_path / "t.zst", r"frame 1 \(byte \d+\) ends with an incomplete record")


def test_records_or_bytes_after_the_footer_are_refused(tmp_path, demo_trace_11):
    file_header, bodies = read_frames(demo_trace_11)
    write_frames(tmp_path / "after.zst", bodies + [pack([9, 1])], file_header)
    refused(tmp_path / "after.zst", "bytes after the footer's frame")
    (tmp_path / "tail.zst").write_bytes(demo_trace_11.read_bytes() + b"\x01\x02\x03")
    refused(tmp_path / "tail.zst", "3 bytes after the footer's frame")
    hand_made(tmp_path / "same.zst", [12, {"position": 0}], [9, 1])
    refused(tmp_path / "same.zst", "a record after the footer")


@pytest.fixture(scope="module")
def demo_trace_11(tmp_path_factory) -> Path:
    """A short demo session of this version (format 1.1 and later: with its record digest), virtual clock."""
    from replayvm.record.session import SessionOptions, run_session

    trace = tmp_path_factory.mktemp("digest") / "demo.zst"
    outcome, _ = run_session(SessionOptions(engine="emu", script=b"echo hello\n", trace=trace, timeout_s=120,
                                            virtual_clock=True), output=io.BytesIO())
    assert outcome.reason == "script-done"
    return trace


def rewrite(source: Path, target: Path, edit) -> None:
    """Re-encode a trace's frames after `edit(records) -> records`, keeping its footer (and its
    digest) and giving every frame a valid checksum: what someone editing a trace would do."""
    file_header, bodies = read_frames(source)
    records = [unpack(body) for body in bodies]
    edit(records)
    write_frames(target, [pack(*frame_records) for frame_records in records], file_header)


@pytest.mark.parametrize("field", sorted(codec.FOOTER_VERIFIED_BY))
def test_a_footer_without_what_verifies_a_replay_never_gives_verified(tmp_path, demo_trace_11, field):
    with TraceReader(demo_trace_11) as reader:
        records = list(reader)
        header, footer = reader.header, dict(reader.footer)
    del footer[field]
    writer = TraceWriter(tmp_path / "t.zst", header)
    for record in records[:-1]:
        writer.append(tuple(record))
    writer.close(footer)                       # a new, valid digest: only the field is missing
    with pytest.raises(TraceFormatError, match=f"the footer lacks {field}: nothing to verify"):
        replay(tmp_path / "t.zst")
    result = cli("replay", "--quiet", str(tmp_path / "t.zst"))
    assert result.returncode == 2 and "replay verified" not in result.stdout


def ignored_read(records: list) -> tuple[int, int]:
    """(frame, index) of a UART line-status read whose TEMT bit the demo guest never looks at."""
    for f, frame_records in enumerate(records):
        for i, r in enumerate(frame_records):
            if r[0] == Kind.PIO_READ and r[2] == 0x3FD and r[4] & 0x40:
                return f, i
    raise AssertionError("no line-status read")


def test_a_changed_read_the_guest_ignores_is_reported_as_altered_not_verified(tmp_path, demo_trace_11):
    def edit(records):
        f, i = ignored_read(records)
        records[f][i][4] &= ~0x40
    rewrite(demo_trace_11, tmp_path / "t.zst", edit)
    with pytest.raises(TraceAlteredError, match="altered after recording .*digest"):
        replay(tmp_path / "t.zst")
    for verb in ("replay", "info"):
        result = cli(verb, str(tmp_path / "t.zst"))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "altered after recording" in result.stderr
        assert "verified" not in result.stdout


def test_a_divergence_in_an_altered_trace_is_reported_as_altered(tmp_path, demo_trace_11):
    def edit(records):
        for frame_records in records:
            for r in frame_records:
                if r[0] == Kind.INTERRUPT:
                    r[1] += 1                      # an interrupt one instruction later
                    return
    rewrite(demo_trace_11, tmp_path / "t.zst", edit)
    with pytest.raises(TraceAlteredError):
        replay(tmp_path / "t.zst")


def test_a_footer_digest_dropped_from_a_format_1_1_trace_is_altered(tmp_path, demo_trace_11):
    def edit(records):
        del records[-1][0][1]["trace_sha256"]
    rewrite(demo_trace_11, tmp_path / "t.zst", edit)
    refused(tmp_path / "t.zst", "altered after recording .*without its record digest")


def test_info_says_whether_the_records_are_intact(demo_trace_11):
    summary = summarize(demo_trace_11)
    # every recording names the feature "aspace" (format 3.0)
    assert summary["record_digest"] == "verified" and summary["format"] == f"{FEATURES_MAJOR}.{FEATURES_MINOR}"
    assert "records      intact" in format_summary(summary)
    old = summarize(SAMPLES / "demo-shell.zst")
    assert old["record_digest"] == "absent" and old["format"] == "1.0"
    assert "no record digest (format 1.0" in format_summary(old)


def test_format_1_0_samples_still_replay_verified():
    for trace in sorted(SAMPLES.glob("*.zst")):
        assert replay(trace, output=io.BytesIO()).verified, trace


# ---------------------------------------------------------------- item 10: chaos in info
def test_info_shows_the_chaos_seed():
    summary = summarize(SAMPLES / "demo-chaos-race.zst")
    assert summary["chaos_seed"] == 11
    assert "chaos on (seed 11)" in format_summary(summary)
    result = cli("info", "--json", str(SAMPLES / "demo-chaos-race.zst"))
    assert json.loads(result.stdout)["chaos_seed"] == 11
    assert summarize(SAMPLES / "demo-shell.zst")["chaos_seed"] is None
    assert "chaos" not in format_summary(summarize(SAMPLES / "demo-shell.zst"))


# ---------------------------------------------------------------- the layouts are the docs
def test_the_record_table_in_the_docs_is_the_codec():
    doc = (ROOT / "docs" / "trace-format.md").read_text()
    assert codec.record_table() in doc, "regenerate: python -c 'from replayvm.trace.records import " \
                                        "record_table; print(record_table())'"
    assert codec.map_table(codec.HEADER_FIELDS) in doc
    assert codec.map_table(codec.FOOTER_FIELDS) in doc


def test_named_fields_are_the_layout_positions():
    assert (codec.ACCESS.dpos, codec.ACCESS.port, codec.ACCESS.value, codec.ACCESS.cpl) == (1, 2, 4, 6)
    assert (codec.RUN.count, codec.RUN.data, codec.RUN.rip) == (4, 5, 6)
    assert (codec.INTERRUPT.vector, codec.INTERRUPT.source, codec.INTERRUPT.landmark) == (2, 3, 6)
    with pytest.raises(AttributeError):
        codec.ACCESS.nothing
