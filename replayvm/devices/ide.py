"""The primary IDE (ATA PIO) channel: two drives, LBA28, one sector per DRQ block.

Registered as two devices: the command block at 0x1F0-0x1F7 (`ide.command_block`) and the
device control / alternate status register at 0x3F6 (`ide.control_block`). Commands complete at
once: a READ has its first sector ready (DRQ) and raises IRQ 14 when the command is written; a
WRITE asks for data at once and raises IRQ 14 after each sector it stores. As the ATA standard
says, reading Status or writing Command lowers the interrupt line, so each completion is a new edge
at the edge-triggered IOAPIC pin. Bad requests (out-of-range LBA, unknown command, absent drive)
end in an error status, never an exception.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from replayvm.devices.disk import SECTOR_SIZE, Disk
from replayvm.devices.irq import IrqLine
from replayvm.devices.state import NS, U8, U16, U32, U64, Blob, Choice, Ints

# Command block register offsets.
DATA = 0
ERROR_FEATURES = 1
SECTOR_COUNT = 2
LBA_LOW = 3
LBA_MID = 4
LBA_HIGH = 5
DRIVE_HEAD = 6
STATUS_COMMAND = 7

STATUS_ERR = 0x01
STATUS_DRQ = 0x08
STATUS_DSC = 0x10
STATUS_DF = 0x20
STATUS_DRDY = 0x40
STATUS_BSY = 0x80
ERROR_ABRT = 0x04
ERROR_IDNF = 0x10
CONTROL_NIEN = 0x02
CONTROL_SRST = 0x04
DRIVE_SLAVE = 0x10
DRIVE_LBA = 0x40

CMD_READ_SECTORS = (0x20, 0x21)
CMD_WRITE_SECTORS = (0x30, 0x31)
CMD_READ_MULTIPLE = 0xC4
CMD_WRITE_MULTIPLE = 0xC5
CMD_SET_MULTIPLE = 0xC6
CMD_IDENTIFY = 0xEC
CMD_FLUSH_CACHE = (0xE7, 0xEA)
CMD_INITIALIZE_PARAMS = 0x91
CMD_RECALIBRATE = 0x10

READY = STATUS_DRDY | STATUS_DSC
LBA28_LIMIT = 1 << 28
MAX_SECTORS_PER_COMMAND = 256          # a sector count of 0 means 256

# Register names by offset, as the `devices` table of analyze shows them (`ide0.status`).
REGISTERS = {DATA: "data", ERROR_FEATURES: "error", SECTOR_COUNT: "count", LBA_LOW: "lba_low",
             LBA_MID: "lba_mid", LBA_HIGH: "lba_high", DRIVE_HEAD: "drive", STATUS_COMMAND: "status"}
CONTROL_REGISTERS = {0: "control"}     # the control block: one register at hw.IDE0_CTRL_PORT

# The commands that move sectors, by direction: what a trace's data-port runs carry.
READ_COMMANDS = frozenset({*CMD_READ_SECTORS, CMD_READ_MULTIPLE})
WRITE_COMMANDS = frozenset({*CMD_WRITE_SECTORS, CMD_WRITE_MULTIPLE})
COMMAND_NAMES = {
    **{code: "read_sectors" for code in CMD_READ_SECTORS},
    **{code: "write_sectors" for code in CMD_WRITE_SECTORS},
    CMD_READ_MULTIPLE: "read_multiple", CMD_WRITE_MULTIPLE: "write_multiple",
    CMD_SET_MULTIPLE: "set_multiple", CMD_IDENTIFY: "identify",
    **{code: "flush_cache" for code in CMD_FLUSH_CACHE},
    CMD_INITIALIZE_PARAMS: "initialize_params", CMD_RECALIBRATE: "recalibrate",
}

TRANSFERS = ("read", "write", "identify")          # what the data port is doing while DRQ is set
COMPLETIONS = ("sector_ready", "write_done")       # what a delayed (chaos) command does when due


def request_lba(lba: "list[int] | tuple[int, ...]", drive_head: int) -> int:
    """The LBA28 a command addresses: the three LBA registers and the low nibble of Drive/Head."""
    return lba[0] | lba[1] << 8 | lba[2] << 16 | (drive_head & 0x0F) << 24


class IdeCommandDecoder:
    """Which sectors a guest's data-port transfers move, from its register writes alone (for the
    loader, which has no disk): the registers a command takes its LBA and drive from, kept as the
    channel keeps them, and the next sector's LBA as each sector goes by."""

    def __init__(self) -> None:
        self.lba = [0, 0, 0]
        self.drive_head = DRIVE_LBA | 0xA0
        self.command: int | None = None
        self.next_lba = 0

    def write(self, offset: int, value: int) -> None:
        """A write of `value` at command-block register `offset`."""
        value &= 0xFF
        if LBA_LOW <= offset <= LBA_HIGH:
            self.lba[offset - LBA_LOW] = value
        elif offset == DRIVE_HEAD:
            self.drive_head = value | 0xA0
        elif offset == STATUS_COMMAND:
            self.command = value
            self.next_lba = request_lba(self.lba, self.drive_head)

    @property
    def drive(self) -> int:
        """0 for the master, 1 for the slave."""
        return 1 if self.drive_head & DRIVE_SLAVE else 0

    def transfers(self, reading: bool) -> bool:
        """Whether the last command moves sectors in that direction (a data run carries them)."""
        return self.command in (READ_COMMANDS if reading else WRITE_COMMANDS)

    def take_sector(self) -> int:
        """The LBA of the sector going by now; the next one follows it."""
        lba, self.next_lba = self.next_lba, self.next_lba + 1
        return lba


@dataclass(frozen=True)
class IdeState:
    """Everything the channel needs to go on as it would have: its registers, the sector in the
    buffer and how far the guest has read it, the command in progress (the next LBA and how many
    sectors remain), a command completing later (chaos latency) and the interrupt line's level.
    The disks' contents are not in it: they belong to the disks."""
    features: U8
    sector_count: U8
    lba: Ints(3, U8)
    drive_head: U8
    control: U8
    error: U8
    status: U8
    buffer: Blob(SECTOR_SIZE)
    position: U64
    transfer: Choice(*TRANSFERS) | None
    current_lba: U32
    remaining: U16
    multiple: U16
    completion_ns: NS | None
    completion: Choice(*COMPLETIONS) | None
    irq_level: bool
    commands: U64
    sectors_read: U64
    sectors_written: U64

    def __post_init__(self) -> None:
        if (self.completion_ns is None) != (self.completion is None):
            raise ValueError("IdeState.completion: a completion needs both its time and its kind")


class _Registers:
    """One of the channel's two register windows, forwarding to the channel."""

    def __init__(self, channel: "IdeChannel", control: bool) -> None:
        self.channel = channel
        self.control = control
        self.name = "ide0.control" if control else "ide0"

    def read(self, offset: int, size: int) -> int:
        if self.control:
            return self.channel.alternate_status()
        return self.channel.read_register(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if self.control:
            self.channel.write_control(value)
        else:
            self.channel.write_register(offset, size, value)

    def read_string(self, offset: int, size: int, count: int) -> bytes:
        if not self.control and offset == DATA:
            return self.channel.read_data_block(size * count)
        return b"".join(self.read(offset, size).to_bytes(size, "little") for _ in range(count))

    def string_budget(self, offset: int, size: int, write: bool) -> int:
        """Elements the data port takes in one string access before the sector under way is
        done (written, or read out: then the next is loaded or the command ends, and it may
        interrupt); 0 for any other register."""
        if self.control or offset != DATA:
            return 0
        return (self.channel.write_room() if write else self.channel.read_room()) // size

    def write_string(self, offset: int, size: int, data: bytes) -> None:
        if not self.control and offset == DATA:
            self.channel.write_data_block(data)
            return
        for i in range(0, len(data), size):
            self.write(offset, size, int.from_bytes(data[i:i + size], "little"))


class IdeChannel:
    """The primary channel's state machine (see module docstring)."""

    state_type = IdeState

    def __init__(self, irq: IrqLine, master: Disk | None, slave: Disk | None,
                 latency: Callable[[], int] | None = None, now_ns: Callable[[], int] | None = None) -> None:
        self.irq = irq
        self.drives = [master, slave]
        self.latency = latency               # chaos: ns a command stays busy (None: completes at once)
        self.now_ns = now_ns
        self._completion: tuple[int, str] | None = None    # (due at guest ns, one of COMPLETIONS)
        self.command_block = _Registers(self, control=False)
        self.control_block = _Registers(self, control=True)
        self.commands = 0
        self.sectors_read = 0
        self.sectors_written = 0
        self.errors: list[str] = []
        self.reset()

    def reset(self) -> None:
        self.features = 0
        self.sector_count = 1
        self.lba = [0, 0, 0]
        self.drive_head = DRIVE_LBA | 0xA0
        self.control = 0
        self.error = 0x01                    # diagnostic code "no error" after reset
        self.status = READY
        self.buffer = bytearray()
        self.position = 0
        self.transfer: str | None = None     # "read" / "write" / "identify" while DRQ is set
        self.current_lba = 0
        self.remaining = 0
        self.multiple = 1

    # ---------------------------------------------------------------- helpers
    @property
    def selected(self) -> int:
        return 1 if self.drive_head & DRIVE_SLAVE else 0

    @property
    def drive(self) -> Disk | None:
        return self.drives[self.selected]

    def _request_lba(self) -> int:
        return request_lba(self.lba, self.drive_head)

    def _raise_irq(self) -> None:
        if self.control & CONTROL_NIEN:
            return
        if self.irq.level:
            self.irq.set_level(False)
        self.irq.set_level(True)

    def _lower_irq(self) -> None:
        if self.irq.level:
            self.irq.set_level(False)

    def _fail(self, error: int, why: str) -> None:
        self.errors.append(why)
        self.error = error
        self.status = READY | STATUS_ERR
        self.transfer = None
        self.buffer = bytearray()
        self._raise_irq()

    # ---------------------------------------------------------------- registers
    def alternate_status(self) -> int:
        if self._completion is not None and self.now_ns is not None:
            self.poll(self.now_ns())
        return self.status if self.drive is not None else 0

    def read_register(self, offset: int, size: int) -> int:
        if self._completion is not None and self.now_ns is not None:
            self.poll(self.now_ns())             # a guest polling status sees completion on time
        if offset == DATA:
            return int.from_bytes(self.read_data_block(size), "little")
        if self.drive is None:
            return 0                         # nothing answers for an absent drive
        if offset == STATUS_COMMAND:
            self._lower_irq()
            return self.status
        if offset == ERROR_FEATURES:
            return self.error
        if offset == SECTOR_COUNT:
            return self.sector_count & 0xFF
        if offset in (LBA_LOW, LBA_MID, LBA_HIGH):
            return self.lba[offset - LBA_LOW]
        if offset == DRIVE_HEAD:
            return self.drive_head
        return 0xFF

    def write_register(self, offset: int, size: int, value: int) -> None:
        if offset == DATA:
            self.write_data_block(value.to_bytes(size, "little"))
            return
        value &= 0xFF
        if offset == ERROR_FEATURES:
            self.features = value
        elif offset == SECTOR_COUNT:
            self.sector_count = value
        elif offset in (LBA_LOW, LBA_MID, LBA_HIGH):
            self.lba[offset - LBA_LOW] = value
        elif offset == DRIVE_HEAD:
            self.drive_head = value | 0xA0
        elif offset == STATUS_COMMAND:
            self._command(value)

    def write_control(self, value: int) -> None:
        if value & CONTROL_SRST and not self.control & CONTROL_SRST:
            drives = self.drives
            self.reset()
            self.drives = drives
            self.lba[0] = 1                  # the reset signature: count 1, LBA 1/0/0, error 1 (ATA)
        self.control = value & 0xFF
        if value & CONTROL_NIEN:
            self._lower_irq()

    # ---------------------------------------------------------------- commands
    def _command(self, command: int) -> None:
        self._lower_irq()
        if self.drive is None:
            return
        self.commands += 1
        self.error = 0
        count = self.sector_count or 256
        if command in CMD_READ_SECTORS or command == CMD_READ_MULTIPLE:
            if self._check_range(count):
                self.current_lba, self.remaining = self._request_lba(), count
                self._load_next_sector()
        elif command in CMD_WRITE_SECTORS or command == CMD_WRITE_MULTIPLE:
            if self._check_range(count):
                self.current_lba, self.remaining = self._request_lba(), count
                self.transfer = "write"
                self.buffer = bytearray()
                self.status = READY | STATUS_DRQ
        elif command == CMD_IDENTIFY:
            self.buffer = bytearray(self._identify())
            self.position = 0
            self.transfer = "identify"
            self.status = READY | STATUS_DRQ
            self._raise_irq()
        elif command == CMD_SET_MULTIPLE:
            self.multiple = self.sector_count or 1
            self.status = READY
            self._raise_irq()
        elif command in CMD_FLUSH_CACHE or command in (CMD_INITIALIZE_PARAMS, CMD_RECALIBRATE):
            self.status = READY
            self._raise_irq()
        else:
            self._fail(ERROR_ABRT, f"unsupported command {command:#04x}")

    def _check_range(self, count: int) -> bool:
        drive = self.drive
        assert drive is not None
        lba = self._request_lba()
        if not self.drive_head & DRIVE_LBA:
            self._fail(ERROR_ABRT, "CHS addressing is not supported (use LBA)")
            return False
        if lba + count > drive.sector_count:
            self._fail(ERROR_IDNF, f"{drive.name}: sectors {lba}..{lba + count - 1} beyond the "
                                   f"disk's {drive.sector_count}")
            return False
        return True

    def _load_next_sector(self) -> None:
        drive = self.drive
        assert drive is not None
        self.buffer = bytearray(drive.read_sector(self.current_lba))
        self.position = 0
        self.sectors_read += 1
        self._after_latency("sector_ready")

    def _sector_ready(self) -> None:
        self.transfer = "read"
        self.status = READY | STATUS_DRQ
        self._raise_irq()

    def _write_done(self) -> None:
        self.status = READY
        self._raise_irq()

    # ---------------------------------------------------------------- completion latency (chaos)
    def _after_latency(self, completion: str) -> None:
        """Complete now (`completion` names how), or with a latency source, later: busy until then."""
        if self.latency is None or self.now_ns is None:
            self._complete(completion)
            return
        self.status = STATUS_BSY
        self.transfer = None
        self._completion = (self.now_ns() + self.latency(), completion)

    def _complete(self, completion: str) -> None:
        if completion == "sector_ready":
            self._sector_ready()
        else:
            self._write_done()

    def poll(self, now_ns: int) -> None:
        """Complete a delayed command whose time has come."""
        if self._completion is not None and now_ns >= self._completion[0]:
            _, completion = self._completion
            self._completion = None
            self._complete(completion)

    def next_deadline_ns(self) -> int | None:
        return None if self._completion is None else self._completion[0]

    def _identify(self) -> bytes:
        drive = self.drive
        assert drive is not None
        words = [0] * 256
        words[0] = 0x0040                                  # fixed disk
        words[1], words[3], words[6] = 16383, 16, 63       # nominal CHS geometry
        model = f"REPLAYVM {drive.name}".ljust(40).encode()
        for i in range(20):                                # ATA strings swap bytes in each word
            words[27 + i] = model[2 * i] << 8 | model[2 * i + 1]
        words[47] = 0x8000 | 16
        words[49] = 0x0200                                 # LBA supported
        sectors = min(drive.sector_count, LBA28_LIMIT - 1)
        words[60], words[61] = sectors & 0xFFFF, sectors >> 16
        return struct.pack("<256H", *words)

    # ---------------------------------------------------------------- data port
    def read_data_block(self, length: int) -> bytes:
        if self.transfer not in ("read", "identify"):
            return bytes(length)                           # no data phase: the bus floats low
        chunk = bytes(self.buffer[self.position:self.position + length])
        self.position += length
        if self.position >= len(self.buffer):
            self._sector_read_done()
        return chunk.ljust(length, b"\0")

    def _sector_read_done(self) -> None:
        if self.transfer == "read":
            self.current_lba += 1
            self.remaining -= 1
            if self.remaining > 0:
                self._load_next_sector()
                return
        self.transfer = None
        self.buffer = bytearray()
        self.status = READY

    def read_room(self) -> int:
        """Bytes the data port gives before the sector under way is read out."""
        return len(self.buffer) - self.position if self.transfer in ("read", "identify") else 0

    def write_room(self) -> int:
        """Bytes the data port takes before the sector under way is complete."""
        return SECTOR_SIZE - len(self.buffer) if self.transfer == "write" else 0

    def write_data_block(self, data: bytes) -> None:
        if self.transfer != "write":
            return                                         # data with no write in progress: ignored
        self.buffer += data
        while len(self.buffer) >= SECTOR_SIZE and self.transfer == "write":
            drive = self.drive
            assert drive is not None
            drive.write_sector(self.current_lba, bytes(self.buffer[:SECTOR_SIZE]))
            del self.buffer[:SECTOR_SIZE]
            self.sectors_written += 1
            self.current_lba += 1
            self.remaining -= 1
            if self.remaining <= 0:
                self.transfer = None
                self.buffer = bytearray()
                self._after_latency("write_done")
            else:
                self._raise_irq()

    # ---------------------------------------------------------------- snapshots
    def state(self) -> IdeState:
        completion_ns, completion = self._completion if self._completion is not None else (None, None)
        return IdeState(features=self.features, sector_count=self.sector_count, lba=tuple(self.lba),
                        drive_head=self.drive_head, control=self.control, error=self.error,
                        status=self.status, buffer=bytes(self.buffer), position=self.position,
                        transfer=self.transfer, current_lba=self.current_lba,
                        remaining=self.remaining, multiple=self.multiple,
                        completion_ns=completion_ns, completion=completion,
                        irq_level=self.irq.level, commands=self.commands,
                        sectors_read=self.sectors_read, sectors_written=self.sectors_written)

    def restore(self, state: IdeState) -> None:
        """Back to `state` (the disks keep their own contents); the interrupt line is set quietly."""
        self.features, self.sector_count = state.features, state.sector_count
        self.lba = list(state.lba)
        self.drive_head, self.control = state.drive_head, state.control
        self.error, self.status = state.error, state.status
        self.buffer = bytearray(state.buffer)
        self.position, self.transfer = state.position, state.transfer
        self.current_lba, self.remaining, self.multiple = state.current_lba, state.remaining, state.multiple
        self._completion = None if state.completion is None else (state.completion_ns, state.completion)
        self.commands, self.sectors_read = state.commands, state.sectors_read
        self.sectors_written = state.sectors_written
        self.irq.restore_level(state.irq_level)
