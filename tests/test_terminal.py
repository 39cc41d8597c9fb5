"""What a person at a terminal meets: every verb run in a pseudo-terminal, as a real process.

The verbs behave differently on a tty (the raw console with Ctrl-A commands, the analyze progress
bar), and those paths are invisible to tests that pipe stdin and stdout. Each test here starts
`replayvm` with a pty as its stdin, stdout and stderr, types into it and reads the screen. No
verdict depends on time: the test waits for the text it expects, and the deadline (HANG_S) only
detects a hang.
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from replayvm.progress import ProgressBar
from replayvm.trace.summary import summarize
from tests.harness import HANG_S

ROOT = Path(__file__).resolve().parent.parent
ROWS, COLUMNS = 30, 100
CTRL_A = b"\x01"
BOOTED = re.compile(rb"race: (ok|LOST UPDATES)\r\n\$ ")       # the demo shell's first prompt


class Terminal:
    """`replayvm ARGS` on a fresh pty of ROWS x COLUMNS; `screen` is everything it has shown."""

    def __init__(self, *args: str, cwd: Path = ROOT) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        self.cooked = termios.tcgetattr(self.slave)          # what the session must leave behind
        env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
        env.update(PYTHONPATH=str(ROOT), TERM="xterm")
        self.process = subprocess.Popen([sys.executable, "-m", "replayvm.cli", *args], cwd=cwd, env=env,
                                        stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                        start_new_session=True)
        self.screen = b""
        self._seen = 0                                        # expect() looks past what it matched

    def _read(self, wait_s: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], wait_s)
        if not ready:
            return False
        try:
            chunk = os.read(self.master, 65536)
        except OSError:                                       # EIO: the pty has no writer left
            return False
        self.screen += chunk
        return bool(chunk)

    def expect(self, pattern: bytes | re.Pattern) -> re.Match:
        """Wait until `pattern` (text or a compiled regex) shows after what was matched before."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + HANG_S
        while True:
            match = regex.search(self.screen, self._seen)
            if match:
                self._seen = match.end()
                return match
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {regex.pattern!r} on the terminal after {HANG_S} s:\n"
                                     f"{self.screen.decode(errors='replace')[-3000:]}")
            if not self._read(0.2) and self.process.poll() is not None and not self._read(0):
                raise AssertionError(f"exit status {self.process.returncode} before {regex.pattern!r}:\n"
                                     f"{self.screen.decode(errors='replace')[-3000:]}")

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self) -> int:
        """The exit status, once the process has ended; everything it showed is in `screen`."""
        try:
            status = self.process.wait(timeout=HANG_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {HANG_S} s:\n{self.screen.decode(errors='replace')}")
        while self._read(0.05):
            pass
        return status

    def attributes(self) -> list:
        return termios.tcgetattr(self.slave)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        self.kill()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminal():
    opened: list[Terminal] = []

    def start(*args: str) -> Terminal:
        opened.append(Terminal(*args))
        return opened[-1]

    yield start
    for term in opened:
        term.close()


def assert_no_staircase(screen: bytes) -> None:
    """Every line feed the guest sent reached the screen as CR LF (a bare LF draws a staircase)."""
    bare = [m.start() for m in re.finditer(rb"(?<!\r)\n", screen)]
    assert not bare, f"bare line feeds at {bare[:5]}: {screen[max(0, bare[0] - 60):bare[0] + 20]!r}"


# ---------------------------------------------------------------------------------- record
def test_record_on_a_terminal_the_guest_gets_typed_keys_and_ctrl_a_commands(terminal, tmp_path):
    trace = tmp_path / "typed.zst"
    term = terminal("record", "--engine", "emu", "-o", str(trace))
    term.expect(b"replayvm demo guest")
    term.expect(BOOTED)
    raw = term.attributes()
    assert not raw[3] & (termios.ECHO | termios.ICANON | termios.ISIG)   # raw: keys go to the guest
    assert raw[1] & termios.OPOST and raw[1] & termios.ONLCR              # output still gets CR LF

    term.type(b"echo hi\r")                                   # Enter on a terminal is CR
    term.expect(b"echo hi\r\nhi\r\n$ ")
    term.type(CTRL_A + b"h")
    term.expect(b"replayvm console: C-a x  quit")
    term.type(CTRL_A + CTRL_A + b"\r")                        # a literal Ctrl-A: the guest gets it
    term.expect(b"unknown command: \x01\r\n$ ")
    term.type(CTRL_A + b"x")
    assert term.wait() == 0                                   # quitting is a normal end
    assert_no_staircase(term.screen)
    assert term.attributes() == term.cooked                   # the terminal is given back as it was

    summary = summarize(trace)
    assert not summary["truncated"] and summary["end"] == "quit", summary
    assert summary["input_bytes"] == len(b"echo hi\r\x01\r")
    replayed = terminal("replay", str(trace))
    replayed.expect(b"$ echo hi\r\nhi\r\n$ ")                  # the console again, then the verdict
    replayed.expect(re.compile(rb"replay verified: \d+ events"))
    assert replayed.wait() == 0


def test_replay_live_on_a_terminal_hands_the_console_over_after_the_replay(terminal, demo_trace, tmp_path):
    branch = tmp_path / "branch.zst"
    term = terminal("replay", str(demo_trace), "--live", "-o", str(branch))
    term.expect(b"$ race\r\n")                               # the recording's console, replayed...
    term.expect(BOOTED)
    deadline = time.monotonic() + HANG_S                      # ...then the console goes live (raw)
    while term.attributes()[3] & (termios.ECHO | termios.ICANON | termios.ISIG):
        assert time.monotonic() < deadline, term.screen.decode(errors="replace")
        time.sleep(0.05)
    term.type(b"echo live\r")
    term.expect(b"echo live\r\nlive\r\n$ ")
    term.type(CTRL_A + b"x")
    assert term.wait() == 0
    assert_no_staircase(term.screen)
    assert term.attributes() == term.cooked
    assert b"branch trace in" in term.screen
    summary = summarize(branch)
    assert not summary["truncated"] and summary["end"] == "quit" and summary["parent"]["trace"] == str(demo_trace)
    replayed = terminal("replay", str(branch))
    replayed.expect(b"echo live\r\nlive\r\n$ ")
    replayed.expect(re.compile(rb"replay verified: \d+ events"))
    assert replayed.wait() == 0


def test_record_with_input_on_a_terminal_leaves_the_terminal_alone(terminal):
    term = terminal("record", "--engine", "emu", "--input", r"echo scripted\n")
    term.expect(b"$ echo scripted\r\nscripted\r\n$ ")
    assert term.wait() == 0
    assert_no_staircase(term.screen)
    assert term.attributes() == term.cooked                   # never put in raw mode


# ---------------------------------------------------------------------------------- the other verbs
def test_analyze_on_a_terminal_shows_a_progress_bar_then_the_summary(terminal, demo_trace, tmp_path):
    term = terminal("analyze", str(demo_trace), "-o", str(tmp_path / "t.db"))
    term.expect(re.compile(rb"loading \[[#.]+\] +\d+%"))
    term.expect(re.compile(rb"loading \[#+\] 100%  [\d,]+ records\r\n"))
    summary = term.expect(re.compile(rb"[^\r\n]*t\.db: trace 1: .* rows/s\)\r\n"))
    assert term.wait() == 0
    assert b"Traceback" not in term.screen
    assert term.screen.rstrip().endswith(summary.group(0).rstrip())   # the summary is the last line


def test_analyze_failing_on_a_terminal_is_one_line_after_the_bar(terminal, tmp_path):
    (tmp_path / "bad.zst").write_bytes(b"junk" * 4)
    term = terminal("analyze", str(tmp_path / "bad.zst"))
    assert term.wait() == 2
    lines = term.screen.decode().strip().splitlines()
    assert len(lines) == 1 and "not a replayvm trace" in lines[0], term.screen


def test_replay_info_and_sql_on_a_terminal(terminal, demo_trace, tmp_path):
    replayed = terminal("replay", str(demo_trace))
    replayed.expect(b"$ echo hello\r\nhello\r\n")
    replayed.expect(re.compile(rb"replay verified: \d+ events, \d+ instructions, state hash [0-9a-f]+"))
    assert replayed.wait() == 0
    assert_no_staircase(replayed.screen)

    info = terminal("info", str(demo_trace))
    info.expect(re.compile(rb"state +complete, ended by script-done\r\n"))
    assert info.wait() == 0

    query = terminal("sql", str(demo_trace), "SELECT source, count(*) AS n FROM interrupts "
                                             "GROUP BY source ORDER BY source")
    query.expect(re.compile(rb"source +n\r\n-+ +-+\r\n"))     # a table with its header
    query.expect(re.compile(rb"timer +\d+\r\n"))
    assert query.wait() == 0
    assert b"Traceback" not in query.screen


# ---------------------------------------------------------------------------------- the bar itself
def test_progress_bar_shows_records_and_the_share_of_bytes_read():
    bar = ProgressBar(io.StringIO(), total_bytes=1000)
    bar.update(1234, 250)
    assert bar.line(60) == "loading [" + "#" * 7 + "." * 23 + "]  25%  1,234 records"
    assert len(bar.line(60)) == 60                         # the width it was given, no more
    assert bar.line(20) == "loading  25%  1,234 "          # too narrow for a bar: text, cut to fit
    bar.update(2000, 5000)                                   # never past 100%
    assert " 100%  2,000 records" in bar.line(60)


def test_progress_bar_ends_its_line_full_or_erases_itself_on_failure():
    shown = io.StringIO()
    bar = ProgressBar(shown, total_bytes=10)
    bar.update(5, 3)
    bar.close()
    assert shown.getvalue().startswith("\rloading [") and shown.getvalue().endswith("100%  5 records\n")
    failed = io.StringIO()
    bar = ProgressBar(failed, total_bytes=10)
    bar.update(1, 1)
    bar.close(finished=False)
    assert failed.getvalue().endswith("\r\x1b[K") and "\n" not in failed.getvalue()
