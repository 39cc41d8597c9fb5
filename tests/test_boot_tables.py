"""Firmware tables as xv6's mp.c reads them: found where it searches, checksums right, entries valid."""

from __future__ import annotations

import mmap
import struct

from replayvm import hw
from replayvm.boot import firmware, mptable


def fresh_ram(mib: int = 16) -> memoryview:
    return memoryview(mmap.mmap(-1, mib << 20))


def find_floating_pointer(ram: memoryview) -> int:
    """xv6's mpsearch: the EBDA's first KiB, then the last KiB of base memory, then the BIOS ROM."""
    ebda = struct.unpack_from("<H", ram, 0x40E)[0] << 4
    candidates = [(ebda, 1024)] if ebda else []
    base_kb = struct.unpack_from("<H", ram, 0x413)[0]
    candidates.append((base_kb * 1024 - 1024, 1024))
    candidates.append((0xF0000, 0x10000))
    for start, length in candidates:
        for addr in range(start, start + length, 16):
            if bytes(ram[addr:addr + 4]) == b"_MP_" and sum(ram[addr:addr + 16]) % 256 == 0:
                return addr
    raise AssertionError("no MP floating pointer where xv6 looks")


def test_mp_tables_are_where_xv6_looks_with_valid_checksums():
    ram = fresh_ram()
    firmware.fill_bios_data_area(ram)
    pointer = find_floating_pointer(ram)
    config_addr = struct.unpack_from("<I", ram, pointer + 4)[0]
    assert ram[pointer + 9] == 4                       # spec revision 1.4
    header = bytes(ram[config_addr:config_addr + 44])
    assert header[:4] == b"PCMP"
    length, version = struct.unpack_from("<HB", header, 4)
    assert version in (1, 4)
    assert sum(ram[config_addr:config_addr + length]) % 256 == 0
    count, lapic = struct.unpack_from("<HI", header, 34)
    assert lapic == hw.LAPIC_ADDR
    entries, offset = [], config_addr + 44
    sizes = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}
    for _ in range(count):
        kind = ram[offset]
        assert kind in sizes, f"entry type {kind} makes xv6 panic"
        entries.append(bytes(ram[offset:offset + sizes[kind]]))
        offset += sizes[kind]
    assert offset == config_addr + length
    processors = [e for e in entries if e[0] == 0]
    assert len(processors) == 1 and processors[0][3] & 2      # one CPU, the bootstrap processor
    ioapics = [e for e in entries if e[0] == 2]
    assert len(ioapics) == 1 and ioapics[0][1] == hw.IOAPIC_ID
    assert struct.unpack_from("<I", ioapics[0], 4)[0] == hw.IOAPIC_ADDR


def test_checksum_byte_makes_the_sum_zero():
    data = bytes(range(37))
    assert (sum(data) + mptable.checksum_byte(data)) % 256 == 0


def test_boot_sector_state_is_what_a_bios_leaves():
    ram = fresh_ram()
    sector = bytes(510) + b"\x55\xAA"
    state = firmware.boot_from_disk(ram, sector)
    assert state.cs.selector == 0 and state.regs["rip"] == 0x7C00
    assert state.regs["rdx"] & 0xFF == 0x80
    assert bytes(ram[0x7C00 + 510:0x7C00 + 512]) == b"\x55\xAA"
    assert struct.unpack_from("<H", ram, 0x413)[0] == hw.BASE_MEM_KB


def test_multiboot_header_is_found_and_validated():
    image = bytearray(8192)
    struct.pack_into("<III", image, 0x1000, 0x1BADB002, 0, (-0x1BADB002) & 0xFFFFFFFF)
    assert firmware.find_multiboot_header(bytes(image)) == 0x1000
    struct.pack_into("<I", image, 0x1008, 0)
    assert firmware.find_multiboot_header(bytes(image)) is None


def test_mp_tables_list_every_cpu_bsp_first_with_checksums_right():
    for cpus in (2, 4, hw.MAX_CPUS):
        ram = fresh_ram()
        firmware.fill_bios_data_area(ram, cpus)
        pointer = find_floating_pointer(ram)
        assert sum(ram[pointer:pointer + 16]) % 256 == 0
        config_addr = struct.unpack_from("<I", ram, pointer + 4)[0]
        length, = struct.unpack_from("<H", ram, config_addr + 4)
        assert sum(ram[config_addr:config_addr + length]) % 256 == 0
        count, = struct.unpack_from("<H", ram, config_addr + 34)
        offset, processors = config_addr + 44, []
        for _ in range(count):
            if ram[offset] == 0:
                processors.append(bytes(ram[offset:offset + 20]))
                offset += 20
            else:
                offset += 8
        assert offset == config_addr + length
        assert [entry[1] for entry in processors] == list(range(cpus))     # APIC IDs 0..N-1
        assert all(entry[3] & 1 for entry in processors)                   # enabled
        assert [bool(entry[3] & 2) for entry in processors] == [True] + [False] * (cpus - 1)


def test_multiboot_address_flag_loads_the_file_where_its_header_says(tmp_path):
    """The a.out kludge (64-bit kernels such as rustos use it: a multiboot v1 loader reads only
    32-bit ELF): the file from the header's position back to load_addr goes to load_addr, zeros
    up to bss_end_addr, and the entry is the header's."""
    import pytest

    from replayvm.errors import UsageError

    load = 0x100000
    header = struct.pack("<8I", firmware.MULTIBOOT_MAGIC, 0x00010003,
                         (-(firmware.MULTIBOOT_MAGIC + 0x00010003)) & 0xFFFFFFFF,
                         load + 0x40, load, load + 0x200, load + 0x1000, load + 0x80)
    image = b"\x7fELF" + bytes(0x3C) + header + bytes(range(256))[:0x200 - 0x60] + b"\xEE" * 0x100
    kernel = tmp_path / "kernel64"
    kernel.write_bytes(image)
    ram = fresh_ram()
    ram[load + 0x200:load + 0x1000] = b"\xAA" * 0xE00                 # must be zeroed (bss)
    state = firmware.boot_multiboot(ram, kernel)
    assert state.regs["rip"] == load + 0x80 and state.regs["rax"] == firmware.MULTIBOOT_BOOTLOADER_MAGIC
    assert bytes(ram[load:load + 0x200]) == image[:0x200]             # up to load_end_addr only
    assert bytes(ram[load + 0x200:load + 0x1000]) == bytes(0xE00)
    bad = bytearray(image)
    struct.pack_into("<I", bad, 0x40 + 28, 0x10)                      # entry below load_addr
    kernel.write_bytes(bytes(bad))
    with pytest.raises(UsageError, match="load addresses are not valid"):
        firmware.boot_multiboot(fresh_ram(), kernel)


def find_rsdp(ram: memoryview) -> int:
    """The 64-bit xv6 port's find_rdsp: the EBDA's first KiB, then 0xE0000-0xFFFFF, in steps of 4,
    "RSD PTR " with the first 20 bytes summing to zero."""
    ebda = struct.unpack_from("<H", ram, 0x40E)[0] << 4
    for start, length in ((ebda, 1024), (0xE0000, 0x20000)):
        for addr in range(start, start + length - 20, 4):
            if bytes(ram[addr:addr + 8]) == b"RSD PTR " and sum(ram[addr:addr + 20]) % 256 == 0:
                return addr
    raise AssertionError("no RSDP where kernels look")


def test_acpi_madt_lists_every_cpu_and_the_ioapic_where_kernels_look():
    for cpus in (1, 2, 8):
        ram = fresh_ram()
        firmware.fill_bios_data_area(ram, cpus=cpus)
        rsdp = find_rsdp(ram)
        assert rsdp % 16 == 0 and ram[rsdp + 15] == 0          # 16-byte aligned, ACPI 1.0
        rsdt = struct.unpack_from("<I", ram, rsdp + 16)[0]
        assert bytes(ram[rsdt:rsdt + 4]) == b"RSDT"
        length = struct.unpack_from("<I", ram, rsdt + 4)[0]
        assert sum(ram[rsdt:rsdt + length]) % 256 == 0
        tables = struct.unpack_from(f"<{(length - 36) // 4}I", ram, rsdt + 36)
        madts = [t for t in tables if bytes(ram[t:t + 4]) == b"APIC"]
        assert len(madts) == 1
        madt = madts[0]
        length = struct.unpack_from("<I", ram, madt + 4)[0]
        assert sum(ram[madt:madt + length]) % 256 == 0
        lapic_addr, flags = struct.unpack_from("<II", ram, madt + 36)
        assert lapic_addr == hw.LAPIC_ADDR and flags & 1
        apic_ids, ioapics, at = [], [], madt + 44
        while at < madt + length:
            kind, size = ram[at], ram[at + 1]
            assert size >= 2 and at + size <= madt + length
            if kind == 0:
                _, _, _, apic_id, enabled = struct.unpack_from("<BBBBI", ram, at)
                assert enabled & 1
                apic_ids.append(apic_id)
            elif kind == 1:
                _, _, ioapic_id, _, address, base = struct.unpack_from("<BBBBII", ram, at)
                ioapics.append((ioapic_id, address, base))
            at += size
        assert apic_ids == list(range(cpus))                  # the BSP first, as in the MP table
        assert ioapics == [(hw.IOAPIC_ID, hw.IOAPIC_ADDR, 0)]


def test_the_plain_pc_has_neither_mp_nor_acpi_tables():
    ram = fresh_ram()
    firmware.fill_bios_data_area(ram, mp_tables=False)
    assert b"RSD PTR " not in bytes(ram[0xE0000:0x100000]) and b"_MP_" not in bytes(ram[0x9FC00:0xA0000])
