"""The Unicorn engine on small hand-written guests: exact counts, port I/O, delivery, faults."""

from __future__ import annotations

import mmap
import struct


from replayvm.bus import Bus, PioBus
from replayvm.clock import VirtualClock
from replayvm.engines.base import CpuState, Segment, StopReason, real_mode_state
from replayvm.engines.emu import EmuEngine
from tests.asm import assemble

CODE = 0x10000
GDT = 0x1000
IDT = 0x2000
TSS = 0x3000
KSTACK = 0x80000
USTACK = 0x90000
PGDIR = 0x4000


class PortLog:
    """A test device remembering writes and answering reads with a fixed value."""

    def __init__(self, answer: int = 0x5A) -> None:
        self.writes: list[tuple[int, int, int]] = []
        self.reads = 0
        self.answer = answer

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return self.answer

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


class Interrupts:
    def __init__(self) -> None:
        self.pending: list[int] = []

    def has_pending(self) -> bool:
        return bool(self.pending)

    def acknowledge(self) -> int:
        return self.pending.pop(0)


class TinyMachine:
    def __init__(self) -> None:
        self._map = mmap.mmap(-1, 16 << 20)
        self.ram = memoryview(self._map)
        self.pio = PioBus()
        self.mmio = Bus("mmio")
        self.interrupts = Interrupts()
        self.clock = VirtualClock()
        self.port = PortLog()
        self.pio.register(0x80, 16, self.port, "log")

    def poll(self):
        return None

    def read_tsc(self) -> int:
        return 0x1234_5678_9ABC


def descriptor(base: int, limit: int, access: int, flags: int = 0xC) -> int:
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40)
            | (((limit >> 16) & 0xF) << 48) | (flags << 52) | (((base >> 24) & 0xFF) << 56))


def gate(selector: int, offset: int, dpl: int, trap: bool = False) -> int:
    kind = 0xF if trap else 0xE
    return (offset & 0xFFFF) | (selector << 16) | ((0x80 | dpl << 5 | kind) << 40) | ((offset >> 16) << 48)


GATE_MACRO = r"""
.macro SETGATE vec, handler, dpl
    mov $\handler, %eax
    mov %ax, 0x2000+\vec*8
    movw $0x08, 0x2000+\vec*8+2
    movw $(0x8E00 | (\dpl << 13)), 0x2000+\vec*8+4
    shr $16, %eax
    mov %ax, 0x2000+\vec*8+6
.endm
.macro TO_USER entry
    pushl $0x23
    pushl $0x90000
    pushl $0x2
    pushl $0x1b
    pushl $\entry
    iret
.endm
"""


# A #PF handler for 4 MiB paging: reports the error code (port 0x84) and CR2 (0x88), maps the
# faulting 4 MiB as a user-writable page and returns to retry the access.
PAGE_FAULT_HANDLER = """pf:
    pop %eax
    out %eax, $0x84          # error code
    mov %cr2, %eax
    out %eax, $0x88
    shr $22, %eax
    mov %eax, %ebx
    shl $22, %eax
    or $0x87, %eax
    mov %eax, 0x4000(,%ebx,4)
    mov %cr3, %eax
    mov %eax, %cr3           # flush the TLB
    iret
"""


def protected_machine(code: str, handlers: dict[int, str] | None = None, paging: bool = False):
    """A flat 32-bit machine with ring 0/3 segments, a TSS, an IDT and optional 4 MiB paging."""
    m = TinyMachine()
    gdt = [0, descriptor(0, 0xFFFFF, 0x9A), descriptor(0, 0xFFFFF, 0x92),
           descriptor(0, 0xFFFFF, 0xFA), descriptor(0, 0xFFFFF, 0xF2),
           descriptor(TSS, 103, 0x89, 0x0)]
    m.ram[GDT:GDT + 8 * len(gdt)] = b"".join(struct.pack("<Q", d) for d in gdt)
    tss = bytearray(104)
    struct.pack_into("<II", tss, 4, KSTACK, 0x10)
    m.ram[TSS:TSS + 104] = bytes(tss)
    handler_src = ""
    for vector, body in (handlers or {}).items():
        handler_src += f"\nhandler_{vector}:\n{body}\n"
    binary = assemble(GATE_MACRO + code + "\n" + handler_src, CODE)
    m.ram[CODE:CODE + len(binary)] = binary
    engine = EmuEngine(m)
    state = CpuState()
    state.regs = {n: 0 for n in CpuState.GPR_NAMES}
    state.regs.update(rip=CODE, rflags=0x2, rsp=KSTACK)
    state.cr0 = 0x11
    if paging:
        m.ram[PGDIR:PGDIR + 4] = struct.pack("<I", 0x87)        # 0-4 MiB: present, writable, user, 4 MiB
        state.cr3, state.cr4, state.cr0 = PGDIR, 0x10, 0x80000011
    state.gdt = (GDT, 8 * len(gdt) - 1)
    state.idt = (IDT, 256 * 8 - 1)
    state.cs = Segment(selector=0x08, limit=0xFFFFFFFF, type=0xB, db=1, g=1)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(state, name, Segment(selector=0x10, limit=0xFFFFFFFF, db=1, g=1))
    state.tr = Segment(selector=0x28, base=TSS, limit=103, type=0xB, s=0)
    engine.set_state(state)
    return m, engine



def test_instruction_count_is_exact():
    m, engine = protected_machine("1: inc %eax\n jmp 1b")
    assert engine.run(max_instructions=1001) is StopReason.BUDGET
    assert engine.icount == 1001
    assert engine.reg("eax") == 501          # inc, jmp, inc, ... : 501 incs in 1001 instructions
    assert engine.run(max_instructions=1) is StopReason.BUDGET
    assert engine.reg("eax") == 501 and engine.icount == 1002


def test_port_io_reaches_the_bus_and_hlt_halts():
    m, engine = protected_machine("mov $0x42, %al\n out %al, $0x80\n in $0x81, %al\n"
                                  "mov %eax, %ebx\n mov $0x84, %dx\n mov $0xdeadbeef, %eax\n out %eax, (%dx)\n hlt")
    assert engine.run(max_instructions=100) is StopReason.HALT
    assert m.port.writes == [(0, 1, 0x42), (4, 4, 0xDEADBEEF)]
    assert engine.reg("ebx") & 0xFF == 0x5A
    assert engine.icount == 8


def test_rdtsc_is_the_machines_value():
    m, engine = protected_machine("rdtsc\n hlt")
    engine.run(max_instructions=10)
    assert (engine.reg("edx") << 32 | engine.reg("eax")) == 0x1234_5678_9ABC


def test_syscall_from_ring3_switches_to_the_tss_stack_and_irets_back():
    code = """
    SETGATE 0x40, syscall, 3
    TO_USER user
user:
    mov $7, %ebx
    int $0x40
    int $0x40
    mov %esp, %ecx
    int $0x41            # DPL 0 gate from ring 3: #GP(0x41*8+2)
"""
    handlers = {
        0x40: "syscall:\n mov %esp, %eax\n out %eax, $0x84\n mov 4(%esp), %eax\n out %eax, $0x84\n"
              " mov %ebx, %eax\n out %al, $0x80\n iret",
    }
    m, engine = protected_machine(code.replace("SETGATE 0x40, syscall, 3",
                                               "SETGATE 0x40, syscall, 3\n SETGATE 13, gp, 0"),
                                  {**handlers, 13: "gp:\n pop %eax\n out %eax, $0x88\n hlt"})
    assert engine.run(max_instructions=10_000) is StopReason.HALT, engine.last_error
    writes = m.port.writes
    frame_esp = KSTACK - 20                           # ss, esp, eflags, cs, eip pushed on esp0
    assert writes[0] == (4, 4, frame_esp)
    assert writes[1] == (4, 4, 0x1B)                  # the user CS is in the frame
    assert writes[2] == (0, 1, 7)
    assert writes[3:6] == [(4, 4, frame_esp), (4, 4, 0x1B), (0, 1, 7)]
    assert writes[6] == (8, 4, 0x41 * 8 + 2)          # error code of the refused software int
    assert engine.reg("cs") == 0x08 and engine.reg("ecx") == USTACK


def test_repeated_page_faults_each_arrive_as_page_faults_with_error_codes():
    # Unicorn leaves QEMU's "exception in flight" set, which makes the 2nd #PF a double fault and
    # the 3rd a triple fault unless the engine clears it.
    code = """
    SETGATE 14, pf, 0
    TO_USER user
user:
    movl $1, 0x400000
    movl $2, 0x800000
    movl 0xC00000, %eax
    int $0x40
"""
    pf = PAGE_FAULT_HANDLER
    m, engine = protected_machine(code.replace("SETGATE 14, pf, 0", "SETGATE 14, pf, 0\n SETGATE 0x40, done, 3"),
                                  {14: pf, 0x40: "done:\n hlt"}, paging=True)
    assert engine.run(max_instructions=10_000) is StopReason.HALT, engine.last_error
    assert m.port.writes == [(4, 4, 6), (8, 4, 0x400000), (4, 4, 6), (8, 4, 0x800000),
                             (4, 4, 4), (8, 4, 0xC00000)]     # user write, user write, user read
    assert m.ram[0x400000] == 1 and m.ram[0x800000] == 2


def test_port_io_from_user_mode_is_a_general_protection_fault():
    code = """
    SETGATE 13, gp, 0
    mov $user_out, %esi
    TO_USER user
user:
    mov $0x99, %al
user_out:
    out %al, $0x80
"""
    m, engine = protected_machine(code, {13: "gp:\n pop %eax\n out %eax, $0x84\n pop %eax\n out %eax, $0x88\n"
                                              " mov %esi, %eax\n out %eax, $0x88\n hlt"})
    assert engine.run(max_instructions=10_000) is StopReason.HALT, engine.last_error
    error_code, fault_eip, user_out = m.port.writes
    assert error_code == (4, 4, 0)
    assert fault_eip == user_out                  # the faulting EIP is the OUT itself


def test_external_interrupt_waits_for_if_and_the_sti_shadow():
    code = """
    SETGATE 0x30, ext, 0
    cli
    mov $1, %al
    out %al, $0x80
    sti
    out %al, $0x81            # still in STI's shadow: runs before the interrupt
    mov $2, %al
    out %al, $0x81
    hlt
"""
    m, engine = protected_machine(code, {0x30: "ext:\n push %eax\n mov $0x30, %al\n out %al, $0x82\n pop %eax\n iret"})
    m.interrupts.pending.append(0x30)
    seen = []
    engine.on_interrupt = lambda vector, icount: seen.append((vector, icount))
    assert engine.run(max_instructions=10_000) is StopReason.HALT
    assert m.port.writes == [(0, 1, 1), (1, 1, 1), (2, 1, 0x30), (1, 1, 2)]
    assert len(seen) == 1 and seen[0][0] == 0x30


def test_real_mode_interrupt_uses_the_ivt():
    m = TinyMachine()
    code = assemble("""
    movw $handler, 0x30*4
    movw $0, 0x30*4+2
    mov $0x7000, %sp
    int $0x30
    mov $2, %al
    out %al, $0x80
    hlt
handler:
    mov $1, %al
    out %al, $0x80
    iret
""", 0x7C00, bits=16)
    m.ram[0x7C00:0x7C00 + len(code)] = code
    engine = EmuEngine(m)
    engine.set_state(real_mode_state(0, 0x7C00))
    assert engine.run(max_instructions=1000) is StopReason.HALT, engine.last_error
    assert m.port.writes == [(0, 1, 1), (0, 1, 2)]


def test_triple_fault_is_a_shutdown_with_a_reason():
    m, engine = protected_machine("int $3")   # no IDT entries at all: #NP, then #DF, then shutdown
    assert engine.run(max_instructions=1000) is StopReason.SHUTDOWN
    assert engine.last_error


def test_user_code_at_linear_address_zero_runs():
    # Unicorn treats emu_start's `until` address (0) as an exit unless exits are enabled; xv6's
    # first user program starts at 0.
    m, engine = protected_machine("SETGATE 0x40, done, 3\n TO_USER 0",
                                  {0x40: "done:\n mov %esp, %eax\n out %eax, $0x84\n hlt"}, paging=True)
    user = assemble("push $0x24\n int $0x40", 0)
    m.ram[0:len(user)] = user
    assert engine.run(max_instructions=1000) is StopReason.HALT, engine.last_error
    assert m.port.writes == [(4, 4, KSTACK - 20)]
    assert m.ram[USTACK - 4] == 0x24


def test_undefined_opcode_is_delivered_as_invalid_opcode_fault():
    code = "SETGATE 6, ud, 0\n mov $udinsn, %esi\nudinsn:\n ud2\n"
    m, engine = protected_machine(code, {6: "ud:\n pop %eax\n out %eax, $0x84\n mov %esi, %eax\n out %eax, $0x88\n hlt"})
    assert engine.run(max_instructions=1000) is StopReason.HALT, engine.last_error
    (_, _, eip), (_, _, expected) = m.port.writes
    assert eip == expected                     # #UD reports the undefined instruction itself


def test_a_run_that_ends_on_its_time_budget_ends_settled_with_a_fault_delivered():
    """A fault raised by the last instruction of a run is delivered before the run returns, also
    when the run ends on its time budget: the state at a position is one state, so a recording
    that ends on a timeout inside a page-fault loop replays to the same registers."""
    code = """
    SETGATE 14, pf, 0
loop:
    movl $1, 0x400000
    jmp loop
"""
    again = "pf:\n add $4, %esp\n iret"           # drop the error code, retry: faults forever
    runs = []
    for _ in range(2):
        m, engine = protected_machine(code, {14: again}, paging=True)
        runs.append((m, engine))
    _, timed = runs[0]
    assert timed.run(budget_ns=1) is StopReason.BUDGET
    _, counted = runs[1]
    assert counted.run(until_position=timed.position) is StopReason.BUDGET
    assert counted.position == timed.position
    assert timed.get_state().regs == counted.get_state().regs


def test_setting_a_saved_state_leaves_the_gdt_in_ram_as_it_was():
    """Loading a selector sets its descriptor's accessed bit in RAM, as a CPU does; restoring a
    saved state (a replay or a branch starting from a checkpoint) is not such a load. Without
    care, a branch that went live before the guest's first segment load ended with RAM its replay
    did not have (one bit of xv6's per-CPU GDT)."""
    for paging in (False, True):
        m, engine = protected_machine("1: jmp 1b", paging=paging)
        state = engine.get_state()
        m.ram[GDT:GDT + 48] = bytes(m.ram[GDT:GDT + 48]).replace(b"\x9b", b"\x9a").replace(b"\x93", b"\x92")
        before = bytes(m.ram[GDT:GDT + 48])
        assert before[8 + 5] == 0x9A and before[16 + 5] == 0x92      # not accessed
        engine.set_state(state)
        assert bytes(m.ram[GDT:GDT + 48]) == before
        assert engine.run(max_instructions=10) is StopReason.BUDGET   # and the state runs
        assert engine.reg("eip") == CODE
