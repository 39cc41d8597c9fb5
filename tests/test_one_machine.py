"""Record and replay are one machine: replay runs the real device models, fed from the trace.

A replay that only answered reads from the trace could never notice a device model that behaves
differently: these tests break one model's behaviour and require the replay to diverge at that
device's read, naming the device and register. Then they go live in the middle of a session:
the machine must carry on from the device state it had there, and the branch trace recorded
from there must replay on its own.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from replayvm.devices import ide, uart
from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import Divergence, replay
from replayvm.trace import Kind, TraceReader
from replayvm.trace.format import POSITIONED
from replayvm.trace.records import ACCESS, INPUT
from tests.small_guests import SHUTDOWN, boot_disk
from tests.small_guests import record as record_small


def first_event(trace: Path, matches) -> int:
    """The event number of the first positioned record `matches` accepts."""
    index = 0
    with TraceReader(trace) as reader:
        for record in reader:
            if record[0] not in POSITIONED:
                continue
            if matches(record):
                return index
            index += 1
    raise AssertionError("no such event")


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replayvm.cli", *args], capture_output=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


# ------------------------------------------------------------------ a broken device model diverges
def test_a_uart_whose_line_status_lies_makes_replay_diverge_at_that_read(demo_trace, monkeypatch):
    honest = uart.Uart16550.read

    def transmitter_never_empty(self, offset: int, size: int) -> int:
        value = honest(self, offset, size)
        return value & ~uart.LSR_THR_EMPTY if offset == uart.LSR else value

    expected = first_event(demo_trace, lambda r: r[0] == Kind.PIO_READ and r[ACCESS.port] == 0x3FD)
    replay(demo_trace)                                      # verified with the honest model
    monkeypatch.setattr(uart.Uart16550, "read", transmitter_never_empty)
    with pytest.raises(Divergence, match=rf"at event {expected}: com1\.lsr \(0x3fd\) read 0x[0-9a-f]+ in the "
                                         rf"replay, 0x[0-9a-f]+ in the recording"):
        replay(demo_trace)


def test_an_ide_whose_status_loses_drq_makes_replay_diverge_at_that_read(demo_trace, monkeypatch):
    honest = ide.IdeChannel.read_register

    def no_data_request(self, offset: int, size: int) -> int:
        value = honest(self, offset, size)
        return value & ~ide.STATUS_DRQ if offset == ide.STATUS_COMMAND else value

    expected = first_event(demo_trace, lambda r: r[0] in (Kind.PIO_READ, Kind.PIO_READ_RUN)
                           and r[ACCESS.port] == 0x1F7 and r[ACCESS.value] & ide.STATUS_DRQ)
    monkeypatch.setattr(ide.IdeChannel, "read_register", no_data_request)
    with pytest.raises(Divergence, match=rf"at event {expected}: ide0\.status \(0x1f7\) read"):
        replay(demo_trace)


def test_a_uart_that_drops_typed_bytes_makes_replay_diverge(demo_trace, monkeypatch):
    """Typed bytes enter the replayed UART through its one input door; a UART that loses them
    is caught (here at the first receive interrupt the recording took and the model never raised)."""
    monkeypatch.setattr(uart.Uart16550, "feed_input", lambda self, data: None)
    with pytest.raises(Divergence, match=r"interrupt vector \d+ \(com1\) here; the replayed devices had "
                                         r"not raised it|com1\.(lsr|data)"):
        replay(demo_trace)


def test_xv6_replay_runs_the_device_models_a_lying_uart_diverges(xv6_dir, tmp_path, monkeypatch):
    trace = tmp_path / "xv6.zst"
    outcome, _ = run_session(SessionOptions(engine="emu", disks=[xv6_dir / "xv6.img", xv6_dir / "fs.img"],
                                            script=b"echo hi\n", trace=trace, timeout_s=600, virtual_clock=True),
                             output=io.BytesIO())
    assert outcome.reason == "script-done"
    assert replay(trace).verified
    honest = uart.Uart16550.read

    def data_never_ready(self, offset: int, size: int) -> int:
        value = honest(self, offset, size)
        return value & ~uart.LSR_DATA_READY if offset == uart.LSR else value

    expected = first_event(trace, lambda r: r[0] == Kind.PIO_READ and r[ACCESS.port] == 0x3FD
                           and r[ACCESS.value] & uart.LSR_DATA_READY)
    monkeypatch.setattr(uart.Uart16550, "read", data_never_ready)
    with pytest.raises(Divergence, match=rf"at event {expected}: com1\.lsr \(0x3fd\) read"):
        replay(trace)


# ------------------------------------------------------------------ going live
def input_event(trace: Path, text: bytes) -> int:
    return first_event(trace, lambda r: r[0] == Kind.INPUT and r[INPUT.data] == text)


def test_go_live_in_the_middle_of_a_demo_session_runs_new_commands_and_the_branch_replays(tmp_path):
    parent = tmp_path / "parent.zst"
    recorded = cli("record", "--engine", "emu", "--virtual-clock", "--mem", "16",
                   "--input", r"echo one\nrace\necho two\n", "-o", str(parent))
    assert recorded.returncode == 0, recorded.stderr
    assert b"race: ok" in recorded.stdout or b"LOST UPDATES" in recorded.stdout
    # Just before `race` is typed: the shell is waiting at its prompt, after `echo one`.
    seek = input_event(parent, b"race\n") - 1
    branch = tmp_path / "branch.zst"
    live = cli("replay", str(parent), "--seek", str(seek), "--live", "--virtual-clock",
               "--input", r"echo live\nticks\n", "-o", str(branch))
    assert live.returncode == 0, live.stderr
    shown = live.stdout
    assert shown.count(b"\none\n") == 1                     # the replay up to the seek point...
    after = shown.split(b"\none\n", 1)[1]
    assert b"live\n" in after and re.search(rb"ticks: \d+", after)   # ...then the new commands
    assert b"race" not in after and b"two" not in after      # and not what the recording typed
    assert b"branch trace in" in live.stderr

    with TraceReader(branch) as reader:
        header = reader.header
    assert header["parent"]["trace"] == str(parent) and header["parent"]["event"] >= seek
    assert header["start_position"] == header["parent"]["position"] > 0
    assert set(header["devices"]) >= {"lapic", "ioapic", "uart", "ide", "pic", "cmos"}
    again = cli("replay", str(branch))
    assert again.returncode == 0, again.stderr
    branch_console = again.stdout.split(b"replay verified:")[0].rstrip(b"\n")
    assert branch_console.startswith(b"echo live\nlive\n$ ticks\nticks: ")   # what the live part printed
    assert after.rstrip(b"\n").endswith(branch_console)


def test_go_live_at_the_end_of_a_trace_carries_on_from_there(demo_trace, tmp_path):
    from replayvm.record.live import replay_and_go_live

    out = io.BytesIO()
    options = SessionOptions(script=b"echo after the end\n", virtual_clock=True, timeout_s=60)
    outcome, position = replay_and_go_live(demo_trace, options, output=out)
    assert outcome.reason == "script-done"
    with TraceReader(demo_trace) as reader:
        for record in reader:
            pass
        assert position == reader.footer["position"]
    assert out.getvalue().endswith(b"after the end\n$ ")


def test_the_end_of_a_trace_cut_short_is_no_point_to_go_live_at(demo_trace, tmp_path):
    data = demo_trace.read_bytes()
    cut = tmp_path / "cut.zst"
    cut.write_bytes(data[:len(data) * 2 // 3])
    result = cli("replay", str(cut), "--live", "--input", "x")
    assert result.returncode == 2 and result.stderr.count(b"\n") == 1, result.stderr
    assert b"cut short" in result.stderr and b"--seek" in result.stderr


def test_go_live_refuses_bad_combinations_in_one_line(demo_trace, tmp_path):
    for args, says in ((("--live", "--gdb", "0"), "--live does not combine"),
                       (("-o", str(tmp_path / "b.zst")), "only with --live"),
                       (("--live", "-o", str(demo_trace)), "cannot overwrite its parent"),
                       (("--live", "--seek", "99999999"), "is past the end: the trace has"),
                       (("--live", "-o", str(tmp_path / "no" / "b.zst")), "does not exist")):
        result = cli("replay", str(demo_trace), *args)
        assert result.returncode == 2 and says in result.stderr.decode(), result.stderr
        assert result.stderr.count(b"\n") == 1


# A boot sector that prints a prompt on the debug console, waits for a byte on COM1, then reads
# disk sector 1 (never read while recording) and prints its first byte: going live with input
# needs the image for that sector. A recording that times out still runs one run slice of the
# machine loop (20 M instructions on the virtual clock): the poll loop waits between polls.
READ_A_SECTOR_ON_INPUT = f"""
    movb    $'$', %al
    outb    %al, $0xE9
    movb    $' ', %al
    outb    %al, $0xE9
wait_key:
    movw    $2000, %cx              # between polls: the trace holds a read per 2,000 instructions
1:  loop    1b
    movw    $0x3FD, %dx
    inb     %dx, %al
    testb   $1, %al
    jz      wait_key
    movw    $0x3F8, %dx
    inb     %dx, %al
    movw    $0x1F2, %dx
    movb    $1, %al
    outb    %al, %dx            # one sector
    incw    %dx
    outb    %al, %dx            # LBA 1
    incw    %dx
    xorb    %al, %al
    outb    %al, %dx
    incw    %dx
    outb    %al, %dx
    incw    %dx
    movb    $0xE0, %al
    outb    %al, %dx            # master, LBA
    incw    %dx
    movb    $0x20, %al
    outb    %al, %dx            # READ SECTORS
wait_drq:
    inb     %dx, %al
    testb   $0x08, %al
    jz      wait_drq
    movw    $0x1F0, %dx
    inw     %dx, %ax
    outb    %al, $0xE9
    {SHUTDOWN}
"""


def test_a_live_read_of_a_sector_never_recorded_asks_for_the_image_in_one_line(tmp_path):
    disk = boot_disk(tmp_path, READ_A_SECTOR_ON_INPUT)
    with disk.open("ab") as image:
        image.write(b"Q" * 512)                              # sector 1
    parent = tmp_path / "parent.zst"
    reason, shown = record_small(parent, "emu", disk, timeout_s=0.001)   # one run slice
    assert reason == "timeout" and shown == b"$ "            # waited for a key the whole time
    branch = tmp_path / "branch.zst"
    without = cli("replay", str(parent), "--live", "--virtual-clock", "--input", "x", "--prompt", "$ ",
                  "-o", str(branch))
    assert without.returncode == 2
    assert without.stderr.count(b"\n") == 1 and b"sector 1 of disk0" in without.stderr \
        and b"--disk" in without.stderr, without.stderr
    kept = cli("replay", str(branch))                        # the branch up to there is kept, and
    assert kept.returncode == 0, kept.stdout                 # replays to that read as recorded
    wrong = tmp_path / "wrong.img"
    wrong.write_bytes(disk.read_bytes()[:512] + b"R" * 512)
    refused = cli("replay", str(parent), "--live", "--virtual-clock", "--input", "x", "--disk", str(wrong))
    assert refused.returncode == 2 and b"is not the image disk0 was recorded from" in refused.stderr
    given = cli("replay", str(parent), "--live", "--virtual-clock", "--input", "x", "--disk", str(disk),
                "-o", str(branch))
    assert given.returncode == 1 and given.stdout.endswith(b"Q"), (given.stdout, given.stderr)
    assert b"guest asked to shut down" in given.stderr
    again = cli("replay", str(branch))
    assert again.returncode == 0 and again.stdout.startswith(b"Q"), again.stdout


def test_xv6_goes_live_after_boot_and_reads_files_the_recording_never_read(xv6_dir, tmp_path):
    parent = tmp_path / "xv6.zst"
    recorded = cli("record", "--engine", "emu", "--virtual-clock", "--disk", str(xv6_dir / "xv6.img"),
                   "--disk", str(xv6_dir / "fs.img"), "--input", r"echo booted\n", "-o", str(parent))
    assert recorded.returncode == 0, recorded.stderr
    branch = tmp_path / "branch.zst"
    missing = cli("replay", "--quiet", str(parent), "--live", "--virtual-clock", "--input", r"cat README\n",
                  "-o", str(branch))
    assert missing.returncode == 2 and b"--disk" in missing.stderr and missing.stderr.count(b"\n") == 1
    live = cli("replay", "--quiet", str(parent), "--live", "--virtual-clock",
               "--input", r"cat README\n", "--disk", str(xv6_dir / "xv6.img"),
               "--disk", str(xv6_dir / "fs.img"), "-o", str(branch))
    assert live.returncode == 0, live.stderr
    assert b"xv6 is a re-implementation" in live.stdout
    again = cli("replay", str(branch))
    assert again.returncode == 0 and b"xv6 is a re-implementation" in again.stdout, again.stderr



def test_an_xv6_branch_that_stops_at_a_missing_sector_during_boot_replays_verified(xv6_dir, tmp_path):
    """Going live at instruction 50 M of an xv6 boot (before the kernel's first trap loads a
    segment from its per-CPU GDT), the branch stops at the superblock it has no image for; the
    branch kept up to there replays verified, RAM included (restoring the CPU state used to set
    a GDT accessed bit the branch's recording never had)."""
    parent = tmp_path / "xv6.zst"
    recorded = cli("record", "--engine", "emu", "--virtual-clock", "--disk", str(xv6_dir / "xv6.img"),
                   "--disk", str(xv6_dir / "fs.img"), "--input", r"echo booted\n", "-o", str(parent))
    assert recorded.returncode == 0, recorded.stderr
    branch = tmp_path / "branch.zst"
    missing = cli("replay", "--quiet", str(parent), "--seek", "i50000000", "--live", "--virtual-clock",
                  "--input", r"echo live\n", "-o", str(branch))
    assert missing.returncode == 2 and b"sector 1 of disk1" in missing.stderr, missing.stderr
    again = cli("replay", str(branch))
    assert again.returncode == 0 and b"replay verified" in again.stdout, (again.stdout, again.stderr)

# Event 0 is the prompt's writes (one run on kvm): the only event a kvm recording of any length
# (its timeout is the host's time) is sure to have.
@pytest.mark.parametrize("seek", [(), ("--seek", "0")], ids=["at-the-end", "after-event-0"])
def test_a_kvm_trace_goes_live(require_kvm, tmp_path, seek):
    disk = boot_disk(tmp_path, READ_A_SECTOR_ON_INPUT)
    with disk.open("ab") as image:
        image.write(b"K" * 512)
    parent = tmp_path / "parent.zst"
    reason, shown = record_small(parent, "kvm", disk, timeout_s=0.005)
    assert reason == "timeout" and shown == b"$ "
    branch = tmp_path / "branch.zst"
    live = cli("replay", str(parent), *seek, "--live", "--input", "x", "--disk", str(disk), "-o", str(branch))
    assert live.returncode == 1 and live.stdout.endswith(b"K"), (live.stdout, live.stderr)
    again = cli("replay", str(branch))
    assert again.returncode == 0 and again.stdout.split(b"\nreplay verified")[0].endswith(b"K"), again.stdout


def test_only_branch_traces_are_format_2_and_the_reader_holds_them_to_it(tmp_path):
    from replayvm.trace import TraceWriter
    from replayvm.trace.format import BRANCH_MAJOR, FILE_HEADER, FORMAT_MAJOR, MAGIC, TraceFormatError

    header = {"engine": "emu", "position_unit": "instructions", "ram_bytes": 1 << 20, "initial_state": {}}
    parent = {"trace": "p.zst", "trace_sha256": None, "position": 5, "event": 2}
    for name, fields in (("plain.zst", header), ("branch.zst", {**header, "parent": parent, "start_position": 5})):
        writer = TraceWriter(tmp_path / name, fields)
        writer.close({})
    with TraceReader(tmp_path / "plain.zst") as plain, TraceReader(tmp_path / "branch.zst") as branch:
        assert (plain.major, branch.major) == (FORMAT_MAJOR, BRANCH_MAJOR)
    for name, major, says in (("plain.zst", BRANCH_MAJOR, "without a parent"),
                              ("branch.zst", FORMAT_MAJOR, "with a parent")):
        data = bytearray((tmp_path / name).read_bytes())
        data[:FILE_HEADER.size] = FILE_HEADER.pack(MAGIC, major, 0)
        (tmp_path / f"re-{name}").write_bytes(bytes(data))
        with pytest.raises(TraceFormatError, match=says):
            TraceReader(tmp_path / f"re-{name}").close()


def test_a_trace_naming_machine_features_is_format_3_and_an_unknown_feature_is_refused_by_name(
        tmp_path, monkeypatch):
    from replayvm.trace import TraceWriter
    from replayvm.trace import format as trace_format
    from replayvm.trace import reader as trace_reader
    from replayvm.trace.format import FEATURES_MAJOR, FILE_HEADER, FORMAT_MAJOR, MAGIC, TraceFormatError

    header = {"engine": "emu", "position_unit": "instructions", "ram_bytes": 1 << 20, "initial_state": {},
              "replayvm": "9.9.9", "features": ["warp-drive"]}
    TraceWriter(tmp_path / "new.zst", header).close({})
    assert (tmp_path / "new.zst").read_bytes()[:FILE_HEADER.size] == FILE_HEADER.pack(MAGIC, FEATURES_MAJOR, 0)
    with pytest.raises(TraceFormatError) as refused:
        TraceReader(tmp_path / "new.zst").close()
    line = str(refused.value)
    assert "\n" not in line and "warp-drive" in line and "9.9.9" in line and "upgrade replayvm" in line
    monkeypatch.setattr(trace_reader, "KNOWN_FEATURES", frozenset({"warp-drive"}))
    with TraceReader(tmp_path / "new.zst") as known:
        assert known.major == FEATURES_MAJOR and known.header["features"] == ["warp-drive"]
    # A 1.x file header in front of a header with features (or 3.x without them) is malformed.
    data = bytearray((tmp_path / "new.zst").read_bytes())
    data[:FILE_HEADER.size] = FILE_HEADER.pack(MAGIC, FORMAT_MAJOR, trace_format.FORMAT_MINOR)
    (tmp_path / "downgraded.zst").write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match="with features"):
        TraceReader(tmp_path / "downgraded.zst").close()
