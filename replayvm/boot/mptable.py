"""Intel MultiProcessor Specification 1.4 tables: how xv6 (mp.c) finds its CPUs and IOAPIC.

A floating pointer structure ("_MP_") in the first KiB of the EBDA points at a configuration table
("PCMP") listing one processor (the BSP), an ISA bus, the IOAPIC (whose id must equal the IOAPIC's
ID register, xv6 checks), the ISA interrupt assignments and the LAPIC's local interrupts.
Both structures carry a checksum: all their bytes sum to zero modulo 256.
"""

from __future__ import annotations

import struct

from replayvm import hw

ENTRY_PROCESSOR = 0
ENTRY_BUS = 1
ENTRY_IOAPIC = 2
ENTRY_IO_INTERRUPT = 3
ENTRY_LOCAL_INTERRUPT = 4

INT_TYPE_INT = 0
INT_TYPE_NMI = 1
INT_TYPE_EXTINT = 3

CPU_ENABLED = 1
CPU_BOOTSTRAP = 2
SPEC_REVISION = 4
FLOATING_POINTER_SIZE = 16
CONFIG_HEADER_SIZE = 44


def checksum_byte(data: bytes) -> int:
    """The byte that makes `data` (with this byte added) sum to zero modulo 256."""
    return (-sum(data)) & 0xFF


def _with_checksum(data: bytearray, offset: int) -> bytes:
    data[offset] = 0
    data[offset] = checksum_byte(bytes(data))
    return bytes(data)


def config_table(cpu_count: int = 1) -> bytes:
    """The PCMP configuration table (header + entries), checksummed."""
    entries = []
    for apic_id in range(cpu_count):
        flags = CPU_ENABLED | (CPU_BOOTSTRAP if apic_id == hw.BSP_APIC_ID else 0)
        entries.append(struct.pack("<BBBBIIQ", ENTRY_PROCESSOR, apic_id, hw.LAPIC_VERSION, flags,
                                   0x0633, 0x0781ABFD, 0))
    entries.append(struct.pack("<BB6s", ENTRY_BUS, 0, b"ISA   "))
    entries.append(struct.pack("<BBBBI", ENTRY_IOAPIC, hw.IOAPIC_ID, hw.IOAPIC_VERSION, 1, hw.IOAPIC_ADDR))
    for irq in range(16):
        if irq == 2:                                   # the cascade line is not an interrupt source
            continue
        entries.append(struct.pack("<BBHBBBB", ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, irq,
                                   hw.IOAPIC_ID, irq))
    entries.append(struct.pack("<BBHBBBB", ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0xFF, 0))
    entries.append(struct.pack("<BBHBBBB", ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0xFF, 1))
    body = b"".join(entries)
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", CONFIG_HEADER_SIZE + len(body),
                                   SPEC_REVISION, 0, b"REPLAYVM", b"PC          ", 0, 0,
                                   len(entries), hw.LAPIC_ADDR, 0, 0, 0))
    return _with_checksum(header + body, 7)


def floating_pointer(config_addr: int) -> bytes:
    """The 16-byte "_MP_" structure pointing at the configuration table."""
    data = bytearray(struct.pack("<4sIBBBB4s", b"_MP_", config_addr, 1, SPEC_REVISION, 0, 0, b"\0" * 4))
    return _with_checksum(data, 10)


def write_mp_tables(ram: memoryview, addr: int = hw.MPTABLE_ADDR, cpu_count: int = 1) -> int:
    """Place the floating pointer at `addr` and the table right after it; return bytes used."""
    table = config_table(cpu_count)
    config_addr = addr + FLOATING_POINTER_SIZE
    pointer = floating_pointer(config_addr)
    ram[addr:addr + len(pointer)] = pointer
    ram[config_addr:config_addr + len(table)] = table
    return len(pointer) + len(table)
