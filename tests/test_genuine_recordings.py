"""Genuine recordings that used to fail to replay (issue 10, items 1-4), with tiny guests recorded
through the real session code on both engines (tests/small_guests.py):

1. a replayed guest that stops doing I/O before the next event diverges, naming it (no hang);
2. a recording that ends in a fault replays verified when the replay ends in the same fault;
3. narrow and unaligned reads of the LAPIC ID register record and replay;
4. console output by `rep outsb`, by print loops (kvm merges their exits into runs), and long
   string writes on kvm replay with the same console and the same positions.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlite_utils

from replayvm import hw
from replayvm.analyze.loader import console_text, load_trace
from replayvm.replay.replayer import Divergence, replay
from replayvm.trace import Kind, TraceReader, TraceWriter
from tests.small_guests import SHUTDOWN, boot_disk, multiboot_kernel, record

ENGINES = ["emu", "kvm"]
PATCH_MARK = b"\x90\x90\x90"            # three NOPs in a guest: where a test patches in `jmp .`
JUMP_TO_SELF = b"\xeb\xfe\x90"


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    if request.param == "kvm":
        request.getfixturevalue("require_kvm")
    return request.param


@contextmanager
def at_most(seconds: int):
    """Fail (instead of hanging the suite) when the body runs longer than `seconds`."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replayvm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def records(trace: Path) -> list:
    with TraceReader(trace) as reader:
        return list(reader)


def footer(trace: Path) -> dict:
    return next(r[1] for r in records(trace) if r[0] == Kind.FOOTER)


def rewrite(source: Path, target: Path, edit) -> None:
    """Copy a trace through `edit(record) -> record` (footer included)."""
    with TraceReader(source) as reader:
        header, body = reader.header, list(reader)
    writer = TraceWriter(target, header)
    end = None
    for rec in body:
        rec = edit(list(rec))
        if rec[0] == Kind.FOOTER:
            end = rec[1]
        else:
            writer.append(tuple(rec))
    writer.close(end)


def patch_ram(source: Path, target: Path, old: bytes, new: bytes) -> None:
    """The same trace with the guest's code changed in its initial RAM (once)."""
    found = []

    def edit(rec):
        if rec[0] == Kind.RAM_PAGE and old in rec[2] and not found:
            found.append(rec[1])
            rec[2] = bytes(rec[2]).replace(old, new, 1)
        return rec
    rewrite(source, target, edit)
    assert found, "the patch mark is not in the initial RAM"


# ------------------------------------------------------------------ 1. no I/O before the next event
# Marks, then the patch point, then a port read (the UART's line status) whose value goes out.
READ_AFTER_A_MARK = f"""
    movb    $0x11, %al
    outb    %al, $0x80
    nop
    nop
    nop
    movw    $0x3FD, %dx
    inb     %dx, %al
    outb    %al, $0x80
{SHUTDOWN}
"""


def test_a_guest_that_stops_doing_io_diverges_at_the_next_event_on_emu(tmp_path):
    recorded = tmp_path / "t.zst"
    assert record(recorded, "emu", boot_disk(tmp_path, READ_AFTER_A_MARK))[0] == "shutdown"
    patch_ram(recorded, tmp_path / "spin.zst", PATCH_MARK, JUMP_TO_SELF)
    result = cli("replay", "--quiet", str(tmp_path / "spin.zst"))    # used to run forever
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "diverged at event 1:" in result.stderr and "pio_read port 0x3fd" in result.stderr
    assert "without it" in result.stderr


def test_a_guest_that_stops_doing_io_diverges_within_the_exit_free_limit_on_kvm(require_kvm, tmp_path):
    recorded = tmp_path / "t.zst"
    assert record(recorded, "kvm", boot_disk(tmp_path, READ_AFTER_A_MARK))[0] == "shutdown"
    assert replay(recorded, exit_free_limit_s=1).verified
    patch_ram(recorded, tmp_path / "spin.zst", PATCH_MARK, JUMP_TO_SELF)
    with at_most(20), pytest.raises(Divergence) as info:
        replay(tmp_path / "spin.zst", exit_free_limit_s=1)
    message = str(info.value)
    assert "diverged at event 1:" in message and "pio_read port 0x3fd" in message
    assert "without a port, MMIO or HLT exit" in message


ID_READ_LOOP = f"""
    movl    $100, %ecx
1:  movl    {hw.LAPIC_ADDR + 0x20:#x}, %eax
    loop    1b
    movb    $0x55, %al
    outb    %al, $0x80
{SHUTDOWN}
"""
LOOP_100, LOOP_200 = b"\xb9\x64\x00\x00\x00", b"\xb9\xc8\x00\x00\x00"     # movl $100 / $200, %ecx


def test_pure_reads_past_the_next_event_diverge_naming_it(engine, tmp_path):
    """Reads of the LAPIC ID register are no events (emu serves them in C, kvm counts their
    exits): a guest that goes on reading past the next event's position diverges there."""
    recorded = tmp_path / "t.zst"
    assert record(recorded, engine, kernel=multiboot_kernel(tmp_path, ID_READ_LOOP))[0] == "shutdown"
    assert replay(recorded).verified
    patch_ram(recorded, tmp_path / "longer.zst", LOOP_100, LOOP_200)
    with at_most(20), pytest.raises(Divergence) as info:
        replay(tmp_path / "longer.zst")
    message = str(info.value)
    assert "diverged at event 0:" in message and "pio_write port 0x80 size 1 value 0x55" in message
    if engine == "kvm":
        assert "the guest did a read of the LAPIC ID register at position 101" in message


# ------------------------------------------------------------------ 2. recordings that end in a fault
NO_IDT = """
    lidt    empty_idt
    {fault}
1:  jmp     1b
empty_idt:
    .word   0
    .long   0
"""
FAULTS = {
    "triple fault": NO_IDT.format(fault="xorl %ecx, %ecx\n    divl %ecx"),
    "code fetched beyond RAM": "movl $0x7000000, %eax\n    jmp *%eax",
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_recording_that_ends_in_a_fault_replays_verified_on_emu(tmp_path, fault):
    trace = tmp_path / "t.zst"
    kernel = multiboot_kernel(tmp_path, FAULTS[fault])
    assert record(trace, "emu", kernel=kernel)[0] == "fault"          # 4 MiB of RAM
    end = footer(trace)
    assert end["end"] == "fault" and end["detail"].startswith("guest shut down: ")
    result = replay(trace)
    assert result.verified and result.guest_end == end["detail"]
    shown = cli("replay", "--quiet", str(trace))
    assert shown.returncode == 0, shown
    assert shown.stdout.startswith("replay verified:") and end["detail"] in shown.stdout


# Data beyond RAM is the open bus on both engines, as on a PC: reads give all-ones, writes go
# nowhere, and the guest goes on. A `rep stos` that runs off the end of RAM (4 MiB here) fills
# RAM up to its end and goes on too. The guest prints 'O' if all of that held, then '.'.
OPEN_BUS = f"""
    movl    $0x7000000, %eax
    movl    (%eax), %ebx
    movl    $0x12345678, (%eax)
    movl    (%eax), %ecx
    cmpl    $0xFFFFFFFF, %ebx
    jne     1f
    cmpl    $0xFFFFFFFF, %ecx
    jne     1f
    movl    $0x3FFFF0, %edi
    movl    $100, %ecx
    movb    $0x5A, %al
    cld
    rep stosb
    cmpl    $0x3FFFF0 + 100, %edi
    jne     1f
    cmpb    $0x5A, 0x3FFFFF
    jne     1f
    movb    $'O', %al
    outb    %al, ${hw.DEBUG_CON_PORT:#x}
1:  movb    $'.', %al
    outb    %al, ${hw.DEBUG_CON_PORT:#x}
    {SHUTDOWN}
"""


@pytest.mark.parametrize("engine", ["emu", "kvm"])
def test_data_beyond_ram_is_the_open_bus_on_both_engines(tmp_path, engine, request):
    if engine == "kvm":
        request.getfixturevalue("require_kvm")
    trace = tmp_path / "t.zst"
    assert record(trace, engine, kernel=multiboot_kernel(tmp_path, OPEN_BUS)) == ("shutdown", b"O.")
    replayed = io.BytesIO()
    assert replay(trace, output=replayed).verified and replayed.getvalue() == b"O."

def test_a_fault_that_differs_from_the_recorded_end_diverges(tmp_path):
    trace = tmp_path / "t.zst"
    assert record(trace, "emu", kernel=multiboot_kernel(tmp_path, FAULTS["triple fault"]))[0] == "fault"

    def other_fault(rec):
        if rec[0] == Kind.FOOTER:
            rec[1] = {**rec[1], "detail": "guest shut down: triple fault delivering vector 13: elsewhere"}
        return rec
    rewrite(trace, tmp_path / "other.zst", other_fault)
    with pytest.raises(Divergence, match="vector 0: vector 8 beyond the IDT limit at position 3"):
        replay(tmp_path / "other.zst")


def test_a_recorded_fault_the_replay_does_not_reach_diverges(tmp_path):
    trace = tmp_path / "t.zst"
    source = FAULTS["triple fault"].replace("xorl %ecx, %ecx", "nop\n    nop\n    nop\n    xorl %ecx, %ecx")
    assert record(trace, "emu", kernel=multiboot_kernel(tmp_path, source))[0] == "fault"
    patch_ram(trace, tmp_path / "spin.zst", PATCH_MARK, JUMP_TO_SELF)
    with pytest.raises(Divergence, match="reached it without stopping"):
        replay(tmp_path / "spin.zst")


def test_a_triple_fault_on_kvm_is_the_guests_end_recorded_and_replayed_verified(require_kvm, tmp_path):
    trace = tmp_path / "t.zst"
    assert record(trace, "kvm", kernel=multiboot_kernel(tmp_path, FAULTS["triple fault"]))[0] == "fault"
    end = footer(trace)
    assert (end["end"], end["detail"]) == ("fault", "guest shut down: triple fault")
    result = replay(trace)
    assert result.verified and result.guest_end == "guest shut down: triple fault"


def test_an_int3_through_an_empty_idt_on_kvm_ends_as_recorded_and_replays_verified(require_kvm, tmp_path):
    """A triple fault on real hardware; PVM's KVM cannot emulate INT3 or INT n at all (even
    through a valid IDT) and reports an internal error: 'unsupported'. Either way the recording
    is complete and its end is what the replay must reproduce."""
    trace = tmp_path / "t.zst"
    reason, _ = record(trace, "kvm", kernel=multiboot_kernel(tmp_path, NO_IDT.format(fault="int3")))
    assert reason in ("fault", "unsupported")
    if reason == "unsupported":                       # says what KVM could not do, and what to do
        assert "a software interrupt, which PVM cannot emulate; try --engine emu" in footer(trace)["detail"]
    result = replay(trace)
    assert result.verified and result.guest_end == footer(trace)["detail"]


# ------------------------------------------------------------------ 3. narrow LAPIC ID reads
LAPIC_ID_READS = f"""
    movw    {hw.LAPIC_ADDR + 0x20:#x}, %ax        # 16-bit
    outw    %ax, $0x80
    movb    {hw.LAPIC_ADDR + 0x23:#x}, %al        # 8-bit, the byte holding the ID
    outb    %al, $0x80
    movb    {hw.LAPIC_ADDR + 0x20:#x}, %al
    outb    %al, $0x80
    movl    {hw.LAPIC_ADDR + 0x21:#x}, %eax       # unaligned 32-bit
    outl    %eax, $0x80
    movl    {hw.LAPIC_ADDR + 0x20:#x}, %eax       # the 32-bit read: not logged, counted
    outl    %eax, $0x80
    movl    {hw.LAPIC_ADDR + 0x20:#x}, %eax
    outl    %eax, $0x80
{SHUTDOWN}
"""


def test_narrow_and_unaligned_lapic_id_reads_record_and_replay(engine, tmp_path):
    trace = tmp_path / "t.zst"
    assert record(trace, engine, kernel=multiboot_kernel(tmp_path, LAPIC_ID_READS))[0] == "shutdown"
    logged = [(r[2] - hw.LAPIC_ADDR, r[3]) for r in records(trace) if r[0] == Kind.MMIO_READ]
    if engine == "kvm":                  # KVM hands the access over as the guest made it
        assert logged == [(0x20, 2), (0x23, 1), (0x20, 1), (0x21, 4)]
        assert footer(trace)["lapic_id_reads"] == 2
    else:                                # QEMU splits the unaligned read into two aligned ones
        assert logged == [(0x20, 2), (0x23, 1), (0x20, 1), (0x24, 4)]
        assert footer(trace)["lapic_id_reads"] == 3
    assert replay(trace).verified


# ------------------------------------------------------------------ 4. console output
REP_OUTSB = f"""
    xorw    %ax, %ax
    movw    %ax, %ds
    cld
    movw    $0x3F8, %dx
    movw    $text, %si
    movw    $6, %cx
    rep outsb
    movw    ${hw.DEBUG_CON_PORT:#x}, %dx
    movw    $text, %si
    movw    $6, %cx
    rep outsb
{SHUTDOWN}
text:
    .ascii  "hello\\n"
"""
PRINT_LOOP = f"""
    xorw    %ax, %ax
    movw    %ax, %ds
    movw    $0x3F8, %dx
    movw    $text, %si
2:  lodsb
    testb   %al, %al
    jz      3f
    outb    %al, %dx
    jmp     2b
3:
{SHUTDOWN}
text:
    .asciz  "print loop\\n"
"""
# The divisor latch and loopback: neither sends a byte, so neither is console output.
UART_MODES = f"""
    movw    $0x3FB, %dx             # LCR: DLAB on
    movb    $0x83, %al
    outb    %al, %dx
    movw    $0x3F8, %dx             # divisor low byte, not a character
    movb    $0x41, %al
    outb    %al, %dx
    movw    $0x3FB, %dx             # DLAB off
    movb    $0x03, %al
    outb    %al, %dx
    movw    $0x3FC, %dx             # MCR: loopback
    movb    $0x10, %al
    outb    %al, %dx
    movw    $0x3F8, %dx             # looped back as input, not output
    movb    $0x42, %al
    outb    %al, %dx
    movw    $0x3FC, %dx             # loopback off
    movb    $0x00, %al
    outb    %al, %dx
    movw    $0x3F8, %dx
    movb    $0x43, %al
    outb    %al, %dx
{SHUTDOWN}
"""
# Long string writes (the kvm run structure holds at most a page of data per exit), then a
# polling loop on the line status register (consecutive reads of one port: a run on kvm).
LONG_STRING_AND_POLLING = f"""
    xorw    %ax, %ax
    movw    %ax, %ds
    cld
    movw    ${hw.DEBUG_CON_PORT:#x}, %dx
    movw    $0x7C00, %si
    movw    $10000, %cx
    rep outsb
    movw    $0x3FD, %dx
    movw    $3000, %cx
4:  inb     %dx, %al
    loop    4b
{SHUTDOWN}
"""
CONSOLE_GUESTS = {"rep outsb": (REP_OUTSB, b"hello\nhello\n"), "print loop": (PRINT_LOOP, b"print loop\n"),
                  "divisor latch and loopback": (UART_MODES, b"C"),
                  "long string write and polling": (LONG_STRING_AND_POLLING, None)}


@pytest.mark.parametrize("guest", CONSOLE_GUESTS)
def test_console_output_replays_the_same_on_both_engines(engine, tmp_path, guest):
    source, expected = CONSOLE_GUESTS[guest]
    trace = tmp_path / "t.zst"
    reason, shown = record(trace, engine, boot_disk(tmp_path, source))
    assert reason == "shutdown"
    if expected is not None:
        assert shown == expected
    result = replay(trace)
    assert result.verified, result
    assert result.console == shown
    assert result.instructions == footer(trace)["position"]      # the same position unit counted


@pytest.mark.parametrize("guest", ["rep outsb", "divisor latch and loopback"])
def test_the_console_table_of_analyze_decodes_the_same_way(tmp_path, guest):
    trace = tmp_path / "t.zst"
    _, shown = record(trace, "emu", boot_disk(tmp_path, CONSOLE_GUESTS[guest][0]))
    load_trace(trace, tmp_path / "t.db")
    assert console_text(sqlite_utils.Database(tmp_path / "t.db")) == shown.decode()


def test_kvm_print_loop_is_a_run_of_exits_replayed_exit_by_exit(require_kvm, tmp_path):
    trace = tmp_path / "t.zst"
    assert record(trace, "kvm", boot_disk(tmp_path, PRINT_LOOP))[0] == "shutdown"
    runs = [r for r in records(trace) if r[0] == Kind.PIO_WRITE_RUN and r[2] == hw.COM1_PORT]
    assert runs and bytes(runs[0][5]) == b"print loop\n"       # eleven exits, one record
    assert replay(trace).verified


# ------------------------------------------------------------------ kvm: the end between exits
COUNT_THEN_SPIN = """
    movb    $0x78, %al
    movw    $0x3F8, %dx
    outb    %al, %dx
    xorl    %ecx, %ecx
1:  incl    %ecx
    cmpl    $1000, %ecx
    jne     1b
2:  jmp     2b
"""


def test_kvm_recording_stopped_between_exits_replays_to_its_final_registers(require_kvm, tmp_path):
    """The session times out while the guest spins after its last exit: the footer's registers
    (ecx = 1000, at the spin) are where the replay must end, found as a landmark."""
    trace = tmp_path / "t.zst"
    assert record(trace, "kvm", boot_disk(tmp_path, COUNT_THEN_SPIN), timeout_s=0.3)[0] == "timeout"
    assert footer(trace)["final_state"]["regs"]["rcx"] == 1000
    result = replay(trace)
    assert result.verified and result.console == b"x"


def test_a_timeline_goes_to_a_recorded_fault_and_back(tmp_path):
    from replayvm.replay.timeline import Timeline

    trace = tmp_path / "t.zst"
    assert record(trace, "emu", kernel=multiboot_kernel(tmp_path, FAULTS["code fetched beyond RAM"]))[0] == "fault"
    timeline = Timeline(trace, checkpoint_every=5)
    try:
        assert timeline.seek(timeline.end).position == timeline.end == footer(trace)["position"]
        at_end = timeline.registers().regs
        assert timeline.seek(1).position == 1
        assert timeline.cont().reason == "end" and timeline.position == timeline.end
        assert timeline.registers().regs == at_end
    finally:
        timeline.close()
