"""The emu engine's fast path (translated blocks without the per-instruction hook, counted per
block) against its reference (the hook on every instruction), on small guests that put each
hard case inside a block: port I/O, MMIO-free faults, INT n, page faults in the middle of a
`rep stos`, self-modifying code, an STI shadow, an undefined opcode. The same program must show
the same instruction count at every device access, at the end, and at every single step."""

from __future__ import annotations

import pytest

from replayvm.engines.base import StopReason
from replayvm.engines.emu import EmuEngine
from tests import test_emu_engine
from tests.test_emu_engine import PAGE_FAULT_HANDLER, PortLog, protected_machine

REFERENCE = "REPLAYVM_EMU_REFERENCE"


class PositionLog(PortLog):
    """Port accesses with the engine's position at each (the instruction doing it counts)."""

    engine: EmuEngine | None = None

    def __init__(self) -> None:
        super().__init__()
        self.accesses: list[tuple] = []

    def read(self, offset: int, size: int) -> int:
        self.accesses.append(("in", self.engine.icount, offset, size))
        if offset == 4:                          # port 0x84 counts its reads
            self.reads += 1
            return (0x1000 + self.reads) & ((1 << (8 * size)) - 1)
        return super().read(offset, size)

    def read_string(self, offset: int, size: int, count: int) -> bytes:
        """A `rep ins` handed over in bulk: the reads of consecutive instructions."""
        position = self.engine.icount
        data = b""
        for k in range(count):
            value = self.read(offset, size)
            self.accesses[-1] = ("in", position + k, offset, size)
            data += value.to_bytes(size, "little")
        return data

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("out", self.engine.icount, offset, size, value))
        super().write(offset, size, value)

    def string_budget(self, offset: int, size: int, write: bool) -> int:
        return 5 if offset == 4 else 0        # port 0x84 takes `rep outs`/`rep ins` 5 at a time

    def write_string(self, offset: int, size: int, data: bytes) -> None:
        """A `rep outs` handed over in bulk: the accesses of consecutive instructions."""
        for k in range(len(data) // size):
            self.accesses.append(("out", self.engine.icount + k, offset, size,
                                  int.from_bytes(data[k * size:(k + 1) * size], "little")))


# PAE tables at 0x5000 (PDPT) and 0x6000 (page directory), 0-2 MiB as one 2 MiB page, and the
# switch to them (CR4.PAE, CR3, CR0.PG), ending with a jump to the label `1:` that follows.
PAE_FIRST_2MIB = """
    movl $0x6001, 0x5000      # PDPT[0] -> the page directory at 0x6000
    movl $0, 0x5004
    movl $0x87, 0x6000        # 0-2 MiB: a 2 MiB page
    movl $0, 0x6004"""
PAE_ON = """
    mov $0x20, %eax           # CR4.PAE
    mov %eax, %cr4
    mov $0x5000, %eax
    mov %eax, %cr3
    mov %cr0, %eax
    or $0x80000000, %eax
    mov %eax, %cr0
    jmp 1f"""

PROGRAMS = {
    "port I/O inside a block": ("""
    mov $3, %ecx
1:  inc %eax
    inc %ebx
    in $0x81, %al
    add %eax, %edx
    out %al, $0x80
    inc %esi
    rdtsc
    out %eax, $0x84
    dec %ecx
    jnz 1b
    hlt
""", {}, False),
    "INT n and IRET inside blocks": ("""
    SETGATE 0x40, syscall, 3
    SETGATE 0x41, done, 3
    TO_USER user
user:
    mov $7, %ebx
    inc %ecx
    int $0x40
    inc %ecx
    int $0x40
    inc %ecx
    int $0x41
""", {0x40: "syscall:\n inc %edx\n mov %ebx, %eax\n out %al, $0x80\n iret",
      0x41: "done:\n out %eax, $0x84\n hlt"}, False),
    "page faults, one in the middle of rep stos": ("""
    SETGATE 14, pf, 0
    mov $0x3FFFF0, %edi
    mov $8, %ecx
    mov $0x11223344, %eax
    inc %ebx
    rep stosl
    inc %ebx
    movl $2, 0x800000
    movl 0xC00000, %edx
    out %eax, $0x84
    hlt
""", {14: PAGE_FAULT_HANDLER}, True),
    "self-modifying code inside its own block": ("""
    xor %eax, %eax
    movb $0x40, target        # the NOP below becomes INC %EAX before it runs
    nop
target:
    nop
    inc %eax
    out %eax, $0x84
    movb $0x43, target2       # and again, further on in a longer block
    inc %edx
    inc %edx
target2:
    nop
    out %eax, $0x84
    hlt
""", {}, False),
    "PAE paging switched on: QEMU's page walk takes over": (PAE_FIRST_2MIB + """
    movl $0x200087, 0x6008    # and 2-4 MiB
    movl $0, 0x600c
""" + PAE_ON + """
1:  inc %ebx
    movl $5, 0x300000         # a store through the PAE tables
    inc %ebx
    mov 0x300000, %eax
    out %eax, $0x84
    hlt
""", {}, False),
    "PAE paging with page faults delivered through it": ("""
    SETGATE 14, pf_pae, 0""" + PAE_FIRST_2MIB + PAE_ON + """
1:  inc %ebx                  # 2-6 MiB not present yet
    movl $5, 0x300000         # #PF (write, not present), mapped by the handler, done again
    inc %ebx
    mov 0x500010, %eax        # #PF (read)
    out %eax, $0x84
    hlt
""", {14: """pf_pae:
    pop %eax
    out %eax, $0x84           # error code
    mov %cr2, %eax
    out %eax, $0x88
    shr $21, %eax             # map the 2 MiB page: PD entry (8 bytes) = its address | P|RW|U|PS
    mov %eax, %ecx
    shl $21, %eax
    or $0x87, %eax
    mov %eax, 0x6000(,%ecx,8)
    movl $0, 0x6004(,%ecx,8)
    mov %cr3, %eax
    mov %eax, %cr3
    iret
"""}, False),
    "rep outs in bulk, across a page and a short budget": ("""
    mov $0x20FE0, %edi
    mov $24, %ecx
1:  mov %ecx, (%edi)          # 24 dwords, the last 8 past the page boundary at 0x21000
    add $4, %edi
    dec %ecx
    jnz 1b
    mov $0x84, %dx
    mov $0x20FE0, %esi
    mov $24, %ecx
    cld
    rep outsl                 # 5 at a time (the device's budget), then the page's end
    mov $0x20FE0, %esi
    mov $3, %ecx
    rep outsb
    mov %esi, %eax
    out %eax, $0x88
    hlt
""", {}, False),
    "rep stos in bulk, through 4 KiB pages not yet dirty": ("""
    mov $0x7000, %edi         # a page table for 0-4 MiB: present, writable, not accessed or dirty
    mov $0x3, %eax
    mov $1024, %ecx
1:  mov %eax, (%edi)
    add $0x1000, %eax
    add $4, %edi
    loop 1b
    movl $0x7003, 0x4000
    mov $0x4000, %eax
    mov %eax, %cr3
    mov %cr0, %eax
    or $0x80000000, %eax
    mov %eax, %cr0
    jmp 2f
2:  cld
    mov $0x30010, %edi
    mov $0x11223344, %eax
    mov $3000, %ecx           # 12000 bytes over three pages, each made dirty by its first store
    rep stosl
    mov $0x33ffd, %edi
    mov $0x5a, %al
    mov $7, %ecx              # bytes across a page boundary
    rep stosb
    mov $0, %ecx
    rep stosl                 # nothing to do
    mov 0x30010, %eax
    out %eax, $0x84
    mov 0x32eec, %eax         # the last dword stored
    out %eax, $0x84
    mov 0x34003, %eax
    out %eax, $0x84
    mov 0x7000 + 4 * 0x31, %eax   # the page table entry of 0x31000: accessed and dirty now
    out %eax, $0x84
    hlt
""", {}, False),
    "rep ins in bulk, across a page and a short budget": ("""
    mov $0x84, %dx
    mov $0x20FE0, %edi
    mov $24, %ecx
    cld
    rep insl                  # 5 at a time, then the page's end at 0x21000
    mov $0x22FFE, %edi
    mov $5, %ecx
    rep insb
    mov 0x20FE0, %eax
    out %eax, $0x88
    mov 0x20FFC, %eax
    out %eax, $0x88
    mov 0x21000, %eax
    out %eax, $0x88
    mov 0x2103C, %eax
    out %eax, $0x88
    mov 0x22FFE, %eax
    out %eax, $0x88
    mov %edi, %eax
    out %eax, $0x88
    hlt
""", {}, False),
    "undefined opcode inside a block": ("""
    SETGATE 6, ud, 0
    inc %eax
    inc %eax
    ud2
""", {6: "ud:\n out %eax, $0x84\n hlt"}, False),
}


def run_program(monkeypatch, name: str, reference: bool, step: bool = False):
    if reference:
        monkeypatch.setenv(REFERENCE, "1")
    else:
        monkeypatch.delenv(REFERENCE, raising=False)
    code, handlers, paging = PROGRAMS[name]
    monkeypatch.setattr(test_emu_engine, "PortLog", PositionLog)     # TinyMachine's port device
    m, engine = protected_machine(code, handlers, paging=paging)
    log = m.port
    log.engine = engine
    trail = []
    while True:
        reason = engine.run(max_instructions=1 if step else 100_000)
        if step:
            trail.append((engine.icount, engine.reg("eip")))
        if reason is not StopReason.BUDGET or engine.icount > 100_000:
            break
    assert reason is StopReason.HALT, engine.last_error
    registers = {r: engine.reg(r) for r in ("eax", "ebx", "ecx", "edx", "esi", "edi", "esp", "eip", "eflags")}
    return engine, log.accesses, engine.icount, registers, trail


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_fast_blocks_count_what_the_per_instruction_hook_counts(monkeypatch, name):
    fast_engine, *fast = run_program(monkeypatch, name, reference=False)
    ref_engine, *ref = run_program(monkeypatch, name, reference=True)
    assert ref_engine.counting == "instructions"
    assert fast_engine.counting == ("instructions" if "PAE" in name else "blocks")
    assert fast_engine.counting_statistics()["fast_blocks"] > 0
    accesses, icount, registers, _ = fast
    assert accesses, "the program reaches its port writes"
    assert fast == ref


# Single-stepping a store into its own block never completes, in either mode: QEMU restarts the
# store alone in a block of its own, whose first instruction is a step's end again.
STEPPABLE = sorted(name for name in PROGRAMS if "self-modifying" not in name)


@pytest.mark.parametrize("name", STEPPABLE)
def test_single_steps_land_where_the_free_run_counts(monkeypatch, name):
    _, accesses, icount, registers, _ = run_program(monkeypatch, name, reference=False)
    _, step_accesses, step_icount, step_registers, trail = run_program(monkeypatch, name, reference=False, step=True)
    _, _, _, _, ref_trail = run_program(monkeypatch, name, reference=True, step=True)
    assert (step_accesses, step_icount, step_registers) == (accesses, icount, registers)
    assert trail == ref_trail
    assert [position for position, _ in trail[:-1]] == list(range(1, len(trail)))


def test_rep_outs_goes_to_the_device_in_bulk(monkeypatch):
    engine, accesses, icount, registers, _ = run_program(monkeypatch, "rep outs in bulk, across a page and a short budget",
                                                         reference=False)
    statistics = engine.counting_statistics()
    assert statistics["bulk_runs"] >= 4 and statistics["bulk_elements"] >= 16
    data = [a[4] for a in accesses if a[0] == "out" and a[2] == 4 and a[3] == 4]
    assert data == list(range(24, 0, -1))                 # every element once, in order
    positions = [a[1] for a in accesses if a[0] == "out" and a[2] == 4 and a[3] == 4]
    assert positions == list(range(positions[0], positions[0] + 24))   # one instruction each


def test_rep_stos_runs_in_bulk(monkeypatch):
    engine, accesses, *_ = run_program(monkeypatch, "rep stos in bulk, through 4 KiB pages not yet dirty",
                                       reference=False)
    statistics = engine.counting_statistics()
    assert statistics["stos_runs"] >= 3 and statistics["stos_elements"] >= 2990
    assert [a[4] for a in accesses] == [0x11223344, 0x11223344, 0x5a, 0x31063]


def test_rep_ins_comes_from_the_device_in_bulk(monkeypatch):
    engine, accesses, *_ = run_program(monkeypatch, "rep ins in bulk, across a page and a short budget",
                                       reference=False)
    assert engine.counting_statistics()["bulk_elements"] >= 16
    reads = [a for a in accesses if a[0] == "in"]
    assert [a[1] for a in reads[:24]] == list(range(reads[0][1], reads[0][1] + 24))
    shown = [a[4] for a in accesses if a[0] == "out"]
    assert shown == [0x1001, 0x1008, 0x1009, 0x1018, 0x1C1B1A19, 0x23003]   # in RAM where each belongs


def test_pae_makes_the_engine_count_every_instruction(monkeypatch):
    engine, accesses, *_ = run_program(monkeypatch, "PAE paging switched on: QEMU's page walk takes over",
                                       reference=False)
    assert engine.page_walk == "qemu" and engine.counting == "instructions"
    assert [a[2:] for a in accesses] == [(4, 4, 5)]


def test_fast_blocks_are_the_engines_default(monkeypatch):
    monkeypatch.delenv(REFERENCE, raising=False)
    m, engine = protected_machine("1: inc %eax\n jmp 1b")
    assert engine.counting == "blocks"
    engine.run(max_instructions=100_001)
    assert engine.icount == 100_001 and engine.reg("eax") == 50_001
    assert engine.counting_statistics()["fast_blocks"] > 10_000           # the loop ran mostly in fast blocks


def test_pae_guests_take_page_faults(monkeypatch):
    """Delivery walks PAE tables (the frame goes on the stack through them): a write and a read
    page fault with their error codes and CR2, each handled and the access done again."""
    engine, accesses, *_ = run_program(monkeypatch, "PAE paging with page faults delivered through it",
                                       reference=False)
    assert engine.exceptions_delivered == 2
    assert [a[2:] for a in accesses] == [(4, 4, 2), (8, 4, 0x300000), (4, 4, 0), (8, 4, 0x500010), (4, 4, 0)]
