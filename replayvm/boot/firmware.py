"""What firmware leaves behind before a boot sector or kernel runs. No BIOS code runs here (the
plain PC's BIOS services are `replayvm.boot.bios`).

Two boot methods:
- disk: sector 0 of disk 0 at 0x7C00, real mode, CS:IP = 0:7C00, DL = 0x80 (like a PC BIOS);
- multiboot: a multiboot kernel ELF's segments loaded at their physical addresses, or, when its
  header sets the address flag (the "a.out kludge" 64-bit kernels use, since a multiboot v1 loader
  reads only 32-bit ELF), the file copied to the addresses its header gives; 32-bit flat
  protected mode, EAX = 0x2BADB002, EBX = the multiboot information structure. The ELF may be
  64-bit (ELF64, x86-64: a kernel whose 32-bit entry switches to long mode, as Rust kernels and
  64-bit xv6 ports do), which makes the machine a 64-bit one (`kernel_is_64bit`).
Both fill the BIOS data area (EBDA pointer, base memory size), the MP tables and the ACPI tables
(RSDP, RSDT, MADT: `replayvm.boot.acpi`) of the `mp` machine.
"""

from __future__ import annotations

import struct
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.common.exceptions import ELFError

from replayvm import hw
from replayvm.boot.acpi import write_acpi_tables
from replayvm.boot.mptable import write_mp_tables
from replayvm.engines.base import CpuState, Segment, real_mode_state
from replayvm.errors import UsageError

SECTOR_SIZE = 512
BOOT_SIGNATURE = b"\x55\xAA"
MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH_BYTES = 8192
MULTIBOOT_INFO_MEMORY = 1 << 0
MULTIBOOT_ADDRESS_FLAG = 1 << 16          # header fields 3-7 give the load addresses
BOOT_GDT_ADDR = 0x800                     # a flat GDT for multiboot entry (below the boot stack)
BOOT_STACK_TOP = 0x7000
FLAT_CODE_SELECTOR = 0x08
FLAT_DATA_SELECTOR = 0x10


def fill_bios_data_area(ram: memoryview, cpus: int = 1, mp_tables: bool = True) -> None:
    """EBDA segment at 0x40E and base memory size (KiB) at 0x413, as xv6's MP search reads them;
    the MP tables and the ACPI MADT listing `cpus` processors, unless the machine is a plain PC
    (`mp_tables=False`)."""
    ram[hw.BDA_EBDA_SEGMENT:hw.BDA_EBDA_SEGMENT + 2] = struct.pack("<H", hw.EBDA_ADDR >> 4)
    ram[hw.BDA_BASE_MEM_KB:hw.BDA_BASE_MEM_KB + 2] = struct.pack("<H", hw.BASE_MEM_KB)
    if mp_tables:
        write_mp_tables(ram, cpu_count=cpus)
        write_acpi_tables(ram, cpu_count=cpus)


def check_boot_sector(first_sector: bytes) -> None:
    """Refuse a disk 0 the BIOS would not boot: shorter than a sector, or no 0x55AA signature."""
    if len(first_sector) < SECTOR_SIZE:
        raise UsageError("disk 0 is smaller than one sector: nothing to boot")
    if first_sector[510:512] != BOOT_SIGNATURE:
        raise UsageError("disk 0 has no boot signature (0x55AA at byte 510): not bootable")


def boot_from_disk(ram: memoryview, first_sector: bytes, cpus: int = 1, mp_tables: bool = True) -> CpuState:
    """Load a boot sector at 0x7C00 and return the state the BIOS hands it."""
    check_boot_sector(first_sector)
    fill_bios_data_area(ram, cpus, mp_tables)
    ram[hw.BOOT_SECTOR_ADDR:hw.BOOT_SECTOR_ADDR + SECTOR_SIZE] = first_sector[:SECTOR_SIZE]
    return real_mode_state(0, hw.BOOT_SECTOR_ADDR, rdx=0x80, rsp=BOOT_STACK_TOP)


def _flat_segment(selector: int, code: bool) -> Segment:
    return Segment(selector=selector, base=0, limit=0xFFFFFFFF, type=0xB if code else 0x3,
                   s=1, dpl=0, present=1, db=1, g=1)


def _write_flat_gdt(ram: memoryview) -> tuple[int, int]:
    gdt = struct.pack("<QQQ", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
    ram[BOOT_GDT_ADDR:BOOT_GDT_ADDR + len(gdt)] = gdt
    return BOOT_GDT_ADDR, len(gdt) - 1


def find_multiboot_header(image: bytes) -> int | None:
    """Offset of a valid multiboot header in the first 8 KiB (magic + flags + checksum == 0)."""
    for offset in range(0, min(len(image), MULTIBOOT_SEARCH_BYTES) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, offset)
        if magic == MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return offset
    return None


def kernel_is_64bit(kernel: Path) -> bool:
    """Whether a kernel file is an ELF64 for x86-64 (anything else, unreadable files included,
    is left to boot_multiboot to judge)."""
    try:
        with kernel.open("rb") as f:
            ident = f.read(20)
    except OSError:
        return False
    return ident[:4] == b"\x7fELF" and ident[4] == 2 and ident[18:20] == b"\x3e\x00"


def boot_multiboot(ram: memoryview, kernel: Path, cpus: int = 1) -> CpuState:
    """Load a multiboot kernel and return the state a multiboot loader hands it."""
    try:
        image = kernel.read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read kernel {kernel}: {error.strerror}") from None
    header = find_multiboot_header(image)
    if header is None:
        raise UsageError(f"{kernel} has no multiboot header in its first 8 KiB")
    fill_bios_data_area(ram, cpus)
    if struct.unpack_from("<I", image, header + 4)[0] & MULTIBOOT_ADDRESS_FLAG:
        entry = _load_by_header_addresses(ram, kernel, image, header)
    else:
        entry = _load_elf(ram, kernel)
    info = struct.pack("<III", MULTIBOOT_INFO_MEMORY, hw.BASE_MEM_KB, len(ram) // 1024 - 1024)
    ram[hw.MULTIBOOT_INFO_ADDR:hw.MULTIBOOT_INFO_ADDR + len(info)] = info
    state = CpuState()
    state.regs = {name: 0 for name in CpuState.GPR_NAMES}
    state.regs.update(rax=MULTIBOOT_BOOTLOADER_MAGIC, rbx=hw.MULTIBOOT_INFO_ADDR, rsp=BOOT_STACK_TOP,
                      rip=entry, rflags=0x2)
    state.cr0 = 0x11                                  # PE + ET
    state.gdt = _write_flat_gdt(ram)
    state.cs = _flat_segment(FLAT_CODE_SELECTOR, code=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(state, name, _flat_segment(FLAT_DATA_SELECTOR, code=False))
    return state


def _load_by_header_addresses(ram: memoryview, kernel: Path, image: bytes, header: int) -> int:
    """The a.out kludge: the file, from `header - (header_addr - load_addr)`, goes to load_addr up
    to load_end_addr (0: the file's end), zeros up to bss_end_addr (0: none); returns the entry."""
    header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<5I", image, header + 12)
    start = header - (header_addr - load_addr)
    length = (len(image) - start) if load_end == 0 else load_end - load_addr
    end = max(load_addr + length, bss_end)
    if not (load_addr <= header_addr and 0 <= start and length >= 0 and start + length <= len(image)
            and load_addr <= entry < end <= len(ram)):
        raise UsageError(f"{kernel}: its multiboot header's load addresses are not valid for "
                         f"{len(ram) >> 20} MiB of RAM")
    ram[load_addr:load_addr + length] = image[start:start + length]
    ram[load_addr + length:end] = bytes(end - load_addr - length)
    return entry


def _load_elf(ram: memoryview, kernel: Path) -> int:
    """An ELF's (32-bit, or x86-64) loadable segments at their physical addresses; returns the entry."""
    try:
        with kernel.open("rb") as f:
            elf = ELFFile(f)
            if elf.get_machine_arch() not in ("x86", "x64"):
                raise UsageError(f"{kernel} is not an x86 ELF (32-bit or x86-64)")
            entry = elf.header.e_entry
            for segment in elf.iter_segments():
                if segment["p_type"] != "PT_LOAD":
                    continue
                paddr, filesz, memsz = segment["p_paddr"], segment["p_filesz"], segment["p_memsz"]
                if paddr + memsz > len(ram):
                    raise UsageError(f"{kernel}: segment at {paddr:#x}+{memsz:#x} is beyond guest RAM")
                ram[paddr:paddr + filesz] = segment.data()
                ram[paddr + filesz:paddr + memsz] = bytes(memsz - filesz)
    except ELFError as error:
        raise UsageError(f"{kernel} is not a valid ELF file: {error}") from None
    return entry
