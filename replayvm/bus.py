"""Address-range registries for port I/O and MMIO: the run loop looks a device up and dispatches.

Each device is registered once, by range, with a name; handlers receive the offset into their
range. Accesses nobody claims are *reported* (counted by address) and answered like an empty bus
(reads all-ones, writes dropped), never raised: guest misbehaviour must not crash the VMM.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass
from typing import Protocol


class Device(Protocol):
    """What a bus needs from a device: register reads and writes by offset into its range."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


@dataclass(frozen=True)
class Mapping:
    base: int
    length: int
    device: Device
    name: str

    @property
    def end(self) -> int:
        return self.base + self.length


ALL_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}


class Bus:
    """A set of non-overlapping address ranges, each owned by one device."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._mappings: list[Mapping] = []
        self._bases: list[int] = []
        self.unclaimed_reads: Counter[int] = Counter()
        self.unclaimed_writes: Counter[int] = Counter()
        self.reads = 0                       # accesses (string accesses count each element)
        self.writes = 0

    def register(self, base: int, length: int, device: Device, name: str) -> None:
        for m in self._mappings:
            if base < m.end and m.base < base + length:
                raise ValueError(f"{self.kind} range {base:#x}+{length:#x} ({name}) overlaps {m.name}")
        mapping = Mapping(base, length, device, name)
        index = bisect.bisect(self._bases, base)
        self._bases.insert(index, base)
        self._mappings.insert(index, mapping)

    def lookup(self, addr: int) -> Mapping | None:
        index = bisect.bisect(self._bases, addr) - 1
        if index >= 0:
            m = self._mappings[index]
            if addr < m.end:
                return m
        return None

    def mappings(self) -> list[Mapping]:
        return list(self._mappings)

    def read(self, addr: int, size: int) -> int:
        self.reads += 1
        m = self.lookup(addr)
        if m is None:
            self.unclaimed_reads[addr] += 1
            return ALL_ONES[size]
        return m.device.read(addr - m.base, size)

    def write(self, addr: int, size: int, value: int) -> None:
        self.writes += 1
        m = self.lookup(addr)
        if m is None:
            self.unclaimed_writes[addr] += 1
            return
        m.device.write(addr - m.base, size, value)

    def read_string(self, addr: int, size: int, count: int) -> bytes:
        """`count` reads of `size` bytes at one address (rep ins), as little-endian bytes."""
        m = self.lookup(addr)
        if m is not None and hasattr(m.device, "read_string"):
            self.reads += count
            return m.device.read_string(addr - m.base, size, count)
        return b"".join(self.read(addr, size).to_bytes(size, "little") for _ in range(count))

    def write_string(self, addr: int, size: int, data: bytes) -> None:
        """Writes of `size`-byte elements of `data` to one address (rep outs)."""
        m = self.lookup(addr)
        if m is not None and hasattr(m.device, "write_string"):
            self.writes += len(data) // size
            m.device.write_string(addr - m.base, size, data)
            return
        for i in range(0, len(data), size):
            self.write(addr, size, int.from_bytes(data[i:i + size], "little"))

    def read_run(self, addr: int, size: int, count: int) -> bytes:
        """The reads of `count` consecutive instructions (an emulated `rep ins` handed over in
        bulk, the first at the engine's position): for the device, a string read."""
        return self.read_string(addr, size, count)

    def write_run(self, addr: int, size: int, data: bytes) -> None:
        """The writes of that many consecutive instructions (an emulated `rep outs` handed over
        in bulk, the first at the engine's position): for the device, a string write."""
        self.write_string(addr, size, data)

    def string_budget(self, addr: int, size: int, write: bool) -> int:
        """How many `size`-byte elements the device at `addr` takes in one string access before
        it must act on them (0: one at a time, the default for a device that does not say)."""
        m = self.lookup(addr)
        budget = getattr(m.device, "string_budget", None) if m is not None else None
        return 0 if budget is None else budget(addr - m.base, size, write)

    def name_of(self, addr: int) -> str | None:
        m = self.lookup(addr)
        return None if m is None else m.name


class PioBus(Bus):
    """Port I/O: at most 64 Ki ports, so a flat table makes lookup one list index."""

    def __init__(self) -> None:
        super().__init__("pio")
        self._table: list[Mapping | None] = [None] * 0x10000

    def register(self, base: int, length: int, device: Device, name: str) -> None:
        super().register(base, length, device, name)
        m = Bus.lookup(self, base)
        for port in range(base, base + length):
            self._table[port] = m

    def lookup(self, addr: int) -> Mapping | None:
        return self._table[addr & 0xFFFF]
