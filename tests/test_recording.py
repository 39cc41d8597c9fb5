"""Recording: traces of real sessions, counted independently, crash-safe, and hostile files refused."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from replayvm.record.session import SessionOptions, run_session
from replayvm.trace import Kind, TraceFormatError, TraceReader
from replayvm.trace.format import FILE_HEADER, FORMAT_MAJOR, MAGIC, READABLE_MAJORS
from replayvm.trace.records import INTERRUPT
from replayvm.trace.summary import summarize
from tests.harness import HANG_S


def record(trace: Path, script: bytes, **kwargs):
    out = io.BytesIO()
    outcome, machine = run_session(SessionOptions(script=script, trace=trace, timeout_s=120, **kwargs),
                                   output=out)
    return outcome, machine, out.getvalue()


def independent_counts(trace: Path) -> dict:
    """Recount from the records what the running VMM counted on its own."""
    counts = {"pio_reads": 0, "pio_writes": 0, "mmio_reads": 0, "mmio_writes": 0, "sectors": 0,
              "interrupts": 0, "input": b""}
    with TraceReader(trace) as reader:
        for record in reader:
            kind = record[0]
            if kind == Kind.PIO_READ:
                counts["pio_reads"] += 1
            elif kind == Kind.PIO_WRITE:
                counts["pio_writes"] += 1
            elif kind == Kind.PIO_READ_RUN:
                counts["pio_reads"] += record[4]
                if isinstance(record[5], list):
                    counts["sectors"] += len(record[5])
            elif kind == Kind.PIO_WRITE_RUN:
                counts["pio_writes"] += record[4]
            elif kind == Kind.MMIO_READ:
                counts["mmio_reads"] += 1
            elif kind == Kind.MMIO_WRITE:
                counts["mmio_writes"] += 1
            elif kind == Kind.CLOCK and record[2] == "cmos":
                counts["pio_reads"] += 1
            elif kind == Kind.CLOCK and record[2] == "lapic.tccr":
                counts["mmio_reads"] += 1
            elif kind == Kind.INTERRUPT:
                counts["interrupts"] += 1
            elif kind == Kind.INPUT:
                counts["input"] += record[3]
        assert reader.footer is not None and not reader.truncated
    return counts


def assert_trace_matches_machine(trace: Path, machine, script: bytes) -> None:
    counts = independent_counts(trace)
    bus_pio, bus_mmio = machine.pio._bus, machine.mmio._bus      # the buses behind the recorder
    assert counts["pio_reads"] == bus_pio.reads
    assert counts["pio_writes"] == bus_pio.writes
    assert counts["mmio_writes"] == bus_mmio.writes
    lapic_id_reads_via_bus = bus_mmio.reads - counts["mmio_reads"]
    assert lapic_id_reads_via_bus >= 0                           # only the unlogged pure register
    assert counts["interrupts"] == machine.engine.interrupts_delivered
    assert counts["sectors"] == machine.ide.sectors_read
    assert counts["input"] == script
    summary = summarize(trace)
    assert summary["events_by_kind"]["interrupt"] == counts["interrupts"]
    assert summary["instructions"] == machine.engine.icount
    assert summary["input_bytes"] == len(script)
    assert summary["position_at_end"] == machine.engine.position
    assert summary["last_event_position"] <= machine.engine.position


def test_demo_session_trace_counts_match_the_vmm(tmp_path):
    script = b"echo hello\nrace\ndisk\n"
    outcome, machine, out = record(tmp_path / "demo.zst", script, engine="emu")
    assert outcome.reason == "script-done"
    assert_trace_matches_machine(tmp_path / "demo.zst", machine, script)
    summary = summarize(tmp_path / "demo.zst")
    assert summary["interrupts_by_source"]["timer"] > 0 and summary["interrupts_by_source"]["ide0"] > 0
    assert summary["clock_reads_by_source"]["cmos"] >= 6
    assert summary["initial_ram_pages"] >= 2 and summary["distinct_sectors"] > 0


def test_xv6_session_trace_counts_match_the_vmm(xv6_dir, tmp_path):
    script = b"ls\necho hello\ncat README\n"
    outcome, machine, out = record(tmp_path / "xv6.zst", script, engine="emu", virtual_clock=True,
                                   disks=[xv6_dir / "xv6.img", xv6_dir / "fs.img"])   # a count is asserted
    assert outcome.reason == "script-done"
    assert_trace_matches_machine(tmp_path / "xv6.zst", machine, script)
    summary = summarize(tmp_path / "xv6.zst")
    assert summary["lapic_id_reads_not_logged"] > 100_000


def test_sector_read_twice_is_stored_once(tmp_path):
    record(tmp_path / "t.zst", b"disk\ndisk\ndisk\n", engine="emu")
    hashes, stored = [], set()
    with TraceReader(tmp_path / "t.zst") as reader:
        for rec in reader:
            if rec[0] == Kind.SECTOR:
                assert rec[1] not in stored
                stored.add(rec[1])
            elif rec[0] == Kind.PIO_READ_RUN and isinstance(rec[5], list):
                hashes.extend(rec[5])
    assert set(hashes) == stored and len(hashes) > len(stored)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replayvm.cli", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_recorder_killed_mid_session_leaves_a_readable_prefix(tmp_path):
    trace = tmp_path / "killed.zst"
    proc = subprocess.Popen([sys.executable, "-m", "replayvm.cli", "record", "--engine", "emu", "-o", str(trace),
                             "--input", r"spin 2000\n"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    try:
        seen = b""
        deadline = time.monotonic() + HANG_S                               # only detects a hang
        while b"spin 2000" not in seen and time.monotonic() < deadline:   # the guest is busy now
            seen += os.read(proc.stdout.fileno(), 4096)
        # Frames keep coming every 100 ms while timer interrupts are logged: wait for a few more.
        start_size = trace.stat().st_size
        while trace.stat().st_size < start_size + 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b"spin 2000" in seen and trace.stat().st_size > start_size
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    result = cli("info", str(trace))
    assert result.returncode == 0, result.stderr
    assert "TRUNCATED" in result.stdout and "interrupts" in result.stdout
    summary = summarize(trace)
    assert summary["truncated"] and summary["input_bytes"] == len(b"spin 2000\n")
    assert summary["interrupts_by_source"]["timer"] > 0


@pytest.fixture(scope="module")
def good_trace(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("t") / "good.zst"
    record(path, b"echo hi\n", engine="emu")
    return path.read_bytes()


def assert_info_fails(path: Path, *fragments: str) -> None:
    result = cli("info", str(path))
    assert result.returncode == 2, result
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in line, line


def test_wrong_magic_is_refused(tmp_path, good_trace):
    (tmp_path / "x.zst").write_bytes(b"NOTATRACE" + good_trace[9:])
    assert_info_fails(tmp_path / "x.zst", "not a replayvm trace", "byte 0")


def test_future_version_is_refused_by_name(tmp_path, good_trace):
    future = max(READABLE_MAJORS) + 1
    (tmp_path / "x.zst").write_bytes(FILE_HEADER.pack(MAGIC, future, 0) + good_trace[FILE_HEADER.size:])
    assert_info_fails(tmp_path / "x.zst", f"{future}.0", "newer", "upgrade replayvm")


def frame_bodies(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each frame's compressed body: where frames fall depends on the flusher's
    timing, so a test that damages a body finds one rather than guessing a byte offset."""
    from replayvm.trace.format import FRAME_HEADER

    bodies, offset = [], FILE_HEADER.size
    while offset + FRAME_HEADER.size <= len(data):
        length, _ = FRAME_HEADER.unpack_from(data, offset)
        bodies.append((offset + FRAME_HEADER.size, length))
        offset += FRAME_HEADER.size + length
    return bodies


def test_corrupted_frame_is_named_with_its_offset(tmp_path, good_trace):
    data = bytearray(good_trace)
    start, length = frame_bodies(good_trace)[len(frame_bodies(good_trace)) // 2]
    data[start + length // 2] ^= 0xFF                       # inside a body: the checksum catches it
    (tmp_path / "x.zst").write_bytes(bytes(data))
    assert_info_fails(tmp_path / "x.zst", "frame", "byte", "corrupt")


def test_hostile_frame_length_is_refused(tmp_path, good_trace):
    data = bytearray(good_trace[:FILE_HEADER.size]) + (0xFFFFFFF0).to_bytes(4, "little") + bytes(4)
    (tmp_path / "x.zst").write_bytes(bytes(data))
    assert_info_fails(tmp_path / "x.zst", "declares", "limit")


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_trace_reads_up_to_the_last_whole_frame(tmp_path, good_trace, fraction):
    (tmp_path / "x.zst").write_bytes(good_trace[:int(len(good_trace) * fraction)])
    summary = summarize(tmp_path / "x.zst")
    assert summary["truncated"] and summary["readable_bytes"] <= int(len(good_trace) * fraction)


def test_trace_cut_inside_its_header_is_a_one_line_error(tmp_path, good_trace):
    (tmp_path / "x.zst").write_bytes(good_trace[:FILE_HEADER.size + 20])
    assert_info_fails(tmp_path / "x.zst", "truncated before its header", "byte 12")


def test_missing_trace_file_is_a_one_line_error(tmp_path):
    assert_info_fails(tmp_path / "nope.zst", "cannot open trace")


def test_unknown_record_kind_is_named(tmp_path):
    from replayvm.trace.writer import TraceWriter

    writer = TraceWriter(tmp_path / "x.zst", {"engine": "emu"})
    writer.append((42, 1, 2))
    writer.close()
    with pytest.raises(TraceFormatError, match="unknown record kind 42"):
        list(TraceReader(tmp_path / "x.zst"))


def test_kvm_recording_positions_by_exit_and_landmarks_for_kicked_interrupts(require_kvm, tmp_path):
    """On kvm, positions count exits; an interrupt injected after a kick (the guest was spinning
    without exits) carries a landmark: RIP, general registers and CR3."""
    from replayvm.guests import guest_file
    from tests.harness import record_kvm_realmode_guest

    machine = record_kvm_realmode_guest(tmp_path / "kvm.zst")
    image = guest_file("kvmtests", "realmode.bin").read_bytes()
    busy = 0x7C00 + image.index(b"\xeb\xfe")                    # jmp . (the busy loop)
    with TraceReader(tmp_path / "kvm.zst") as reader:
        interrupts = [rec for rec in reader if rec[0] == Kind.INTERRUPT]
    assert len(interrupts) == 3
    assert [INTERRUPT.get(rec, "landmark") for rec in interrupts[:2]] == [None, None]   # synchronous exits
    engine = machine.engine
    assert engine.position == engine.exit_counts["io"] + engine.exit_counts["mmio"] + engine.exit_counts["hlt"]
    assert engine.exit_counts["intr"] >= 1                    # the kick did not move the position
    landmark = INTERRUPT.get(interrupts[2], "landmark")
    assert landmark["rip"] == busy and "cr3" in landmark and "rax" in landmark
    machine.engine.close()


def test_header_carries_the_cpuid_table_the_guest_sees_without_rdrand(tmp_path):
    record(tmp_path / "t.zst", b"echo hi\n", engine="emu")
    with TraceReader(tmp_path / "t.zst") as reader:
        table = {(row[0], row[1]): row[2:] for row in reader.header["cpuid"]}
    eax, ebx, ecx, edx = table[(1, 0)]
    assert not ecx & (1 << 30)                       # RDRAND hidden: its values are not replayable
    assert edx & (1 << 3)                            # PSE, which xv6 and the demo use
    leaf7 = table.get((7, 0))
    assert leaf7 is None or not leaf7[1] & (1 << 18)  # no RDSEED either
