"""The guest's serial console: where its output goes and where its input comes from.

Output (bytes the guest writes to the UART) goes to the terminal and into a transcript that the
run's stop conditions read. Input comes from one of:
- a script (`--input`): each line is typed once the guest shows the prompt again; after the last
  line's output and the next prompt the session is over;
- the terminal in raw mode: keystrokes go to the guest; Ctrl-A x quits, Ctrl-A h shows help,
  Ctrl-A Ctrl-A sends a literal Ctrl-A (QEMU's conventions);
- nothing (not a terminal and no script).
Input is handed to the machine only when it asks (`take_input`), so it enters the guest through
one door that a recorder can log.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import BinaryIO

from replayvm.errors import UsageError

CTRL_A = 0x01
HELP_TEXT = (b"\r\nreplayvm console: C-a x  quit    C-a h  this help    C-a C-a  send C-a\r\n")


SIMPLE_ESCAPES = {"n": 10, "t": 9, "r": 13, "\\": 92, "0": 0, "e": 27, "'": 39, '"': 34}
HEX_DIGITS = "0123456789abcdefABCDEF"


def decode_escapes(text: str, option: str = "--input") -> bytes:
    r"""Decode the C escapes `\n \t \r \e \0 \\ \' \" \xNN` of a --input argument.

    Anything else after a backslash (`\q`, `\x4`, a backslash at the very end) is refused: typed
    as is, it would reach the guest as something the user did not mean, or (a lone backslash at
    the end) leave the last line without its newline and the session waiting to its timeout.
    """
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out += ch.encode()
            i += 1
            continue
        nxt = text[i + 1:i + 2]
        if nxt in SIMPLE_ESCAPES and nxt:
            out.append(SIMPLE_ESCAPES[nxt])
            i += 2
            continue
        digits = text[i + 2:i + 4]
        if nxt == "x" and len(digits) == 2 and all(c in HEX_DIGITS for c in digits):
            out.append(int(digits, 16))
            i += 4
            continue
        if not nxt:
            raise UsageError(f"{option} ends with a lone backslash (write \\\\ for a backslash)")
        bad = text[i:i + 4] if nxt == "x" else text[i:i + 2]
        raise UsageError(f"{option}: unknown escape '{bad}' at character {i + 1} (known: \\n \\t "
                         f"\\r \\e \\0 \\\\ \\' \\\" \\xNN)")
    return bytes(out)


class Console:
    """Collects guest output, supplies guest input, and says when a scripted session is over."""

    def __init__(self, output: BinaryIO | None = None, *, script: bytes | None = None,
                 prompt: bytes = b"$ ", until: bytes | None = None, interactive: bool = False,
                 shown_before: bytes = b"") -> None:
        self.output = output
        self.transcript = bytearray()
        self.prompt = prompt
        self.until = until
        self.quit_requested = False
        self.script_done = False
        self.until_matched = False
        self._script_lines = _split_lines(script) if script is not None else None
        self._search_from = 0             # where to look for the next prompt in the transcript
        # A console taking over a replayed session (replay --live): a prompt the replay showed
        # last (or began to show) counts as shown here.
        self._before = shown_before[-len(prompt):] if prompt else b""
        self._until_from = 0
        self._pending = bytearray()       # keystrokes not yet handed to the guest
        self._lock = threading.Lock()
        self.input_ready = threading.Event()
        self._terminal: _RawTerminal | None = None
        if interactive and script is None:
            self._terminal = _RawTerminal(self)

    # ---------------------------------------------------------------- guest output
    def write(self, byte: int) -> None:
        self.transcript.append(byte)
        if self.output is not None:
            self.output.write(bytes((byte,)))

    def flush(self) -> None:
        if self.output is not None:
            try:
                self.output.flush()
            except (BrokenPipeError, ValueError):
                self.output = None

    def text(self) -> str:
        return self.transcript.decode("utf-8", "replace")

    # ---------------------------------------------------------------- input
    def take_input(self) -> bytes:
        """Bytes to type into the guest now (possibly none). Also updates the stop conditions."""
        self._check_until()
        if self._script_lines is not None:
            return self._next_script_line()
        with self._lock:
            data = bytes(self._pending)
            self._pending.clear()
            self.input_ready.clear()
        return data

    def _check_until(self) -> None:
        if self.until is not None and not self.until_matched:
            found = self.transcript.find(self.until, self._until_from)
            if found >= 0:
                self.until_matched = True
            else:
                self._until_from = max(0, len(self.transcript) - len(self.until) + 1)

    def _next_script_line(self) -> bytes:
        assert self._script_lines is not None
        before = self._before
        found = (before + self.transcript[:len(self.prompt)]).find(self.prompt) if before else -1
        if found >= 0:
            self._before = b""
            self._search_from = max(0, found + len(self.prompt) - len(before))
        else:
            found = self.transcript.find(self.prompt, self._search_from)
            if found < 0:
                return b""
            self._search_from = found + len(self.prompt)
        if not self._script_lines:
            self.script_done = True
            return b""
        return self._script_lines.pop(0)

    def keystrokes(self, data: bytes) -> None:
        """From the terminal thread: queue keys for the guest."""
        with self._lock:
            self._pending += data
        self.input_ready.set()

    def request_quit(self) -> None:
        self.quit_requested = True
        self.input_ready.set()

    @property
    def finished(self) -> bool:
        return self.quit_requested or self.script_done or self.until_matched

    def close(self) -> None:
        self.flush()
        if self._terminal is not None:
            self._terminal.restore()
            self._terminal = None


def _split_lines(script: bytes) -> list[bytes]:
    """Lines with their newline kept (a final fragment without one is typed as is)."""
    lines = script.splitlines(keepends=True)
    return [line for line in lines if line]


class _RawTerminal:
    """Puts stdin in raw mode and forwards keystrokes to the console from a daemon thread."""

    def __init__(self, console: Console) -> None:
        import termios
        import tty

        self.console = console
        self.fd = sys.stdin.fileno()
        self._saved = termios.tcgetattr(self.fd)
        tty.setraw(self.fd)
        # Keep output processing (as QEMU's stdio console does): guests print "\n" alone, and a
        # raw terminal would draw a staircase.
        attrs = termios.tcgetattr(self.fd)
        attrs[1] |= termios.OPOST | termios.ONLCR
        termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
        self._thread = threading.Thread(target=self._read_loop, name="console-input", daemon=True)
        self._thread.start()

    def _read_loop(self) -> None:
        escape = False
        while not self.console.quit_requested:
            try:
                data = os.read(self.fd, 64)
            except OSError:
                return
            if not data:
                return
            keys = bytearray()
            for byte in data:
                if escape:
                    escape = False
                    if byte in (ord("x"), ord("X")):
                        self.console.request_quit()
                        return
                    if byte in (ord("h"), ord("H"), ord("?")):
                        if self.console.output is not None:
                            self.console.output.write(HELP_TEXT)
                            self.console.flush()
                        continue
                    if byte == CTRL_A:
                        keys.append(CTRL_A)
                    continue
                if byte == CTRL_A:
                    escape = True
                    continue
                keys.append(byte)
            if keys:
                self.console.keystrokes(bytes(keys))

    def restore(self) -> None:
        import termios

        termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
