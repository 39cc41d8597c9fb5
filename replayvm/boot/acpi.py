"""ACPI tables for the MP-spec machine: the few that tell a kernel its CPUs and its IOAPIC.

Kernels newer than xv6-public look for ACPI before (or instead of) the MP tables: the 64-bit xv6
port reads the MADT and dereferences the RSDP it expects to find, Linux and most hobby kernels
prefer the MADT too. So the `mp` machine carries both descriptions of the same hardware:
- the RSDP ("RSD PTR ", ACPI 1.0, revision 0) on a 16-byte boundary in the BIOS area at
  `hw.ACPI_TABLES_ADDR`, where the search from 0xE0000 to 0xFFFFF finds it;
- an RSDT listing one table,
- the MADT ("APIC"): the LAPIC address, one enabled processor-local APIC per CPU (APIC IDs 0..N-1,
  the BSP first, as in the MP table), the IOAPIC with global system interrupt base 0. ISA IRQs go
  to the IOAPIC pin of the same number (the MP table's assignments), so there are no interrupt
  source overrides; the PCAT_COMPAT flag says 8259s are present.
Each table's bytes sum to zero modulo 256 (the RSDP's first 20 bytes).
"""

from __future__ import annotations

import struct

from replayvm import hw
from replayvm.boot.mptable import checksum_byte

RSDP_SIGNATURE = b"RSD PTR "
RSDP_SIZE = 20                           # ACPI 1.0: no length, no XSDT
HEADER = struct.Struct("<4sIBB6s8sI4sI")  # the system description header every table starts with
HEADER_CHECKSUM_OFFSET = 9
OEM_ID = b"RPLYVM"
OEM_TABLE_ID = b"REPLAYVM"
CREATOR_ID = b"RPVM"
MADT_PCAT_COMPAT = 1
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
LOCAL_APIC_ENABLED = 1
RSDT_OFFSET = 0x20                        # from the RSDP: the RSDT, then the MADT
MADT_OFFSET = 0x60


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    header = HEADER.pack(signature, HEADER.size + len(body), revision, 0, OEM_ID, OEM_TABLE_ID, 1,
                         CREATOR_ID, 1)
    data = bytearray(header + body)
    data[HEADER_CHECKSUM_OFFSET] = checksum_byte(bytes(data))
    return bytes(data)


def madt(cpu_count: int) -> bytes:
    entries = [struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, apic_id, apic_id, LOCAL_APIC_ENABLED)
               for apic_id in range(cpu_count)]
    entries.append(struct.pack("<BBBBII", MADT_IO_APIC, 12, hw.IOAPIC_ID, 0, hw.IOAPIC_ADDR, 0))
    return _table(b"APIC", 1, struct.pack("<II", hw.LAPIC_ADDR, MADT_PCAT_COMPAT) + b"".join(entries))


def rsdt(table_addresses: list[int]) -> bytes:
    return _table(b"RSDT", 1, b"".join(struct.pack("<I", addr) for addr in table_addresses))


def rsdp(rsdt_addr: int) -> bytes:
    data = bytearray(struct.pack("<8sB6sBI", RSDP_SIGNATURE, 0, OEM_ID, 0, rsdt_addr))
    data[8] = checksum_byte(bytes(data))
    return bytes(data)


def write_acpi_tables(ram: memoryview, addr: int = hw.ACPI_TABLES_ADDR, cpu_count: int = 1) -> int:
    """The RSDP at `addr`, the RSDT and the MADT after it; returns the bytes the three span."""
    madt_bytes = madt(cpu_count)
    placed = {addr: rsdp(addr + RSDT_OFFSET), addr + RSDT_OFFSET: rsdt([addr + MADT_OFFSET]),
              addr + MADT_OFFSET: madt_bytes}
    for at, data in placed.items():
        ram[at:at + len(data)] = data
    return MADT_OFFSET + len(madt_bytes)
