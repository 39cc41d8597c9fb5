"""Interrupt and exception delivery through the IVT/IDT, done by the VMM as the CPU would do it.

Unicorn runs QEMU's translator but never QEMU's interrupt delivery: an `int n`, an exception or an
external interrupt reaches us as a vector number, and the emulating engine must do what the
processor does (Intel SDM vol. 3, 6.12 "Exception and interrupt handling"): look up the gate, switch
to the inner stack from the TSS when privilege changes, push the return frame (and error code),
and load CS:EIP with IF cleared for interrupt gates. Real mode uses the IVT.

Supported: real mode; 32-bit protected mode with 32-bit interrupt/trap gates, rings 0 and 3, flat
or based segments, paging; long mode (EFER.LMA) with 64-bit interrupt/trap gates (16 bytes), the
stack switch through the 64-bit TSS (RSP0, or an IST entry whenever the gate names one), the
16-byte aligned SS:RSP/RFLAGS/CS:RIP frame, rings 0 and 3. Not supported (reported as a shutdown
with the reason): task gates, 16-bit gates, virtual-8086 mode, 32-bit compatibility-mode code
segments as handlers (a 64-bit gate must lead to 64-bit code).
"""

from __future__ import annotations

from typing import Protocol

EFLAGS_TF = 1 << 8
EFLAGS_IF = 1 << 9
EFLAGS_NT = 1 << 14
EFLAGS_RF = 1 << 16
EFLAGS_VM = 1 << 17
EFLAGS_AC = 1 << 18

VECTOR_DOUBLE_FAULT = 8
VECTOR_INVALID_TSS = 10
VECTOR_SEGMENT_NOT_PRESENT = 11
VECTOR_GENERAL_PROTECTION = 13
VECTOR_PAGE_FAULT = 14
VECTORS_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21})

GATE_INTERRUPT_32 = 0xE
GATE_TRAP_32 = 0xF
GATE_INTERRUPT_64 = GATE_INTERRUPT_32    # the same type numbers name the 64-bit gates
EFER_LMA = 1 << 10
TSS64_RSP0 = 4                   # 64-bit TSS: RSP0..RSP2 at 4, 12, 20; IST1..IST7 at 0x24, 0x2C, ...
TSS64_IST1 = 0x24
DESCRIPTOR_L = 1 << 21           # the high dword's 64-bit code bit


class CpuAccess(Protocol):
    """What delivery needs from an engine: registers by name and linear-address memory."""

    def reg(self, name: str) -> int:
        """By name: 32-bit ones ("eip", "esp", "eflags", "cs", "cr0", ...), and in long mode the
        64-bit "rip", "rsp", "rflags" and "efer"."""
        ...

    def set_reg(self, name: str, value: int) -> None: ...

    def table_register(self, name: str) -> tuple[int, int]:
        """(base, limit) of 'gdtr' or 'idtr', or the base/limit of 'tr'."""
        ...

    def read_linear(self, addr: int, size: int) -> bytes: ...

    def write_linear(self, addr: int, data: bytes) -> None: ...

    def load_segments_from_user_mode(self, cs: int, ss: int) -> None:
        """Load a more privileged CS and SS (the engine knows how to get past its own checks)."""
        ...


class DeliveryFault(Exception):
    """Delivering a vector raised another exception (vector, error code; for a page fault, the
    linear address, which goes to CR2 only when the fault is raised in the guest)."""

    def __init__(self, vector: int, error_code: int, why: str, address: int | None = None) -> None:
        super().__init__(why)
        self.vector = vector
        self.error_code = error_code
        self.address = address


def _raised(cpu: CpuAccess, fault: DeliveryFault) -> DeliveryFault:
    """A fault met while delivering is raised in the guest: a page fault loads CR2."""
    if fault.vector == VECTOR_PAGE_FAULT and fault.address is not None:
        cpu.set_reg("cr2", fault.address)
    return fault


class TripleFault(Exception):
    """Delivery failed while delivering a double fault: the CPU shuts down."""


def _u32(data: bytes, offset: int = 0) -> int:
    return int.from_bytes(data[offset:offset + 4], "little")


def _u64(data: bytes, offset: int = 0) -> int:
    return int.from_bytes(data[offset:offset + 8], "little")


def in_long_mode(cpu: CpuAccess) -> bool:
    """EFER.LMA: the CPU runs with 4-level paging and 64-bit IDT gates."""
    return bool(cpu.reg("efer") & EFER_LMA)


def _descriptor(cpu: CpuAccess, selector: int) -> tuple[int, int, int]:
    """(base, limit, access-high-dword) of a GDT code/data descriptor."""
    gdt_base, gdt_limit = cpu.table_register("gdtr")
    index = selector & ~7
    if selector & 4 or index + 7 > gdt_limit or index == 0:
        raise DeliveryFault(VECTOR_GENERAL_PROTECTION, selector & ~3, f"bad selector {selector:#x}")
    raw = cpu.read_linear(gdt_base + index, 8)
    lo, hi = _u32(raw, 0), _u32(raw, 4)
    base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000)
    limit = (lo & 0xFFFF) | (hi & 0xF0000)
    if hi & (1 << 23):
        limit = (limit << 12) | 0xFFF
    if not hi & (1 << 15):
        raise DeliveryFault(VECTOR_SEGMENT_NOT_PRESENT, selector & ~3, f"segment {selector:#x} not present")
    return base, limit, hi


def deliver(cpu: CpuAccess, vector: int, *, software: bool, error_code: int | None,
            return_eip: int) -> None:
    """Deliver one vector; raises DeliveryFault when the delivery itself faults."""
    if not cpu.reg("cr0") & 1:
        _deliver_real_mode(cpu, vector, return_eip)
    elif in_long_mode(cpu):
        _deliver_long_mode(cpu, vector, software, error_code, return_eip)
    else:
        _deliver_protected_mode(cpu, vector, software, error_code, return_eip)


def deliver_with_escalation(cpu: CpuAccess, vector: int, *, software: bool,
                            error_code: int | None, return_eip: int) -> None:
    """Deliver; a fault while delivering is delivered instead, a fault delivering that becomes a
    double fault, and a fault delivering the double fault is a triple fault (shutdown)."""
    try:
        deliver(cpu, vector, software=software, error_code=error_code, return_eip=return_eip)
        return
    except DeliveryFault as first:
        nested = _raised(cpu, first)
    if vector != VECTOR_DOUBLE_FAULT:
        try:
            deliver(cpu, nested.vector, software=False, error_code=nested.error_code,
                    return_eip=return_eip)
            return
        except DeliveryFault as second:
            nested = _raised(cpu, second)
        try:
            deliver(cpu, VECTOR_DOUBLE_FAULT, software=False, error_code=0, return_eip=return_eip)
            return
        except DeliveryFault as third:
            nested = _raised(cpu, third)
    raise TripleFault(f"triple fault delivering vector {vector}: {nested}")


def _deliver_real_mode(cpu: CpuAccess, vector: int, return_ip: int) -> None:
    ivt_base, ivt_limit = cpu.table_register("idtr")
    if vector * 4 + 3 > ivt_limit:
        raise DeliveryFault(VECTOR_GENERAL_PROTECTION, 0, f"vector {vector} beyond the IVT limit")
    entry = _u32(cpu.read_linear(ivt_base + vector * 4, 4))
    ss = cpu.reg("ss")
    sp = cpu.reg("esp") & 0xFFFF
    flags = cpu.reg("eflags")
    frame = b"".join(v.to_bytes(2, "little") for v in (return_ip & 0xFFFF, cpu.reg("cs"), flags & 0xFFFF))
    sp = (sp - 6) & 0xFFFF
    cpu.write_linear((ss << 4) + sp, frame)
    cpu.set_reg("esp", (cpu.reg("esp") & 0xFFFF0000) | sp)
    cpu.set_reg("eflags", flags & ~(EFLAGS_IF | EFLAGS_TF | EFLAGS_AC))
    cpu.set_reg("cs", entry >> 16)
    cpu.set_reg("eip", entry & 0xFFFF)


def _checked_gate(cpu: CpuAccess, vector: int, software: bool, hi: int, gate_error: int) -> tuple[int, int]:
    """(gate type, CPL) for a gate the vector may go through: an interrupt or trap gate (the
    same type numbers in 32-bit and 64-bit IDTs), present, and for INT n of DPL >= CPL."""
    gate_type = (hi >> 8) & 0x1F
    gate_dpl = (hi >> 13) & 3
    cpl = cpu.reg("cs") & 3
    if software and gate_dpl < cpl:
        raise DeliveryFault(VECTOR_GENERAL_PROTECTION, vector * 8 + 2,
                            f"int {vector:#x} from ring {cpl} through a DPL {gate_dpl} gate")
    if gate_type not in (GATE_INTERRUPT_32, GATE_TRAP_32):
        raise DeliveryFault(VECTOR_GENERAL_PROTECTION, gate_error,
                            f"vector {vector}: unsupported gate type {gate_type:#x}")
    if not hi & (1 << 15):
        raise DeliveryFault(VECTOR_SEGMENT_NOT_PRESENT, gate_error, f"vector {vector}: gate not present")
    return gate_type, cpl


def _deliver_protected_mode(cpu: CpuAccess, vector: int, software: bool,
                            error_code: int | None, return_eip: int) -> None:
    gate_error = vector * 8 + 2 + (0 if software else 1)
    idt_base, idt_limit = cpu.table_register("idtr")
    if vector * 8 + 7 > idt_limit:
        raise DeliveryFault(VECTOR_GENERAL_PROTECTION, gate_error, f"vector {vector} beyond the IDT limit")
    raw = cpu.read_linear(idt_base + vector * 8, 8)
    lo, hi = _u32(raw, 0), _u32(raw, 4)
    eflags = cpu.reg("eflags")
    if eflags & EFLAGS_VM:
        raise DeliveryFault(VECTOR_GENERAL_PROTECTION, 0, "virtual-8086 mode is not supported")
    old_cs = cpu.reg("cs")
    gate_type, cpl = _checked_gate(cpu, vector, software, hi, gate_error)
    target_cs = lo >> 16
    target_eip = (lo & 0xFFFF) | (hi & 0xFFFF0000)
    _, _, cs_access = _descriptor(cpu, target_cs)
    target_dpl = (cs_access >> 13) & 3
    conforming = bool(cs_access & (1 << 10))

    if target_dpl < cpl and not conforming:
        # Inner-privilege stack from the TSS: esp0 at +4, ss0 at +8 (for ring n: +4+8n, +8+8n).
        tss_base, tss_limit = cpu.table_register("tr")
        if tss_limit < 8 * target_dpl + 9:
            raise DeliveryFault(VECTOR_INVALID_TSS, cpu.reg("tr") & ~3, "TSS too small for the stack switch")
        tss = cpu.read_linear(tss_base + 4 + 8 * target_dpl, 8)
        new_esp, new_ss = _u32(tss, 0), _u32(tss, 4) & 0xFFFF
        ss_base, _, _ = _descriptor(cpu, new_ss)
        old_ss, old_esp = cpu.reg("ss"), cpu.reg("esp")
        frame = [old_ss, old_esp, eflags, old_cs, return_eip]
        new_cpl = target_dpl
    else:
        new_ss = None
        ss_base, _, _ = _descriptor(cpu, cpu.reg("ss"))
        new_esp = cpu.reg("esp")
        frame = [eflags, old_cs, return_eip]
        new_cpl = cpl
    if error_code is not None:
        frame.append(error_code)
    data = b"".join((v & 0xFFFFFFFF).to_bytes(4, "little") for v in reversed(frame))
    new_esp = (new_esp - len(data)) & 0xFFFFFFFF
    cpu.write_linear(ss_base + new_esp, data)       # may raise DeliveryFault (#PF on the stack)

    # The frame is written: now commit the register changes.
    if new_ss is not None:
        cpu.load_segments_from_user_mode((target_cs & ~3) | new_cpl, new_ss)
    elif target_cs != old_cs:
        cpu.set_reg("cs", (target_cs & ~3) | new_cpl)
    new_flags = eflags & ~(EFLAGS_TF | EFLAGS_NT | EFLAGS_RF | EFLAGS_VM)
    if gate_type == GATE_INTERRUPT_32:
        new_flags &= ~EFLAGS_IF
    cpu.set_reg("eflags", new_flags)
    cpu.set_reg("esp", new_esp)
    cpu.set_reg("eip", target_eip)


def _deliver_long_mode(cpu: CpuAccess, vector: int, software: bool,
                       error_code: int | None, return_eip: int) -> None:
    """Intel SDM vol. 3, 6.14 "Exception and interrupt handling in 64-bit mode": 16-byte gates;
    the new RSP comes from the TSS when the privilege changes (RSP0..2) or the gate names an IST
    entry (always then); the stack is aligned to 16 bytes; SS:RSP is always pushed; a privilege
    change loads SS with the null selector of the new ring."""
    gate_error = vector * 8 + 2 + (0 if software else 1)
    idt_base, idt_limit = cpu.table_register("idtr")
    if vector * 16 + 15 > idt_limit:
        raise DeliveryFault(VECTOR_GENERAL_PROTECTION, gate_error, f"vector {vector} beyond the IDT limit")
    raw = cpu.read_linear(idt_base + vector * 16, 16)
    lo, hi, upper = _u32(raw, 0), _u32(raw, 4), _u32(raw, 8)
    ist = hi & 7
    old_cs = cpu.reg("cs")
    gate_type, cpl = _checked_gate(cpu, vector, software, hi, gate_error)
    target_cs = lo >> 16
    target_rip = (lo & 0xFFFF) | (hi & 0xFFFF0000) | (upper << 32)
    _, _, cs_access = _descriptor(cpu, target_cs)
    if not cs_access & DESCRIPTOR_L or not cs_access & (1 << 11):
        raise DeliveryFault(VECTOR_GENERAL_PROTECTION, target_cs & ~3,
                            f"vector {vector}: the gate's CS {target_cs:#x} is not 64-bit code")
    target_dpl = (cs_access >> 13) & 3
    conforming = bool(cs_access & (1 << 10))
    new_cpl = cpl if conforming or target_dpl >= cpl else target_dpl
    rflags = cpu.reg("rflags")
    old_rsp = cpu.reg("rsp")
    if new_cpl != cpl or ist:
        tss_base, tss_limit = cpu.table_register("tr")
        offset = TSS64_IST1 + 8 * (ist - 1) if ist else TSS64_RSP0 + 8 * new_cpl
        if tss_limit < offset + 7:
            raise DeliveryFault(VECTOR_INVALID_TSS, cpu.reg("tr") & ~3, "TSS too small for the stack switch")
        new_rsp = _u64(cpu.read_linear(tss_base + offset, 8))
    else:
        new_rsp = old_rsp
    new_rsp &= ~0xF
    frame = [cpu.reg("ss"), old_rsp, rflags, old_cs, return_eip]
    if error_code is not None:
        frame.append(error_code)
    data = b"".join((v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") for v in reversed(frame))
    new_rsp = (new_rsp - len(data)) & 0xFFFFFFFFFFFFFFFF
    cpu.write_linear(new_rsp, data)                 # may raise DeliveryFault (#PF on the stack)

    # The frame is written: now commit the register changes (SS: the new ring's null selector).
    if new_cpl != cpl:
        cpu.load_segments_from_user_mode((target_cs & ~3) | new_cpl, new_cpl)
    elif target_cs != old_cs:
        cpu.set_reg("cs", (target_cs & ~3) | new_cpl)
    new_flags = rflags & ~(EFLAGS_TF | EFLAGS_NT | EFLAGS_RF | EFLAGS_VM)
    if gate_type == GATE_INTERRUPT_64:
        new_flags &= ~EFLAGS_IF
    cpu.set_reg("rflags", new_flags)
    cpu.set_reg("rsp", new_rsp)
    cpu.set_reg("rip", target_rip)
