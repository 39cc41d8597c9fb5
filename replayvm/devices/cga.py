"""CGA text mode: the CRT controller's index/data ports (cursor position) and a text-screen reader.

The text buffer itself at 0xB8000 is plain guest RAM; `render_text_screen` reads it as lines.
"""

from __future__ import annotations

from dataclasses import dataclass

from replayvm import hw
from replayvm.devices.state import U8, Blob

INDEX = 0
DATA = 1
REG_CURSOR_HIGH = 0x0E
REG_CURSOR_LOW = 0x0F
REGISTER_COUNT = 0x20

# Port names by offset from hw.CGA_CRT_PORT, as the `devices` table of analyze shows them.
REGISTERS = {INDEX: "index", DATA: "data"}


@dataclass(frozen=True)
class CgaState:
    """The selected CRT register and the CRT controller's registers."""
    index: U8
    registers: Blob(REGISTER_COUNT, REGISTER_COUNT)


class CgaCrt:
    name = "cga.crt"
    state_type = CgaState

    def __init__(self) -> None:
        self.index = 0
        self.registers = bytearray(REGISTER_COUNT)

    @property
    def cursor(self) -> int:
        return self.registers[REG_CURSOR_HIGH] << 8 | self.registers[REG_CURSOR_LOW]

    def read(self, offset: int, size: int) -> int:
        if offset == INDEX:
            return self.index
        return self.registers[self.index] if self.index < REGISTER_COUNT else 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == INDEX:
            self.index = value & 0xFF
            if size == 2:                 # `outw` to the index port: index and data at once
                self.write(DATA, 1, value >> 8)
        elif self.index < REGISTER_COUNT:
            self.registers[self.index] = value & 0xFF

    def state(self) -> CgaState:
        return CgaState(index=self.index, registers=bytes(self.registers))

    def restore(self, state: CgaState) -> None:
        self.index = state.index
        self.registers = bytearray(state.registers)


def render_text_screen(ram: memoryview | bytes, base: int = hw.CGA_TEXT_ADDR, rows: int = 25,
                       cols: int = 80) -> list[str]:
    """The text screen as lines (characters only, trailing blanks stripped)."""
    cells = bytes(ram[base:base + rows * cols * 2])
    lines = []
    for row in range(rows):
        chars = cells[row * cols * 2:(row + 1) * cols * 2:2]
        lines.append(chars.decode("cp437").replace("\0", " ").rstrip())
    return lines
