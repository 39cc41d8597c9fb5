"""The kvm engine on guests PVM's KVM can run (guests/kvmtests), and the same guests on emu.

KVM is never mocked: every test here runs a real vCPU (skipped without /dev/kvm on a developer
machine, failed on CI). The engine-independent expectations are checked on both engines.
"""

from __future__ import annotations

import threading

import pytest

from replayvm.engines.base import StopReason
from replayvm.guests import guest_file
from tests.harness import (HANG_BUDGET_NS, MmioLog, TestMachine, flat_protected_state,
                           load_realmode_guest)

REALMODE_MARKS = [0x11, 0x22, 0x33, 0x44, 0x55, 0x66]


def make_engine(name: str, machine: TestMachine):
    if name == "kvm":
        from replayvm.engines.kvm import KvmEngine

        return KvmEngine(machine)
    from replayvm.engines.emu import EmuEngine

    return EmuEngine(machine)


def realmode_machine(engine_name: str):
    machine = TestMachine()
    mmio = MmioLog(0xCAFEF00D)
    machine.mmio.register(0xD0000, 0x1000, mmio, "test-mmio")
    ports = machine.ports
    ports.on_write[8] = lambda: machine.interrupts.pending.append(0x30)                  # port 0x88
    ports.on_write[9] = lambda: setattr(machine.interrupts, "timer_at_ns",
                                        machine.clock.now_ns() + 20_000_000)            # port 0x89
    engine = make_engine(engine_name, machine)
    engine.set_state(load_realmode_guest(machine, guest_file("kvmtests", "realmode.bin").read_bytes()))
    return machine, engine, mmio


@pytest.fixture(params=["kvm", "emu"])
def engine_name(request) -> str:
    if request.param == "kvm":
        request.getfixturevalue("require_kvm")
    return request.param


def test_realmode_io_interrupts_and_kick(engine_name):
    machine, engine, mmio = realmode_machine(engine_name)
    reason = engine.run(budget_ns=HANG_BUDGET_NS)          # HALT: the timer came, no budget ran out
    assert reason is StopReason.HALT, engine.last_error
    writes = machine.ports.writes
    marks = [v for off, size, v in writes if off == 0]
    assert marks == REALMODE_MARKS
    assert (2, 1, 0x5A) in writes                                     # port read echoed back
    assert [v for off, size, v in writes if off == 6] == list(b"kvm!")  # rep outsb, byte by byte
    assert [v for off, size, v in writes if off == 4] == [0x1234, 0x5678]   # rep insw
    assert mmio.writes == [(4, 4, 0xCAFEF00D)]
    # The handler ran three times: right away (IF=1), once IF=1 again after the cli stretch, and
    # in the busy loop. emu (like VT-x) takes the second right after STI's one-instruction shadow;
    # PVM's instruction emulator opens the interrupt window only at the guest's next exit (the
    # OUT of mark 0x55), which is still a correct place: IF=1 and no later than that exit.
    sequence = [(off, v) for off, size, v in writes if off in (0, 10)]
    after_sti = [(10, 0x30), (0, 0x55)] if engine_name == "emu" else [(0, 0x55), (10, 0x30)]
    assert sequence[sequence.index((0, 0x22)):] == [
        (0, 0x22), (10, 0x30), (0, 0x33), (0, 0x44), *after_sti, (10, 0x30), (0, 0x66)]
    assert machine.interrupts.acknowledged == [0x30, 0x30, 0x30]
    engine.close()


def test_kvm_kicks_a_guest_that_never_exits(require_kvm):
    machine, engine, _ = realmode_machine("kvm")
    engine.run(budget_ns=HANG_BUDGET_NS)
    assert engine._kicker.kicks >= 1                  # only a kick could deliver the timer
    assert engine.exit_counts["intr"] >= 1            # ... and it interrupted KVM_RUN
    engine.close()


def test_pm32_port_string_and_mmio(engine_name):
    machine = TestMachine(ram_bytes=1 << 20)
    mmio = MmioLog(0x600DF00D)
    machine.mmio.register(0xE0000000, 0x1000, mmio, "test-mmio")
    image = guest_file("kvmtests", "pm32.bin").read_bytes()
    machine.ram[0x1000:0x1000 + len(image)] = image
    engine = make_engine(engine_name, machine)
    engine.set_state(flat_protected_state(0x1000, 0x500, machine.ram))
    assert engine.run(budget_ns=HANG_BUDGET_NS) is StopReason.HALT, engine.last_error
    writes = machine.ports.writes
    assert [v for off, size, v in writes if off == 0] == [0x11, 0x22]
    assert (2, 4, 0x5A) in writes
    assert [v for off, size, v in writes if off == 6] == [0x11111111, 0x22222222, 0x33333333]
    assert mmio.writes == [(8, 4, 0x600DF00D)]
    engine.close()


def test_kvm_state_round_trip(require_kvm):
    machine = TestMachine(ram_bytes=1 << 20)
    engine = make_engine("kvm", machine)
    state = flat_protected_state(0x1234, 0x500, machine.ram)
    state.regs.update(rax=0x1111, rbx=0x2222, rsi=0x3333)
    engine.set_state(state)
    back = engine.get_state()
    assert back.regs["rip"] == 0x1234 and back.regs["rax"] == 0x1111 and back.regs["rsi"] == 0x3333
    assert back.cr0 & 1 and back.cs.selector == 0x08 and back.cs.db == 1 and back.gdt == (0x500, 23)
    engine.close()


def test_kvm_request_stop_from_another_thread(require_kvm):
    machine, engine, _ = realmode_machine("kvm")
    machine.ports.on_write[9] = lambda: None                  # no timer: the busy loop spins forever
    threading.Timer(0.3, engine.request_stop).start()
    # The budget only detects a hang (the engine kicks its own thread: the run stays on this one).
    assert engine.run(budget_ns=HANG_BUDGET_NS) is StopReason.STOP_REQUESTED
    engine.close()


def test_kvm_hardware_breakpoint_stops_at_the_address(require_kvm):
    machine, engine, _ = realmode_machine("kvm")
    image = guest_file("kvmtests", "realmode.bin").read_bytes()
    target = 0x7C00 + image.index(bytes.fromhex("b033"))        # mov $0x33, %al
    engine.set_guest_debug(hw_breakpoints=[target])
    assert engine.run(budget_ns=HANG_BUDGET_NS) is StopReason.DEBUG
    assert engine.get_state().regs["rip"] == target
    assert [v for off, size, v in machine.ports.writes if off == 0] == [0x11, 0x22]
    engine.close()


def test_kvm_reports_32bit_paging_as_unsupported_on_pvm(require_kvm):
    from replayvm.engines.probe import PROBE_CODE, run_paging_probe

    if run_paging_probe():
        pytest.skip("this host's KVM runs 32-bit paging (real VT-x/AMD-V): nothing to report")
    machine = TestMachine(ram_bytes=1 << 20)
    machine.ram[0x1000:0x1000 + len(PROBE_CODE)] = PROBE_CODE
    machine.ram[0x2000:0x2004] = (0x83).to_bytes(4, "little")
    engine = make_engine("kvm", machine)
    engine.set_state(flat_protected_state(0x1000, 0x500, machine.ram))
    assert engine.run(budget_ns=HANG_BUDGET_NS) is StopReason.UNSUPPORTED
    assert "32-bit paged" in engine.last_error and "--engine emu" in engine.last_error
    engine.close()


def test_auto_engine_choice_says_why(require_kvm):
    from replayvm.engines.probe import choose_engine, run_paging_probe

    name, reason = choose_engine("auto")
    assert name == ("kvm" if run_paging_probe() else "emu")
    assert reason


def long_mode_state(machine: TestMachine):
    """64-bit long mode at 0x1000: identity-mapped 2 MiB pages (the first 4 MiB), flat segments."""
    import struct

    from replayvm.engines.base import CpuState, Segment

    pml4, pdpt, pd, gdt = 0x8000, 0x9000, 0xA000, 0x500
    machine.ram[pml4:pml4 + 8] = struct.pack("<Q", pdpt | 3)
    machine.ram[pdpt:pdpt + 8] = struct.pack("<Q", pd | 3)
    machine.ram[pd:pd + 16] = struct.pack("<QQ", 0x83, 0x200000 | 0x83)   # 2 MiB pages (1 GiB: not on PVM)
    machine.ram[gdt:gdt + 24] = struct.pack("<QQQ", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)
    state = CpuState()
    state.regs = {name: 0 for name in CpuState.GPR_NAMES}
    state.regs.update(rip=0x1000, rflags=2, rsp=0x7000)
    state.cr0, state.cr3, state.cr4, state.efer = 0x80000011, pml4, 0x20, 0x500    # PG PE, PAE, LME LMA
    state.gdt = (gdt, 23)
    state.cs = Segment(selector=0x08, limit=0xFFFFFFFF, type=0xB, l=1, db=0, g=1)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(state, name, Segment(selector=0x10, limit=0xFFFFFFFF, type=3, db=1, g=1))
    return state


def test_kvm_long_mode_guest_exits_and_takes_a_kicked_interrupt(require_kvm):
    machine = TestMachine(ram_bytes=1 << 20)
    mmio = MmioLog(0x0BADCAFE)
    machine.mmio.register(0x200000, 0x1000, mmio, "test-mmio")
    machine.ports.on_write[9] = lambda: setattr(machine.interrupts, "timer_at_ns",
                                                machine.clock.now_ns() + 20_000_000)
    image = guest_file("kvmtests", "long64.bin").read_bytes()
    machine.ram[0x1000:0x1000 + len(image)] = image
    engine = make_engine("kvm", machine)
    engine.set_state(long_mode_state(machine))
    assert engine.run(budget_ns=HANG_BUDGET_NS) is StopReason.HALT, engine.last_error
    writes = machine.ports.writes
    assert [v for off, size, v in writes if off == 0] == [0x11, 0x22, 0x66]
    assert (2, 1, 0x5A) in writes and (10, 1, 0x30) in writes
    assert mmio.writes == [(8, 4, 0x0BADCAFE)]
    assert engine._kicker.kicks >= 1 and machine.interrupts.acknowledged == [0x30]
    assert engine.get_state().efer & 0x400                       # still in long mode (LMA)
    engine.close()


# A 64-bit ring-0 loop (20 iterations) and an interrupt handler that counts its calls at 0x3000.
LANDMARK_LOOP = """
    xorl    %ecx, %ecx
1:  incq    %rcx
    imulq   $3, %rcx, %rdx
    cmpq    $20, %rcx
    jb      1b
    hlt
.org 0x100
    incq    0x3000
    iretq
"""
LOOP_TARGET, HANDLER, VECTOR = 0x1002, 0x1100, 0x30


def landmark_loop_engine():
    import struct

    from tests.asm import assemble

    machine = TestMachine(ram_bytes=1 << 22)
    code = assemble(LANDMARK_LOOP, 0x1000, bits=64)
    machine.ram[0x1000:0x1000 + len(code)] = code
    idt = 0x4000
    machine.ram[idt + VECTOR * 16:idt + VECTOR * 16 + 16] = struct.pack(
        "<HHHHII", HANDLER & 0xFFFF, 0x08, 0x8E00, HANDLER >> 16 & 0xFFFF, HANDLER >> 32, 0)
    engine = make_engine("kvm", machine)
    state = long_mode_state(machine)
    state.idt = (idt, 0xFFF)
    state.regs["rflags"] = 0x202
    engine.set_state(state)
    engine.places_interrupts = False          # injected as the test says (as on replay)
    return machine, engine


def test_kvm_breakpoint_stops_at_a_jump_target_and_an_iretq_return_every_time(require_kvm):
    """What replay's landmark search relies on, on PVM's emulated ring 0: a hardware breakpoint
    on a backward jump's target stops on every arrival (20 of 20, RF never set there), and one
    on an interrupt's return address stops right after the handler's iretq, before the
    instruction runs (the kernel.S comment once blamed these for missed landmarks)."""
    machine, engine = landmark_loop_engine()
    stops = []
    engine.set_guest_debug(hw_breakpoints=[LOOP_TARGET])
    while engine.run(budget_ns=HANG_BUDGET_NS) is StopReason.DEBUG:
        state = engine.get_state()
        stops.append((state.regs["rip"], state.regs["rcx"], state.regs["rflags"] & (1 << 16)))
        if len(stops) == 5 and not machine.ram[0x3000]:
            machine.interrupts.pending.append(VECTOR)   # delivered here; iretq returns here
            continue
        engine.set_guest_debug(single_step=True)
        engine.run(budget_ns=HANG_BUDGET_NS)
        engine.set_guest_debug(hw_breakpoints=[LOOP_TARGET])
    engine.close()
    assert machine.ram[0x3000] == 1 and machine.interrupts.acknowledged == [VECTOR]
    # 20 arrivals by the loop, and once more at the 5th (rcx 4) after the handler's iretq
    assert [rcx for rip, rcx, rf in stops] == [0, 1, 2, 3, 4, 4] + list(range(5, 20))
    assert {rip for rip, rcx, rf in stops} == {LOOP_TARGET} and not any(rf for rip, rcx, rf in stops)
