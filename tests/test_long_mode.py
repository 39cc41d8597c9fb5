"""64-bit long mode on the emu engine (issue 15), with the long64 test guest (guests/long64).

long64 is a multiboot ELF64 whose 32-bit entry turns on PAE, EFER.LME and paging, far-jumps to
64-bit code, and then takes a page fault in ring 0 (CR2 0x10, error 0) and in ring 3 (error 5),
a #UD, LAPIC timer interrupts on an IST stack in ring 0 and in ring 3, system calls by
`int $0x80` from ring 3, and writes to the UART. Each handler prints what the CPU handed it, so
the console says whether delivery (gates, stack switch, error codes, CR2, iretq) was right.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from replayvm import hw
from replayvm.engines.emu import EmuEngine
from replayvm.guests import guest_file
from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import replay
from replayvm.replay.timeline import Timeline
from replayvm.trace import Kind, TraceReader
from replayvm.trace import format as trace_format
from replayvm.trace.format import FEATURE_X86_64
from replayvm.trace.records import INTERRUPT
from tests import test_emu_blocks, test_emu_engine
from tests.test_gdb import Stub, gdb, run_gdb  # noqa: F401  (gdb: the fixture)
from tests.small_guests import SHUTDOWN
from tests.test_rustos import RUSTOS_RAM_MIB, rustos, xorshift  # noqa: F401  (rustos: the fixture)

REFERENCE = "REPLAYVM_EMU_REFERENCE"
EFER_LMA = 1 << 10
EXPECTED = [
    b"long64: in long mode\n",
    b"#PF cr2 err rip 0000000000000010 0000000000000000 ",       # ring 0: not present, read
    b"#UD rip ",
    b"#PF cr2 err rip 0000000000000020 ",                         # a fetch, ring 0
    b"long64: timer ticks in ring 0\n",
    b"long64: hello from ring 3\n",                               # one int $0x80 per byte
    b"#PF cr2 err rip 00000000001ff000 0000000000000005 ",       # ring 3: present, user, read
    b"long64: back in ring 0, ticks ",                          # on emu's virtual clock: 6
]


@pytest.fixture(scope="module")
def kernel() -> Path:
    return guest_file("long64", "kernel.elf")


def record(trace: Path, kernel: Path, engine: str = "emu") -> tuple[bytes, object]:
    out = io.BytesIO()
    outcome, machine = run_session(SessionOptions(engine=engine, kernel=kernel, ram_mib=16, trace=trace,
                                                  timeout_s=60, virtual_clock=engine == "emu"),
                                   output=out)
    assert outcome.reason == "shutdown" and "debug port" in outcome.detail, outcome
    return out.getvalue(), machine


def check_console(shown: bytes) -> None:
    at = 0
    for line in EXPECTED:
        found = shown.find(line, at)
        assert found >= 0, f"{line!r} missing after byte {at} of {shown!r}"
        at = found + len(line)


def events_and_end(trace: Path) -> tuple[list, dict]:
    with TraceReader(trace) as reader:
        header = reader.header
        records = [list(record) for record in reader]
    assert records[-1][0] == Kind.FOOTER
    footer = records.pop()[1]
    return records, {k: v for k, v in footer.items() if k not in ("wall_s", "trace_sha256")}, header


def test_long64_records_and_replays_verified_on_emu(tmp_path, kernel, monkeypatch):
    monkeypatch.delenv(REFERENCE, raising=False)
    trace = tmp_path / "long64.zst"
    shown, _ = record(trace, kernel)
    check_console(shown)
    assert shown.endswith(b"ticks 0000000000000006\n")
    # under EFER.NXE a fetch fault has the I/D bit; a no-execute page is a protection fault
    assert b"#PF cr2 err rip 0000000000000020 0000000000000010 0000000000000020\n" in shown
    assert b"#PF cr2 err rip 00000000001fe000 0000000000000011 00000000001fe000\n" in shown
    events, end, header = events_and_end(trace)
    final = end["final_state"]
    assert final["efer"] & EFER_LMA and final["cs"]["l"] == 1      # it ended in 64-bit code
    assert header["features"] == ["aspace", FEATURE_X86_64]
    interrupts = [e for e in events if e[0] == Kind.INTERRUPT]
    assert len(interrupts) >= 6                                # 3 in ring 0, 3 more in ring 3
    result = replay(trace, output=io.BytesIO())
    assert result.verified and result.console == shown


@pytest.mark.parametrize("artifact", ["kernel.elf", "kernel-syscall.elf"])
def test_long64_positions_equal_the_reference(tmp_path, artifact, monkeypatch):
    """Every event (interrupt positions, port and MMIO accesses) and the final state are those of
    the reference engine, which counts each instruction with its own hook and walks with QEMU.
    kernel-syscall.elf also makes system calls by `syscall`/`sysretq`."""
    kernel = guest_file("long64", artifact)
    monkeypatch.delenv(REFERENCE, raising=False)
    fast = tmp_path / "fast.zst"
    shown_fast, machine = record(fast, kernel)
    # counted per translated block in 64-bit code too: the ring-0 and ring-3 loops alone are
    # ~750,000 blocks of 3-4 instructions (the 32-bit entry is a few hundred blocks)
    assert machine.engine.counting == "blocks" and machine.engine.page_walk == "engine"
    assert machine.engine.counting_statistics()["fast_blocks"] > 500_000
    monkeypatch.setenv(REFERENCE, "1")
    ref = tmp_path / "ref.zst"
    shown_ref, _ = record(ref, kernel)
    assert shown_fast == shown_ref
    check_console(shown_fast)
    if artifact == "kernel-syscall.elf":                # printed by `syscall`, then a ring-3 #PF
        assert b"long64: and by syscall\n#PF cr2 err rip 00000000001ff000 0000000000000005" in shown_fast
    fast_events, fast_end, _ = events_and_end(fast)
    ref_events, ref_end, _ = events_and_end(ref)
    assert [e for e in fast_events if e[0] == Kind.INTERRUPT]
    assert fast_events == ref_events
    assert fast_end == ref_end
    assert replay(fast, output=io.BytesIO()).verified           # under the reference
    monkeypatch.delenv(REFERENCE)
    assert replay(ref, output=io.BytesIO()).verified


def test_seek_and_step_inside_64bit_code(tmp_path, kernel, monkeypatch):
    """Checkpoints restore a long-mode vCPU: seeking back to a position in ring 3 gives the same
    64-bit registers as getting there forwards, and single steps go on from there."""
    monkeypatch.delenv(REFERENCE, raising=False)
    trace = tmp_path / "long64.zst"
    record(trace, kernel)
    timeline = Timeline(trace, checkpoint_every=200_000)
    try:
        end = timeline.end
        target = end - 50_000                          # the ring-3 compute loop, near its end
        timeline.seek(target)
        there = timeline.registers()
        assert there.efer & EFER_LMA and there.cs.selector & 3 == 3
        timeline.seek(end)
        timeline.seek(target)                          # backwards: from a checkpoint
        assert timeline.registers() == there
        stop = timeline.step(2)                        # the loop is 3 instructions long
        assert stop.position == target + 2
        assert timeline.registers().regs["rip"] != there.regs["rip"]
        assert timeline.read_memory(there.regs["rip"], 2)        # through the 4-level walk
    finally:
        timeline.close()


def test_a_reader_without_the_feature_refuses_a_64bit_trace(tmp_path, kernel, monkeypatch):
    trace = tmp_path / "long64.zst"
    record(trace, kernel)
    monkeypatch.setattr(trace_format, "KNOWN_FEATURES", frozenset())
    import replayvm.trace.reader as reader_module
    monkeypatch.setattr(reader_module, "KNOWN_FEATURES", frozenset())
    with pytest.raises(Exception, match="x86-64"):
        replay(trace, output=io.BytesIO())


@pytest.mark.kvm
def test_long64_on_kvm(tmp_path, require_kvm):
    """The guest on the kvm engine (PVM runs long mode; `int $0x80` from ring 3 arrives there as
    #UD, which long64's #UD handler takes as the system call). Its PVM build waits for the timer
    with HLT and masks it in ring 3: landmarks between exits are the kvm side of issue 15."""
    trace = tmp_path / "long64-kvm.zst"
    shown, _ = record(trace, guest_file("long64", "kernel-pvm.elf"), engine="kvm")
    check_console(shown)
    assert replay(trace, output=io.BytesIO()).verified


@pytest.mark.kvm
def test_long64_plain_kernel_on_kvm_replays_verified_every_time(tmp_path, require_kvm):
    """The plain kernel.elf on kvm: its ring-0 loop computes with 0.5 ms ticks (each lands between
    exits, after a kick, at a landmark: on the loop's jump target, mid-loop, or after the timer
    handler's iretq when a tick came due inside it), and ring-3 code takes ticks while it makes
    system calls. Every recording must replay verified, wherever host timing put its ticks. The
    recorder before the placement rules (window exits without a landmark, ring-3 points, RF)
    gave 10 verified of 20 on this guest here; with them, 100 of 100."""
    kernel = guest_file("long64", "kernel.elf")
    for attempt in range(3):
        trace = tmp_path / f"long64-plain-kvm-{attempt}.zst"
        shown, _ = record(trace, kernel, engine="kvm")
        check_console(shown)
        with TraceReader(trace) as reader:
            landmarks = sum(1 for r in reader if r[0] == Kind.INTERRUPT and INTERRUPT.get(r, "landmark"))
        # The loop makes no exit and its handler's only exit (the EOI) has IF=0: the 2nd and 3rd
        # ticks always land after a kick or at a window exit, with a landmark (the 1st may come
        # due at an exit before the loop, if the host stalls).
        assert landmarks >= 2, "the ring-0 loop's ticks land between exits"
        result = replay(trace, output=io.BytesIO())
        assert result.verified, (attempt, result)


def amd64_registers(output: str, marker: str) -> str:
    """The `info registers` block after `echo MARKER\\n`: 17 general registers, eflags, 6 segment
    registers, then the control registers."""
    block = output.split(marker + "\n", 1)[1]
    return "\n".join(block.splitlines()[:29])


def test_gdb_shows_amd64_registers_and_steps_in_ring3(gdb, tmp_path, kernel, monkeypatch):
    """On a 64-bit guest's replay gdb gets the amd64 description: 64-bit registers (r8..r15,
    rip), EFER among the control registers; a breakpoint in ring-3 code, stepi, reverse-stepi,
    and a watchpoint on a kernel variable the timer interrupt changes while ring 3 computes."""
    monkeypatch.delenv(REFERENCE, raising=False)
    trace = tmp_path / "long64.zst"
    record(trace, kernel)
    stub = Stub(trace)
    out = run_gdb(gdb, kernel, stub.address, [
        "show architecture", "break user_entry", "continue",
        "echo BEFORE\\n", "info registers",
        "stepi", "echo STEPPED\\n", "info registers",
        "reverse-stepi", "echo BACK\\n", "info registers",
        "delete", "watch *(long *)&ticks", "continue",      # the timer handler's increment
    ])
    stub.finish()
    assert 'currently "i386:x86-64"' in out, out
    assert "Breakpoint 1, 0x0000000000100" in out and "in user_entry ()" in out, out
    before, stepped, back = (amd64_registers(out, m) for m in ("BEFORE", "STEPPED", "BACK"))
    assert re.search(r"^r15\s+0x", before, re.M) and re.search(r"^rip\s+0x[0-9a-f]+\s+0x[0-9a-f]+ <user_entry>",
                                                                before, re.M), before
    assert stepped != before and back == before
    efer = re.search(r"^efer\s+(0x[0-9a-f]+)", out, re.M)
    assert efer and int(efer.group(1), 16) & 0x500 == 0x500, out          # LME and LMA
    assert re.search(r"^cs\s+0x23\b", before, re.M)                        # ring 3
    # a watchpoint maps its address through the 4-level tables at each access
    change = re.search(r"Old value = (\d+)\s+New value = (\d+)", out)
    assert change and int(change.group(2)) == int(change.group(1)) + 1, out
    assert re.search(r"in timer_handler \(\)", out), out


def test_set_state_loads_a_long_mode_cpu(kernel, monkeypatch):
    """get_state/set_state in the middle of ring-3 64-bit code (what a trace's initial state or a
    branch goes through): the same state reads back -- hidden segment flags included, which
    Unicorn's 64-bit mode does not load from selectors -- and the guest runs on to the same end."""
    from replayvm.console import Console
    from replayvm.machine import Machine, MachineConfig

    monkeypatch.delenv(REFERENCE, raising=False)
    outputs = []
    for reload_state in (False, True):
        out = io.BytesIO()
        machine = Machine(MachineConfig(kernel=kernel, ram_mib=16, engine="emu", virtual_clock=True),
                          Console(out))
        try:
            assert machine.x86_64
            engine = machine.engine
            machine.clock.start()
            engine.run(until_position=2_500_000)
            state = engine.get_state()
            assert state.efer & EFER_LMA and state.cs.l == 1 and state.cs.selector & 3 == 3
            if reload_state:
                engine.set_state(state)
                assert engine.get_state() == state
            assert machine.run(timeout_s=1).reason == "shutdown"
        finally:
            machine.close()
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1]
    check_console(outputs[0])


ENGINE_TESTS_IN_32BIT_CODE = {name: test for name, test in vars(test_emu_engine).items()
                              if name.startswith("test_") and callable(test)}


@pytest.mark.parametrize("name", sorted(ENGINE_TESTS_IN_32BIT_CODE))
def test_a_64bit_vcpu_runs_real_and_32bit_code_as_the_32bit_one_does(monkeypatch, name):
    """A 64-bit guest starts in 32-bit (or real) mode: on its vCPU (UC_MODE_64, qemu64, where
    Unicorn loads only selectors and the engine loads segments itself) every test of the 32-bit
    engine -- delivery from ring 3 and ring 0, real-mode IVT, faults, the STI shadow -- passes."""
    monkeypatch.setattr(test_emu_engine.TinyMachine, "x86_64", True, raising=False)
    engine = EmuEngine(test_emu_engine.TinyMachine())
    try:
        assert engine.long_mode_capable
    finally:
        engine.close()
    ENGINE_TESTS_IN_32BIT_CODE[name]()


@pytest.mark.parametrize("name", sorted(n for n in test_emu_blocks.PROGRAMS if "PAE" in n))
def test_a_64bit_vcpu_walks_pae_tables_itself_as_qemu_does(monkeypatch, name):
    """On a 64-bit vCPU the engine's own page walk covers PAE too (a 32-bit one hands PAE to
    QEMU's walk): the PAE programs of the fast-path tests, page faults included, count and end
    exactly as the reference (QEMU's walk, the per-instruction hook), in blocks."""
    monkeypatch.setattr(test_emu_engine.TinyMachine, "x86_64", True, raising=False)
    fast_engine, *fast = test_emu_blocks.run_program(monkeypatch, name, reference=False)
    ref_engine, *ref = test_emu_blocks.run_program(monkeypatch, name, reference=True)
    assert fast_engine.long_mode_capable and fast_engine.page_walk == "engine"
    assert fast_engine.counting == "blocks" and ref_engine.page_walk == "qemu"
    assert fast == ref


def test_rustos_runs_on_emu_and_replays_verified(rustos, tmp_path, monkeypatch):
    """The Rust teaching kernel (guests/rustos) on emu: its shell, the IDE disk, a ring-3 task
    making system calls by `int $0x80` (on emu a real software interrupt through its DPL 3 gate)
    and preempted by the timer while it computes in ring 3 -- each tick at its exact instruction
    -- replayed verified from the trace alone."""
    monkeypatch.delenv(REFERENCE, raising=False)
    trace = tmp_path / "rustos-emu.zst"
    out = io.BytesIO()
    outcome, machine = run_session(SessionOptions(
        engine="emu", kernel=rustos.kernel, disks=list(rustos.disks), trace=trace, virtual_clock=True,
        script=b"disk\nuser 3 1000\nuser 40 1000000\nrace\n", ram_mib=RUSTOS_RAM_MIB, timeout_s=60),
        output=out)
    text = out.getvalue().decode(errors="replace").replace("\r\n", "\n")
    assert outcome.reason == "script-done", text
    assert machine.x86_64 and machine.engine.counting == "blocks" and machine.engine.page_walk == "engine"
    assert "disk: sector 1: hello from the IDE disk, sector 1" in text
    assert f"exits with {xorshift(3 * 1000):#018x} after 3 rounds" in text
    ring3 = re.search(r"after 40 rounds, preempted (\d+) times \((\d+) in ring 3\)", text)
    assert ring3 and int(ring3.group(2)) >= 5, text
    assert re.search(r"race: counter=\d+ expected=\d+", text)
    result = replay(trace, output=io.BytesIO())
    assert result.verified and result.console.decode(errors="replace").replace("\r\n", "\n") == text



# A boot sector that goes from real mode straight to long mode (PAE, EFER.LME, then CR0.PE and
# CR0.PG at once, a far jump to a 64-bit code segment), as disk bootloaders of 64-bit kernels do,
# and prints "46" from 64-bit code ('4' from the upper half of RAX). Nothing in a boot sector says
# it is a 64-bit guest: `record --x86-64` says so.
REAL_TO_LONG_MODE = f"""
    cli
    xorw    %ax, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    movw    $0x7000, %sp
    movw    $0x1000, %di            # PML4, PDPT, PD at 0x1000-0x3FFF: zero them
    movw    $0x0C00, %cx
    xorl    %eax, %eax
    cld
    rep stosl
    movl    $0x2003, 0x1000         # PML4[0] -> PDPT
    movl    $0x3003, 0x2000         # PDPT[0] -> PD
    movl    $0x83, 0x3000           # PD[0]: 2 MiB at 0, writable
    lgdtl   gdtr
    movl    %cr4, %eax
    orl     $0x20, %eax             # PAE
    movl    %eax, %cr4
    movl    $0x1000, %eax
    movl    %eax, %cr3
    movl    $0xC0000080, %ecx       # EFER.LME
    rdmsr
    orl     $0x100, %eax
    wrmsr
    movl    %cr0, %eax
    orl     $0x80000001, %eax       # PE and PG at once: real mode to long mode
    movl    %eax, %cr0
    ljmpl   $0x08, $long_mode
.code64
long_mode:
    movw    $0x10, %ax
    movw    %ax, %ds
    movw    %ax, %ss
    movabsq $0x3400000000, %rax     # only a 64-bit register holds it
    shrq    $32, %rax               # '4'
    outb    %al, ${hw.DEBUG_CON_PORT:#x}
    movb    $'6', %al
    outb    %al, ${hw.DEBUG_CON_PORT:#x}
    {SHUTDOWN}
.align 8
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF        # 64-bit code
    .quad 0x00CF92000000FFFF        # data
gdtr:
    .word 23
    .long gdt
"""


def test_a_disk_that_enters_long_mode_itself_runs_with_x86_64_and_replays_verified(tmp_path):
    from replayvm.errors import GuestFault
    from tests.small_guests import boot_disk

    disk = boot_disk(tmp_path, REAL_TO_LONG_MODE)
    trace = tmp_path / "disk64.zst"
    out = io.BytesIO()
    outcome, machine = run_session(SessionOptions(engine="emu", disks=[disk], trace=trace, ram_mib=4,
                                                  timeout_s=1, virtual_clock=True, x86_64=True), output=out)
    assert outcome.reason == "shutdown" and out.getvalue() == b"46", (outcome, out.getvalue())
    with TraceReader(trace) as reader:
        assert FEATURE_X86_64 in reader.header["features"] and reader.header["boot"] == "disk"
    replayed = io.BytesIO()
    result = replay(trace, output=replayed)
    assert result.verified and replayed.getvalue() == b"46"
    from tests.test_one_machine import cli
    on_the_command_line = cli("record", "--x86-64", "--engine", "emu", "--virtual-clock", "--disk", str(disk),
                              "--timeout", "1", "-o", str(tmp_path / "cli.zst"))
    assert on_the_command_line.stdout.startswith(b"46"), on_the_command_line.stderr
    with pytest.raises(GuestFault, match="triple fault"):     # the 32-bit vCPU cannot enter long mode
        run_session(SessionOptions(engine="emu", disks=[disk], ram_mib=4, timeout_s=1, virtual_clock=True),
                    output=io.BytesIO())


def test_a_disk_that_enters_long_mode_itself_runs_on_kvm(tmp_path, require_kvm):
    from tests.small_guests import boot_disk, record as record_small

    disk = boot_disk(tmp_path, REAL_TO_LONG_MODE)
    reason, shown = record_small(tmp_path / "disk64-kvm.zst", "kvm", disk)
    assert reason == "shutdown" and shown == b"46", (reason, shown)
    assert replay(tmp_path / "disk64-kvm.zst").verified
