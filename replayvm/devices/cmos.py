"""CMOS RAM and real-time clock (ports 0x70 index, 0x71 data).

The time comes from the machine's guest clock, read when the guest reads a time register: the
clock, not this device, is what a recorder logs and a replayer feeds back. No update cycle is
ever in progress (register A's UIP bit reads 0), so a guest's "wait for UIP clear" loop never spins.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from replayvm.devices.state import U64, Blob, uint

INDEX = 0
DATA = 1
NMI_DISABLE = 0x80

REG_SECONDS = 0x00
REG_MINUTES = 0x02
REG_HOURS = 0x04
REG_WEEKDAY = 0x06
REG_DAY = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_SHUTDOWN_STATUS = 0x0F
REG_BASE_MEM_LO, REG_BASE_MEM_HI = 0x15, 0x16
REG_EXT_MEM_LO, REG_EXT_MEM_HI = 0x17, 0x18
REG_EXT_MEM2_LO, REG_EXT_MEM2_HI = 0x30, 0x31
REG_HIGH_MEM_LO, REG_HIGH_MEM_HI = 0x34, 0x35
REG_CENTURY = 0x32
TIME_REGISTERS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR,
                  REG_CENTURY)

CLOCK_SOURCE = "cmos"                # the source name of CMOS clock reads in a trace
RAM_SIZE = 128

# Register names by port offset, as the `devices` table of analyze shows them (`cmos.data`).
REGISTERS = {INDEX: "index", DATA: "data"}

B_24_HOUR = 0x02
B_BINARY = 0x04
D_VALID_RAM_AND_TIME = 0x80
A_DEFAULT = 0x26                     # 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) clear


class WallClock(Protocol):
    def wall_time_s(self) -> float: ...


def _bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def is_time_read(offset: int, index: int) -> bool:
    """Whether a read at port `offset` reads the time, with `index` selected: the data port on a
    clock register (the recorder logs it as a clock read, replay takes it from the trace)."""
    return offset == DATA and index in TIME_REGISTERS


@dataclass(frozen=True)
class CmosState:
    """The selected index and the 128 bytes of CMOS RAM (the clock registers read the guest
    clock, so their bytes here are never read)."""
    index: uint(7)
    ram: Blob(RAM_SIZE, RAM_SIZE)
    time_reads: U64


class Cmos:
    name = "cmos"
    state_type = CmosState

    def __init__(self, clock: WallClock, ram_bytes: int) -> None:
        self.clock = clock
        self.index = 0
        self.ram = bytearray(RAM_SIZE)
        self.ram[REG_A] = A_DEFAULT
        self.ram[REG_B] = B_24_HOUR
        self.ram[REG_D] = D_VALID_RAM_AND_TIME
        base_kb, ext_kb = 640, min(max(ram_bytes // 1024 - 1024, 0), 0xFFFF)
        self.ram[REG_BASE_MEM_LO], self.ram[REG_BASE_MEM_HI] = base_kb & 0xFF, base_kb >> 8
        for lo in (REG_EXT_MEM_LO, REG_EXT_MEM2_LO):
            self.ram[lo], self.ram[lo + 1] = ext_kb & 0xFF, ext_kb >> 8
        high = min(max(ram_bytes - (16 << 20), 0) >> 16, 0xFFFF)
        self.ram[REG_HIGH_MEM_LO], self.ram[REG_HIGH_MEM_HI] = high & 0xFF, high >> 8
        self.time_reads = 0

    def _time_register(self, register: int) -> int:
        self.time_reads += 1
        t = time.gmtime(self.clock.wall_time_s())
        hour = t.tm_hour
        pm = 0
        if not self.ram[REG_B] & B_24_HOUR:
            pm = 0x80 if hour >= 12 else 0
            hour = hour % 12 or 12
        value = {REG_SECONDS: t.tm_sec % 60, REG_MINUTES: t.tm_min, REG_HOURS: hour,
                 REG_WEEKDAY: (t.tm_wday + 1) % 7 + 1, REG_DAY: t.tm_mday, REG_MONTH: t.tm_mon,
                 REG_YEAR: t.tm_year % 100, REG_CENTURY: t.tm_year // 100}[register]
        if not self.ram[REG_B] & B_BINARY:
            value = _bcd(value)
        return value | (pm if register == REG_HOURS else 0)

    def read(self, offset: int, size: int) -> int:
        if offset == INDEX:
            return self.index
        register = self.index
        if register in TIME_REGISTERS:
            return self._time_register(register)
        if register == REG_C:
            value, self.ram[REG_C] = self.ram[REG_C], 0     # reading C acknowledges
            return value
        return self.ram[register]

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == INDEX:
            self.index = value & ~NMI_DISABLE & 0x7F
            return
        register = self.index
        if register in TIME_REGISTERS or register in (REG_C, REG_D):
            return                            # the clock is the guest clock; C/D are read-only
        if register == REG_A:
            value &= 0x7F                     # UIP is read-only
        self.ram[register] = value

    @property
    def time_register_selected(self) -> bool:
        """Whether a read of the data port now reads the time (see is_time_read)."""
        return self.index in TIME_REGISTERS

    def state(self) -> CmosState:
        return CmosState(index=self.index, ram=bytes(self.ram), time_reads=self.time_reads)

    def restore(self, state: CmosState) -> None:
        self.index = state.index
        self.ram = bytearray(state.ram)
        self.time_reads = state.time_reads
