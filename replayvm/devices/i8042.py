"""The 8042 keyboard controller: the A20 gate boot loaders open, and keyboard scancodes (IRQ 1).

Registered once at 0x60 with length 5: offset 0 is the data port, offset 4 the status/command
port. Port 0x61 (offset 1) is not the 8042's: on the plain PC it is the 8254's port B, which this
device hands on (`port_b`); elsewhere it floats high. Commands complete at once, so the input buffer is never full (status bit 1 is always 0).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from replayvm.devices.irq import IrqLine
from replayvm.devices.state import U8, Blob

DATA = 0
PORT_B = 1                     # 0x61, system control port B (the plain PC's `port_b`)
STATUS_COMMAND = 4

# Register names by offset from hw.I8042_DATA_PORT, as the `devices` table of analyze shows them.
REGISTERS = {DATA: "data", STATUS_COMMAND: "status"}
QUEUE_LIMIT = 1 << 24          # scancodes (or controller replies) a saved state may hold unread

STATUS_OUTPUT_FULL = 0x01
STATUS_SYSTEM = 0x04
STATUS_COMMAND_LAST = 0x08
CONFIG_KEYBOARD_INTERRUPT = 0x01
OUTPUT_PORT_RESET = 0x01
OUTPUT_PORT_A20 = 0x02

CMD_READ_CONFIG = 0x20
CMD_WRITE_CONFIG = 0x60
CMD_SELF_TEST = 0xAA
CMD_INTERFACE_TEST = 0xAB
CMD_DISABLE_KEYBOARD = 0xAD
CMD_ENABLE_KEYBOARD = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_PULSE_RESET = 0xFE

# Scancode set 1 make codes for unshifted keys; break code = make | 0x80.
_UNSHIFTED = {
    **{c: code for code, c in enumerate("1234567890-=", start=0x02)},
    **{c: code for code, c in enumerate("qwertyuiop[]", start=0x10)},
    **{c: code for code, c in enumerate("asdfghjkl;'`", start=0x1E)},
    **{c: code for code, c in enumerate("\\zxcvbnm,./", start=0x2B)},
    "\n": 0x1C, " ": 0x39, "\t": 0x0F, "\b": 0x0E, "\x1b": 0x01,
}
_SHIFTED = dict(zip('!@#$%^&*()_+{}:"~|<>?', "1234567890-=[];'`\\,./"))
SCANCODE_LEFT_SHIFT = 0x2A


def ascii_to_scancodes(text: str) -> bytes:
    """Set-1 make/break sequences that type `text` (upper case and symbols with shift)."""
    out = bytearray()
    for ch in text:
        shifted = ch.isupper() or ch in _SHIFTED
        base = ch.lower() if ch.isupper() else _SHIFTED.get(ch, ch)
        code = _UNSHIFTED.get(base)
        if code is None:
            continue
        if shifted:
            out.append(SCANCODE_LEFT_SHIFT)
        out += bytes((code, code | 0x80))
        if shifted:
            out.append(SCANCODE_LEFT_SHIFT | 0x80)
    return bytes(out)


@dataclass(frozen=True)
class I8042State:
    """Scancodes not yet read, controller replies waiting, the configuration byte and output port
    (A20), a command waiting for its data byte, the keyboard's enable, which port was written
    last (status bit 3), and the interrupt line's level."""
    scancodes: Blob(QUEUE_LIMIT)
    config: U8
    output_port: U8
    reply: Blob(QUEUE_LIMIT)
    pending_command: U8 | None
    keyboard_enabled: bool
    last_was_command: bool
    irq_level: bool


class I8042:
    name = "i8042"
    state_type = I8042State

    def __init__(self, irq: IrqLine, on_reset: Callable[[], None]) -> None:
        self.irq = irq
        self.on_reset = on_reset
        self.port_b = None                             # the plain PC: the 8254's port 0x61
        self.scancodes: deque[int] = deque()
        self.config = CONFIG_KEYBOARD_INTERRUPT | 0x40 | 0x04
        self.output_port = OUTPUT_PORT_RESET           # A20 closed at power-on
        self.reply: deque[int] = deque()               # controller replies take precedence
        self.pending_command: int | None = None
        self.keyboard_enabled = True
        self.last_was_command = False

    @property
    def a20_enabled(self) -> bool:
        return bool(self.output_port & OUTPUT_PORT_A20)

    def feed_scancodes(self, data: bytes) -> None:
        self.scancodes.extend(data)
        self._update_irq()

    def _output_ready(self) -> bool:
        return bool(self.reply) or (self.keyboard_enabled and bool(self.scancodes))

    def _update_irq(self) -> None:
        level = (bool(self.scancodes) and self.keyboard_enabled and not self.reply
                 and bool(self.config & CONFIG_KEYBOARD_INTERRUPT))
        if level != self.irq.level:
            self.irq.set_level(level)

    def read(self, offset: int, size: int) -> int:
        if offset == PORT_B and self.port_b is not None:
            return self.port_b.read(0, size)
        if offset == STATUS_COMMAND:
            status = STATUS_SYSTEM | (STATUS_COMMAND_LAST if self.last_was_command else 0)
            return status | (STATUS_OUTPUT_FULL if self._output_ready() else 0)
        if offset != DATA:
            return 0xFF
        if self.reply:
            value = self.reply.popleft()
        elif self.keyboard_enabled and self.scancodes:
            value = self.scancodes.popleft()
            if self.irq.level:
                self.irq.set_level(False)              # the next scancode is a new edge
        else:
            value = 0
        self._update_irq()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == PORT_B and self.port_b is not None:
            self.port_b.write(0, size, value)
        elif offset == STATUS_COMMAND:
            self.last_was_command = True
            self._command(value)
        elif offset == DATA:
            self.last_was_command = False
            command, self.pending_command = self.pending_command, None
            if command == CMD_WRITE_OUTPUT_PORT:
                self.output_port = value | OUTPUT_PORT_RESET
            elif command == CMD_WRITE_CONFIG:
                self.config = value
                self._update_irq()
            # bytes for the keyboard itself (LEDs, rates) are accepted and acknowledged
            elif command is None:
                self.reply.append(0xFA)

    def _command(self, command: int) -> None:
        if command in (CMD_WRITE_OUTPUT_PORT, CMD_WRITE_CONFIG):
            self.pending_command = command
        elif command == CMD_READ_OUTPUT_PORT:
            self.reply.append(self.output_port)
        elif command == CMD_READ_CONFIG:
            self.reply.append(self.config)
        elif command == CMD_SELF_TEST:
            self.reply.append(0x55)
        elif command == CMD_INTERFACE_TEST:
            self.reply.append(0x00)
        elif command == CMD_DISABLE_KEYBOARD:
            self.keyboard_enabled = False
        elif command == CMD_ENABLE_KEYBOARD:
            self.keyboard_enabled = True
        elif command == CMD_PULSE_RESET or (0xF0 <= command <= 0xFF and not command & 1):
            self.on_reset()
        self._update_irq()

    def state(self) -> I8042State:
        return I8042State(scancodes=bytes(self.scancodes), config=self.config,
                          output_port=self.output_port, reply=bytes(self.reply),
                          pending_command=self.pending_command,
                          keyboard_enabled=self.keyboard_enabled,
                          last_was_command=self.last_was_command, irq_level=self.irq.level)

    def restore(self, state: I8042State) -> None:
        """Back to `state`; the interrupt line is set quietly (the controllers keep their own)."""
        self.scancodes = deque(state.scancodes)
        self.reply = deque(state.reply)
        self.config, self.output_port = state.config, state.output_port
        self.pending_command = state.pending_command
        self.keyboard_enabled = state.keyboard_enabled
        self.last_was_command = state.last_was_command
        self.irq.restore_level(state.irq_level)
