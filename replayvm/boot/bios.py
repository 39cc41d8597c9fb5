"""replayvm's own BIOS for the plain PC (`--machine pc`): real-mode services run by the VMM.

No BIOS code of anyone else runs here, and very little of ours: `install` fills the interrupt
vector table so that every vector points at its own four-byte stub in the F-segment,

    F000:1000+4n:   out 0xEE, al     ; E6 EE   -- hands `int n` to the VMM
                    iret             ; CF
                    nop              ; 90

and the VMM does the work in Python with the CPU's registers (`BiosServices.write`, the device at
the stubs' private port). A service returns its results in the registers, sets or clears CF (and
ZF where the call says so) in the FLAGS image the `int` pushed, which the stub's `iret` pops, and
copies data into guest RAM the way a DMA would. The same stubs run on both engines: it is all
real mode, which PVM's KVM runs too.

Record and replay: the BIOS is machine code of the VMM, run again on replay with the same
registers and RAM, so its register results are recomputed, not recorded. Its only inputs from the
world are disk sectors, which it takes through the disk's one door (`Disk.read_sector`: DISK_READ
records, each sector stored once) and therefore replays without the image. The BIOS keeps no state
of its own beyond guest RAM (the teletype cursor lives in the BIOS data area, as on a PC), so
checkpoints and branch traces need nothing from it.

Services (what pintos's loader and start-up code call, and the usual probes around them):
  int 0x10 AH=0x0E teletype (to the CGA text buffer), AH=0x03 cursor, AH=0x0F video mode;
  int 0x11 equipment; int 0x12 base memory;
  int 0x13 AH=0x00 reset, 0x02 CHS read, 0x08 parameters, 0x15 disk type, 0x41 extensions check,
      0x42 extended (LBA) read; CF=1 with AH=0x01 for a drive the machine does not have;
  int 0x14 AH=0 init, 1 send, 2 receive (times out), 3 status, on COM1 only;
  int 0x15 AH=0x88 extended memory, AX=0xE801, EAX=0xE820 memory map, AX=0x2401 A20 on;
  int 0x16 keyboard: no key is ever waiting (AH=0/0x10 return 0, AH=1/0x11 set ZF);
  int 0x1A AH=0 tick count: midnight, always (no clock input enters through the BIOS);
  int 0x18 / 0x19: boot failure, which ends the run with one line saying so.
Every other vector returns at once with CF set.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Protocol

from replayvm import hw
from replayvm.devices.disk import SECTOR_SIZE, Disk

BIOS_SEGMENT = hw.BIOS_ROM_ADDR >> 4
OPCODE_OUT_IMM8_AL = 0xE6
OPCODE_IRET = 0xCF
OPCODE_NOP = 0x90
VECTORS = 256
STUB = bytes((OPCODE_OUT_IMM8_AL, hw.BIOS_CALL_PORT, OPCODE_IRET, OPCODE_NOP))
assert len(STUB) == hw.BIOS_STUB_SIZE

FLAG_CF = 0x0001
FLAG_ZF = 0x0040
FLAGS_IMAGE_OFFSET = 4            # IP, CS, FLAGS: the frame `int` pushed, at SS:SP

CGA_COLUMNS, CGA_ROWS = 80, 25
TEXT_ATTRIBUTE = 0x07             # light grey on black
HEADS, SECTORS_PER_TRACK = 16, 63     # the geometry pintos's disk tools assume (and CHS calls use)
MAX_CYLINDERS = 1024
FIRST_HARD_DISK = 0x80
EDD_VERSION = 0x30                # EDD 3.0
EDD_PACKET_ACCESS = 0x0001
SMAP = 0x534D4150                 # "SMAP"
E820_USABLE, E820_RESERVED = 1, 2
E801_LOW_LIMIT_KB = 0x3C00        # 15 MiB: the 1-16 MiB hole as E801 reports it
SERIAL_STATUS = 0x60              # LSR: transmitter empty (bit 7 clear: no time-out)
SERIAL_TIMEOUT = 0x80
MODEM_STATUS = 0xB0               # CTS, DSR, DCD
EQUIPMENT = 0x0220                # int 0x11: 80x25 colour text (bits 4-5), one serial port (9-11)
BOOT_FAILURE_VECTORS = {0x18: "int 0x18, no bootable disk or a failed read",
                        0x19: "int 0x19, bootstrap again"}

# Status codes in AH.
OK = 0x00
BAD_COMMAND = 0x01
SECTOR_NOT_FOUND = 0x04
UNSUPPORTED = 0x86

# The device's one register, as the `devices` table of analyze names it (`bios.call`).
REGISTERS = {0: "call"}


class BiosCpu(Protocol):
    """What the services need of an engine while a stub's `out` is being handled: registers by
    their 32-bit names (segment registers as 16-bit selectors)."""

    def reg(self, name: str) -> int: ...

    def set_reg(self, name: str, value: int) -> None: ...


class BiosFailure(Exception):
    """The boot code gave up (int 0x18/0x19): the run ends with this one line."""


def install(ram: memoryview) -> None:
    """The interrupt vector table and the stubs: vector n -> F000:(1000 + 4n)."""
    stubs = hw.BIOS_ROM_ADDR + hw.BIOS_STUBS_OFFSET
    ram[stubs:stubs + VECTORS * hw.BIOS_STUB_SIZE] = STUB * VECTORS
    ivt = b"".join(struct.pack("<HH", hw.BIOS_STUBS_OFFSET + n * hw.BIOS_STUB_SIZE, BIOS_SEGMENT)
                   for n in range(VECTORS))
    ram[0:len(ivt)] = ivt
    ram[hw.BDA_CURSOR:hw.BDA_CURSOR + 2] = bytes(2)


def stub_vector(ip: int) -> int | None:
    """Which vector's stub holds IP (the `out` itself, or just past it: engines differ)."""
    offset = (ip & 0xFFFF) - hw.BIOS_STUBS_OFFSET
    if not 0 <= offset < VECTORS * hw.BIOS_STUB_SIZE:
        return None
    return offset // hw.BIOS_STUB_SIZE


@dataclass(frozen=True)
class BiosState:
    """Nothing: the BIOS's state is in guest RAM (the IVT, the BDA cursor)."""


class _Call:
    """One `int n` being serviced: the registers as read, the results to write back."""

    def __init__(self, cpu: BiosCpu) -> None:
        self.cpu = cpu
        self.eax = cpu.reg("eax")
        self.ebx = cpu.reg("ebx")
        self.ecx = cpu.reg("ecx")
        self.edx = cpu.reg("edx")
        self.changed: dict[str, int] = {}
        self.carry = False
        self.zero: bool | None = None

    @property
    def ah(self) -> int:
        return self.eax >> 8 & 0xFF

    @property
    def al(self) -> int:
        return self.eax & 0xFF

    def set(self, name: str, value: int) -> None:
        self.changed[name] = value & 0xFFFFFFFF

    def set16(self, name: str, value: int) -> None:
        old = self.changed.get(name, getattr(self, name))
        self.set(name, (old & 0xFFFF0000) | (value & 0xFFFF))

    def set_ah(self, value: int) -> None:
        old = self.changed.get("eax", self.eax)
        self.set("eax", (old & 0xFFFF00FF) | (value & 0xFF) << 8)

    def fail(self, status: int) -> None:
        self.set_ah(status)
        self.carry = True


class BiosServices:
    """The device at the stubs' port: each write is an `int n` to service (see the module)."""

    name = "bios"
    state_type = BiosState

    def __init__(self, ram: memoryview, cpu: Callable[[], BiosCpu], disks: list[Disk],
                 serial_out: Callable[[int], None], on_failure: Callable[[str], None]) -> None:
        self.ram = ram
        self.cpu = cpu                  # the engine, asked at each call (it exists after us)
        self.disks = disks
        self.serial_out = serial_out
        self.on_failure = on_failure
        self.calls = 0

    # ---------------------------------------------------------------- the Device side
    def read(self, offset: int, size: int) -> int:
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        cpu = self.cpu()
        vector = stub_vector(cpu.reg("eip"))
        if vector is None or cpu.reg("cs") != BIOS_SEGMENT:
            return                      # not from a stub: a guest poking the port is ignored
        self.calls += 1
        self.service(cpu, vector)

    def state(self) -> BiosState:
        return BiosState()

    def restore(self, state: BiosState) -> None:
        pass

    # ---------------------------------------------------------------- dispatch
    def service(self, cpu: BiosCpu, vector: int) -> None:
        """Service `int vector` with the CPU's registers and write the results back."""
        call = _Call(cpu)
        handler = self._HANDLERS.get(vector)
        if handler is not None:
            handler(self, call)
        elif vector in BOOT_FAILURE_VECTORS:
            self._boot_failure(vector)
        else:
            call.carry = True
        for name, value in call.changed.items():
            cpu.set_reg(name, value)
        self._set_flags(cpu, call)

    def _set_flags(self, cpu: BiosCpu, call: _Call) -> None:
        at = (cpu.reg("ss") << 4) + (cpu.reg("esp") & 0xFFFF) + FLAGS_IMAGE_OFFSET
        flags = int.from_bytes(self.ram[at:at + 2], "little")
        flags = flags | FLAG_CF if call.carry else flags & ~FLAG_CF
        if call.zero is not None:
            flags = flags | FLAG_ZF if call.zero else flags & ~FLAG_ZF
        self.ram[at:at + 2] = flags.to_bytes(2, "little")

    def _linear(self, segment: str, offset: int) -> int:
        return ((self.cpu().reg(segment) << 4) + (offset & 0xFFFF)) & 0xFFFFF

    def _store(self, address: int, data: bytes) -> bool:
        """A DMA-like write into guest RAM; False (nothing written) when it does not fit."""
        if address + len(data) > len(self.ram):
            return False
        self.ram[address:address + len(data)] = data
        return True

    # ---------------------------------------------------------------- int 0x10: video
    def _video(self, call: _Call) -> None:
        if call.ah == 0x0E:
            self.teletype(call.al)
        elif call.ah == 0x03:                       # cursor position and shape
            column, row = self.ram[hw.BDA_CURSOR], self.ram[hw.BDA_CURSOR + 1]
            call.set16("edx", row << 8 | column)
            call.set16("ecx", 0x0607)
        elif call.ah == 0x0F:                       # video mode: 3 (80x25 colour text), page 0
            call.set16("eax", CGA_COLUMNS << 8 | 0x03)
            call.set("ebx", call.ebx & 0xFFFF00FF)
        # other functions (set mode, set cursor...): nothing to do on a text console we own

    def teletype(self, char: int) -> None:
        """Write one character at the cursor, as the BIOS teletype does (CR, LF, BS, BEL)."""
        column, row = self.ram[hw.BDA_CURSOR], self.ram[hw.BDA_CURSOR + 1]
        if char == 0x0D:
            column = 0
        elif char == 0x0A:
            row += 1
        elif char == 0x08:
            column = max(0, column - 1)
        elif char != 0x07:
            at = hw.CGA_TEXT_ADDR + 2 * (row * CGA_COLUMNS + column)
            self.ram[at:at + 2] = bytes((char, TEXT_ATTRIBUTE))
            column += 1
            if column == CGA_COLUMNS:
                column, row = 0, row + 1
        if row == CGA_ROWS:                          # scroll up one line
            text = hw.CGA_TEXT_ADDR
            line = 2 * CGA_COLUMNS
            self.ram[text:text + line * (CGA_ROWS - 1)] = self.ram[text + line:text + line * CGA_ROWS]
            self.ram[text + line * (CGA_ROWS - 1):text + line * CGA_ROWS] = bytes((0x20, TEXT_ATTRIBUTE)) * CGA_COLUMNS
            row = CGA_ROWS - 1
        self.ram[hw.BDA_CURSOR] = column
        self.ram[hw.BDA_CURSOR + 1] = row

    def screen_line(self) -> str:
        """The text of the cursor's line, or the line above when the cursor starts a new one."""
        column, row = self.ram[hw.BDA_CURSOR], self.ram[hw.BDA_CURSOR + 1]
        if column == 0 and row > 0:
            row -= 1
        at = hw.CGA_TEXT_ADDR + 2 * row * CGA_COLUMNS
        text = bytes(self.ram[at:at + 2 * CGA_COLUMNS:2])
        return text.decode("ascii", "replace").replace("\0", " ").strip()

    # ---------------------------------------------------------------- int 0x11, 0x12
    def _equipment(self, call: _Call) -> None:
        call.set16("eax", EQUIPMENT)

    def _base_memory(self, call: _Call) -> None:
        call.set16("eax", hw.BASE_MEM_KB)

    # ---------------------------------------------------------------- int 0x13: disks
    def _disk_of(self, call: _Call) -> Disk | None:
        drive = call.edx & 0xFF
        index = drive - FIRST_HARD_DISK
        return self.disks[index] if 0 <= index < len(self.disks) else None

    def _disk(self, call: _Call) -> None:
        disk = self._disk_of(call)
        function = call.ah
        if disk is None:                            # a floppy, or a hard disk the machine lacks
            call.fail(BAD_COMMAND)
            return
        if function == 0x00:                        # reset
            call.set_ah(OK)
        elif function == 0x02:
            self._read_chs(call, disk)
        elif function == 0x08:
            self._parameters(call, disk)
        elif function == 0x15:                      # disk type: a fixed disk of CX:DX sectors
            call.set_ah(0x03)
            call.set16("ecx", disk.sector_count >> 16)
            call.set16("edx", disk.sector_count & 0xFFFF)
        elif function == 0x41:
            if call.ebx & 0xFFFF != 0x55AA:
                call.fail(BAD_COMMAND)
                return
            call.set16("ebx", 0xAA55)
            call.set_ah(EDD_VERSION)
            call.set16("ecx", EDD_PACKET_ACCESS)
        elif function == 0x42:
            self._read_extended(call, disk)
        else:
            call.fail(BAD_COMMAND)

    def _cylinders(self, disk: Disk) -> int:
        return max(1, min(MAX_CYLINDERS, disk.sector_count // (HEADS * SECTORS_PER_TRACK)))

    def _parameters(self, call: _Call, disk: Disk) -> None:
        last_cylinder = self._cylinders(disk) - 1
        call.set_ah(OK)
        call.set16("ecx", (last_cylinder & 0xFF) << 8 | (last_cylinder >> 8 & 3) << 6 | SECTORS_PER_TRACK)
        call.set16("edx", (HEADS - 1) << 8 | len(self.disks))
        call.set("ebx", call.ebx & 0xFFFF0000)

    def _read_sectors(self, call: _Call, disk: Disk, lba: int, count: int, address: int) -> int:
        """Copy `count` sectors from `lba` to `address`; the number copied (AH says why fewer)."""
        for done in range(count):
            if lba + done >= disk.sector_count:
                call.fail(SECTOR_NOT_FOUND)
                return done
            data = disk.read_sector(lba + done)
            if not self._store(address + done * SECTOR_SIZE, data):
                call.fail(SECTOR_NOT_FOUND)
                return done
        call.set_ah(OK)
        return count

    def _read_chs(self, call: _Call, disk: Disk) -> None:
        count = call.al
        cylinder = (call.ecx >> 8 & 0xFF) | (call.ecx & 0xC0) << 2
        sector = call.ecx & 0x3F
        head = call.edx >> 8 & 0xFF
        if sector == 0 or head >= HEADS:
            call.fail(SECTOR_NOT_FOUND)
            return
        lba = (cylinder * HEADS + head) * SECTORS_PER_TRACK + sector - 1
        done = self._read_sectors(call, disk, lba, count, self._linear("es", call.ebx))
        call.set("eax", (call.changed.get("eax", call.eax) & 0xFFFFFF00) | done)

    def _read_extended(self, call: _Call, disk: Disk) -> None:
        packet_at = self._linear("ds", self.cpu().reg("esi"))
        size, _, count, offset, segment, lba = struct.unpack_from("<BBHHHQ", self.ram, packet_at)
        if size < 16:
            call.fail(BAD_COMMAND)
            return
        done = self._read_sectors(call, disk, lba, count, ((segment << 4) + offset) & 0xFFFFF)
        struct.pack_into("<H", self.ram, packet_at + 2, done)

    # ---------------------------------------------------------------- int 0x14: serial
    def _serial(self, call: _Call) -> None:
        if call.edx & 0xFFFF != 0:                  # COM1 only
            call.set_ah(SERIAL_TIMEOUT)
            return
        function = call.ah
        if function in (0x00, 0x03):                # init (9600 8N1 is what the UART runs) / status
            call.set16("eax", SERIAL_STATUS << 8 | MODEM_STATUS)
        elif function == 0x01:
            self.serial_out(call.al)
            call.set_ah(SERIAL_STATUS)
        elif function == 0x02:                      # receive: nothing typed reaches the BIOS
            call.set_ah(SERIAL_TIMEOUT | SERIAL_STATUS)
        else:
            call.carry = True

    # ---------------------------------------------------------------- int 0x15: system
    def _system(self, call: _Call) -> None:
        ram_kb = len(self.ram) // 1024
        if call.ah == 0x88:                         # KiB above 1 MiB; upper EAX zero
            call.set("eax", min(max(0, ram_kb - 1024), 0xFFFF))
        elif call.eax & 0xFFFF == 0xE801:
            low = min(max(0, ram_kb - 1024), E801_LOW_LIMIT_KB)
            high = max(0, ram_kb - 16 * 1024) // 64
            call.set("eax", low)
            call.set("ecx", low)
            call.set("ebx", min(high, 0xFFFF))
            call.set("edx", min(high, 0xFFFF))
        elif call.eax == 0xE820 and call.edx == SMAP:
            self._memory_map(call)
        elif call.eax & 0xFFFF in (0x2401, 0x2402, 0x2403):   # A20 on / status / support
            call.set16("eax", 0x0001 if call.al != 0x01 else 0x0000)
        else:
            call.fail(UNSUPPORTED)

    def memory_map(self) -> list[tuple[int, int, int]]:
        """(base, length, type) as E820 reports it."""
        return [(0, hw.BASE_MEM_KB * 1024, E820_USABLE),
                (hw.BASE_MEM_KB * 1024, 0xA0000 - hw.BASE_MEM_KB * 1024, E820_RESERVED),
                (hw.BIOS_ROM_ADDR, 0x100000 - hw.BIOS_ROM_ADDR, E820_RESERVED),
                (0x100000, max(0, len(self.ram) - 0x100000), E820_USABLE)]

    def _memory_map(self, call: _Call) -> None:
        entries = self.memory_map()
        index = call.ebx
        if index >= len(entries) or (call.ecx & 0xFFFF) < 20:
            call.fail(UNSUPPORTED)
            return
        self._store(self._linear("es", self.cpu().reg("edi")), struct.pack("<QQI", *entries[index]))
        call.set("eax", SMAP)
        call.set("ecx", 20)
        call.set("ebx", 0 if index + 1 == len(entries) else index + 1)

    # ---------------------------------------------------------------- int 0x16, 0x1A
    def _keyboard(self, call: _Call) -> None:
        if call.ah in (0x01, 0x11):                 # key waiting? never
            call.zero = True
        elif call.ah in (0x00, 0x10, 0x02, 0x12):   # read key (cannot wait for one) / shift flags
            call.set16("eax", 0)
        else:
            call.carry = True

    def _time(self, call: _Call) -> None:
        if call.ah == 0x00:                         # ticks since midnight: 0, no midnight passed
            call.set16("ecx", 0)
            call.set16("edx", 0)
            call.set("eax", call.eax & 0xFFFFFF00)
        else:
            call.carry = True

    # ---------------------------------------------------------------- int 0x18, 0x19
    def _boot_failure(self, vector: int) -> None:
        said = self.screen_line()
        self.on_failure(f"boot failed ({BOOT_FAILURE_VECTORS[vector]})"
                        + (f"; the screen says {said!r}" if said else ""))

    _HANDLERS: dict[int, Callable[["BiosServices", _Call], None]] = {
        0x10: _video, 0x11: _equipment, 0x12: _base_memory, 0x13: _disk, 0x14: _serial,
        0x15: _system, 0x16: _keyboard, 0x1A: _time,
    }
