"""The real gdb, in batch mode, against `replayvm replay --gdb` (demo guest; xv6 when given)."""

from __future__ import annotations

import io
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from replayvm.guests import guest_file
from replayvm.record.session import SessionOptions, run_session

STARTUP_S = 60
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def gdb() -> str:
    path = shutil.which("gdb")
    if path is None:
        if ON_CI:
            pytest.fail("CI needs gdb (.ci/run installs it)")
        pytest.skip("gdb is not installed")
    return path



class Stub:
    """`replayvm replay TRACE --gdb 127.0.0.1:0` in a subprocess; the port comes from its stderr."""

    def __init__(self, trace: Path, *extra: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "replayvm.cli", "replay", str(trace), "--gdb", "127.0.0.1:0",
             "--quiet", "--no-keep-checkpoints", *extra],                # the user's cache stays as it was
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stderr = b""
        deadline = time.monotonic() + STARTUP_S
        while b"listening on" not in self.stderr:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.process.stderr], [], [], max(0, remaining))
            chunk = self.process.stderr.read1(4096) if ready else b""
            if not chunk:
                self.process.kill()
                raise AssertionError(f"the stub did not start: {self.stderr.decode()}")
            self.stderr += chunk
        self.address = re.search(rb"listening on (\S+:\d+)", self.stderr).group(1).decode()

    def finish(self) -> str:
        _, err = self.process.communicate(timeout=60)
        return (self.stderr + err).decode()


def run_gdb(gdb: str, elf: Path, address: str, commands: list[str]) -> str:
    script = ["set pagination off", "set confirm off", f"target remote {address}", *commands, "kill"]
    args = [gdb, "-nx", "-batch"]
    for command in script:
        args += ["-ex", command]
    result = subprocess.run([*args, str(elf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=300)
    return result.stdout


def registers(output: str, marker: str) -> str:
    """The `info registers` block printed after `echo MARKER\\n`."""
    block = output.split(marker + "\n", 1)[1]
    return "\n".join(line for line in block.splitlines()[:16])


def test_gdb_breaks_reads_steps_and_reverse_steps_on_the_demo_guest(gdb, demo_trace):
    elf = guest_file("demo", "kernel.elf")
    stub = Stub(demo_trace)
    out = run_gdb(gdb, elf, stub.address, [
        "break race_task", "continue",
        "echo BEFORE\\n", "info registers",
        "x/2xw $esp", "print race_iterations", "print/x $cr0",
        "stepi", "echo STEPPED\\n", "info registers",
        "reverse-stepi", "echo BACK\\n", "info registers",
        "set var race_counter = 5",
        "monitor when",
    ])
    stub.finish()
    assert "Breakpoint 1, race_task ()" in out, out
    before, stepped, back = (registers(out, m) for m in ("BEFORE", "STEPPED", "BACK"))
    assert re.search(r"eip\s+0x[0-9a-f]+\s+0x[0-9a-f]+ <race_task>", before), before
    assert stepped != before
    assert back == before                                   # identical registers after reverse-stepi
    assert re.search(r"\$1 = \d{4,}", out)                  # race_iterations, calibrated at boot
    assert re.search(r"\$2 = 0x8\w{7}", out)                # CR0 with PG set
    assert "Could not write" in out or "Cannot access memory" in out   # the replay is read-only
    assert re.search(r"instruction \d+ of \d+, after event \d+ \(of \d+\)", out)


def test_gdb_reverse_continue_and_watchpoints(gdb, demo_trace):
    elf = guest_file("demo", "kernel.elf")
    stub = Stub(demo_trace)
    out = run_gdb(gdb, elf, stub.address, [
        "break race_task", "continue", "delete 1",
        "watch race_counter", "continue", "continue",
        "echo FORWARD\\n", "print race_counter",
        "reverse-continue", "echo REVERSED\\n", "print race_counter",
        "delete 2", "break uart_interrupt", "continue", "continue",
        "echo SECOND\\n", "monitor when", "reverse-continue", "echo FIRST\\n", "monitor when",
        "delete", "reverse-continue",
    ])
    stub.finish()
    assert "Hardware watchpoint 2: race_counter" in out, out
    assert out.count("Old value = ") >= 3
    forward = int(re.search(r"FORWARD\n\$\d+ = (\d+)", out).group(1))
    reversed_value = int(re.search(r"REVERSED\n\$\d+ = (\d+)", out).group(1))
    assert reversed_value == forward - 1                  # stopped before the write that made it
    second = int(re.search(r"SECOND\ninstruction (\d+)", out).group(1))
    first = int(re.search(r"FIRST\ninstruction (\d+)", out).group(1))
    assert first < second
    assert "No more reverse-execution history" in out       # the last reverse-continue: the start


def test_gdb_refuses_a_trace_recorded_on_kvm_with_one_line(tmp_path):
    from replayvm.trace import TraceWriter

    trace = tmp_path / "kvm.zst"
    writer = TraceWriter(trace, {"engine": "kvm", "position_unit": "exits", "ram_bytes": 1 << 20,
                                 "initial_state": {}})
    writer.close({})
    result = subprocess.run([sys.executable, "-m", "replayvm.cli", "replay", str(trace), "--gdb", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "recorded on kvm" in result.stderr and result.stderr.count("\n") == 1


def test_gdb_on_xv6_breaks_in_sys_write_with_a_backtrace(gdb, xv6_dir, tmp_path):
    trace = tmp_path / "xv6.zst"
    outcome, _ = run_session(SessionOptions(disks=[xv6_dir / "xv6.img", xv6_dir / "fs.img"],
                                            engine="emu", script=b"echo hello\n", trace=trace,
                                            timeout_s=120), output=io.BytesIO())
    assert outcome.reason == "script-done"
    stub = Stub(trace)
    out = run_gdb(gdb, xv6_dir / "kernel", stub.address, [
        "break sys_write", "continue", "bt", "info registers eip",
        "stepi", "reverse-stepi", "info registers eip", "monitor when",
    ])
    stub.finish()
    assert "Breakpoint 1, sys_write ()" in out, out
    frames = re.findall(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\w+)", out, re.M)
    assert frames[:3] == ["sys_write", "syscall", "trap"], out
    eips = re.findall(r"eip\s+(0x[0-9a-f]+)\s+0x[0-9a-f]+ <sys_write", out)
    assert len(eips) == 2 and eips[0] == eips[1]


@pytest.fixture(scope="module")
def demo_smp_trace(tmp_path_factory) -> Path:
    """The demo guest on two CPUs running its race (its SMP part runs on both)."""
    trace = tmp_path_factory.mktemp("gdb-smp") / "demo2.zst"
    outcome, _ = run_session(SessionOptions(engine="emu", script=b"race\n", trace=trace, timeout_s=300,
                                            virtual_clock=True, cpus=2), output=io.BytesIO())
    assert outcome.reason == "script-done"
    return trace


def when(out: str, marker: str) -> tuple[int, int]:
    """(instruction, running CPU) of the `monitor when` printed after `echo MARKER\n`."""
    found = re.search(marker + r"\ninstruction (\d+) of \d+, .*CPU (\d) of 2 running", out)
    assert found, out
    return int(found.group(1)), int(found.group(2))


def test_gdb_sees_each_cpu_as_a_thread_and_steps_each_back_and_forth(gdb, demo_smp_trace):
    """Two CPUs, two threads: a breakpoint for thread 2 stops in CPU 1's smp_race_step while CPU 0
    waits in smp_race (its own registers and backtrace, read while CPU 1 runs); reverse-stepi on
    thread 1 goes back to CPU 0's previous instruction, before CPU 1's turn began, and stepi on
    it comes back to the same EIP; the same on thread 2 stays in CPU 1's code."""
    elf = guest_file("demo", "kernel.elf")
    stub = Stub(demo_smp_trace)
    out = run_gdb(gdb, elf, stub.address, [
        "set scheduler-locking step",                # gdb names the thread it steps (Hc)
        "echo THREADS0\\n", "info threads",
        "break smp_race_step", "continue", "delete",
        "break smp_race_step thread 2", "continue", "delete",
        "echo THREADS\\n", "info threads", "echo HIT\\n", "monitor when",
        "thread 1", "echo BT1\\n", "bt", "echo EIP1\\n", "print/x $eip",
        "reverse-stepi", "echo BACK1\\n", "monitor when", "maint flush register-cache",
        "stepi", "echo FWD1\\n", "print/x $eip",
        "thread 2", "echo EIP2\\n", "print/x $eip",
        "reverse-stepi", "echo BACK2\\n", "monitor when", "print/x $eip",
    ])
    stub.finish()
    threads0 = out.split("THREADS0\n", 1)[1].split("Breakpoint 1 at", 1)[0]
    assert "Thread 1 (CPU 0, running)" in threads0 and "Thread 2 (CPU 1, waiting for its STARTUP IPI)" in threads0
    assert re.search(r"Thread 1 hit Breakpoint 1, smp_race_step", out), out
    assert re.search(r"Thread 2 hit Breakpoint 2, smp_race_step", out), out
    threads = out.split("THREADS\n", 1)[1]
    assert re.search(r"1\s+Thread 1 \(CPU 0, \w+\)", threads) and re.search(r"\* 2\s+Thread 2 \(CPU 1, running\) smp_race_step", threads)
    hit, cpu = when(out, "HIT")
    assert cpu == 1
    frames = re.findall(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\w+)", out.split("BT1\n", 1)[1], re.M)
    assert frames[0] == "smp_race", out                        # CPU 0 waits for CPU 1's part
    eip1 = re.search(r"EIP1\n\$\d+ = (0x[0-9a-f]+)", out).group(1)
    back1, cpu = when(out, "BACK1")
    assert cpu == 0 and back1 < hit                            # before CPU 1's turn: CPU 0's last
    assert re.search(r"FWD1\n\$\d+ = (0x[0-9a-f]+)", out).group(1) == eip1
    back2, cpu = when(out, "BACK2")
    assert cpu == 1 and back2 < hit
    eip2 = re.search(r"EIP2\n\$\d+ = (0x[0-9a-f]+)", out).group(1)
    eip2_back = re.search(r"BACK2\n.*\n\$\d+ = (0x[0-9a-f]+)", out).group(1)
    assert eip2_back != eip2


def test_xv6_on_two_cpus_under_gdb(gdb, xv6_dir, tmp_path):
    """xv6 on two CPUs: `info threads` shows both, `break scheduler` stops once on each CPU (each
    enters it once), and reverse-stepi on the thread gdb stepped goes back to that CPU's
    previous instruction."""
    trace = tmp_path / "xv6-smp.zst"
    outcome, _ = run_session(SessionOptions(disks=[xv6_dir / "xv6.img", xv6_dir / "fs.img"], engine="emu",
                                            script=b"echo hello\n", trace=trace, timeout_s=300, cpus=2,
                                            virtual_clock=True), output=io.BytesIO())
    assert outcome.reason == "script-done"
    stub = Stub(trace)
    out = run_gdb(gdb, xv6_dir / "kernel", stub.address, [
        "set scheduler-locking step",
        "break scheduler", "continue", "echo FIRST\\n", "monitor when", "continue",
        "echo SECOND\\n", "monitor when", "echo THREADS\\n", "info threads", "delete",
        "echo EIP\\n", "print/x $eip", "stepi", "reverse-stepi", "echo BACK\\n", "print/x $eip",
        "reverse-stepi", "echo BEFORE\\n", "monitor when",
    ])
    stub.finish()
    hits = re.findall(r"Thread (\d) hit Breakpoint 1, scheduler", out)
    assert sorted(hits) == ["1", "2"], out
    threads = out.split("THREADS\n", 1)[1]
    assert "Thread 1 (CPU 0" in threads and "Thread 2 (CPU 1" in threads
    first, _ = when(out, "FIRST")
    second, cpu = when(out, "SECOND")
    assert cpu == int(hits[1]) - 1 and second > first
    eip = re.search(r"EIP\n\$\d+ = (0x[0-9a-f]+)", out).group(1)
    assert re.search(r"BACK\n\$\d+ = (0x[0-9a-f]+)", out).group(1) == eip
    before, cpu = when(out, "BEFORE")
    assert cpu == int(hits[1]) - 1 and before < second


class Client:
    """A bare remote-protocol client: what gdb sends, byte for byte, without gdb's tolerance."""

    def __init__(self, address: str) -> None:
        import socket

        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.buffer = b""

    def _read_packet(self) -> bytes:
        while True:
            start = self.buffer.find(b"$")
            end = self.buffer.find(b"#", start)
            if start != -1 and end != -1 and len(self.buffer) >= end + 3:
                payload = self.buffer[start + 1:end]
                assert self.buffer[end + 1:end + 3] == b"%02x" % (sum(payload) & 0xFF)
                self.buffer = self.buffer[end + 3:]
                self.sock.sendall(b"+")
                return payload
            chunk = self.sock.recv(65536)
            assert chunk, "the stub closed the connection"
            self.buffer += chunk

    def send(self, payload: bytes) -> None:
        self.sock.sendall(b"$" + payload + b"#" + b"%02x" % (sum(payload) & 0xFF))

    def ask(self, payload: bytes) -> bytes:
        self.send(payload)
        return self._read_packet()


def test_remote_protocol_details_gdb_relies_on(demo_trace):
    stub = Stub(demo_trace)
    client = Client(stub.address)
    assert b"ReverseContinue+" in client.ask(b"qSupported:swbreak+;hwbreak+")
    xml = client.ask(b"qXfer:features:read:target.xml:0,3fff")
    assert xml.startswith(b"l") and b"org.gnu.gdb.i386.core" in xml and b'name="cr3"' in xml
    assert client.ask(b"?").startswith(b"T05")
    registers = client.ask(b"g")
    assert len(registers) == 2 * (16 * 4 + 8 * 10 + 8 * 4 + 4 * 4)
    assert registers[8 * 8:9 * 8] == b"007c0000"              # eip 0x7c00: the boot sector
    assert client.ask(b"m7c00,2") != b"E14"
    assert client.ask(b"M7c00,1:90") == b"E01"                # the replay is read-only
    assert client.ask(b"P8=00000000") == b"E01"
    assert client.ask(b"mffff0000,4") == b"E14"               # no RAM there
    assert client.ask(b"Z0,zz,1") == b"E02"                   # malformed: an error, not a crash
    assert client.ask(b"qNoSuchThing") == b""                 # unknown: the empty reply
    client.send(b"vCont;c")                                    # run: no breakpoint, to the end...
    client.sock.sendall(b"\x03")                              # ...unless interrupted
    stop = client._read_packet()
    assert stop.startswith(b"T02"), stop                      # SIGINT, at the next 2 M-instruction piece
    when = bytes.fromhex(client.ask(b"qRcmd," + b"when".hex().encode()).decode()).decode()
    position, end = (int(x) for x in re.match(r"instruction (\d+) of (\d+)", when).groups())
    assert 0 < position < end
    assert client.ask(b"bs").startswith(b"T05")               # reverse-stepi from there
    assert client.ask(b"vKill;1") == b"OK"
    stub.finish()
    assert stub.process.returncode == 0


def test_gdb_session_starts_at_seek_and_moves_with_monitor_seek(gdb, demo_trace, tmp_path):
    elf = guest_file("demo", "kernel.elf")
    stub = Stub(demo_trace, "--seek", "i2000000")
    script = tmp_path / "seek.gdb"
    script.write_text("define seek\n  monitor seek $arg0\n  maint flush register-cache\nend\n")
    out = run_gdb(gdb, elf, stub.address, [
        "monitor when", f"source {script}",
        "seek i3000000", "echo AT3M\\n", "monitor when", "info registers eip",
        "stepi", "reverse-stepi", "echo BACK\\n", "info registers eip",
    ])
    stub.finish()
    assert re.search(r"^instruction 2000000 of \d+", out, re.M), out
    assert re.search(r"AT3M\ninstruction 3000000 of \d+", out), out
    eips = re.findall(r"eip\s+(0x[0-9a-f]+)", out)
    assert len(eips) == 2 and eips[0] == eips[1]


def test_gdb_listens_on_loopback_unless_told_otherwise():
    from replayvm.errors import UsageError
    from replayvm.replay.gdbstub import parse_address

    assert parse_address("1234") == ("127.0.0.1", 1234)
    assert parse_address(":1234") == ("127.0.0.1", 1234)
    assert parse_address("0.0.0.0:9") == ("0.0.0.0", 9)
    for bad in ("gdb", "1:99999"):
        with pytest.raises(UsageError):
            parse_address(bad)


def test_a_long_monitor_seek_keeps_gdb_waiting_without_packet_errors(gdb, tmp_path, monkeypatch):
    # A virtual-clock session (its length in instructions is the same on every machine): about
    # 210 million instructions, so a seek far into it from the start, with no checkpoint on the
    # way, runs for a while. gdb gives up on a reply ("Ignoring packet error") after three
    # remote timeouts without a byte. How long the seek takes depends on the host, so the stub is
    # told to send its keepalive between every two pieces of the seek (2 M instructions each)
    # rather than every 0.25 s: the packets are the same, and their number no longer depends on
    # the host's speed.
    monkeypatch.setenv("REPLAYVM_GDB_KEEPALIVE_S", "0")
    trace = tmp_path / "long.zst"
    outcome, _ = run_session(SessionOptions(engine="emu", script=b"spin 20\n", trace=trace, timeout_s=60,
                                            virtual_clock=True), output=io.BytesIO())
    assert outcome.reason == "script-done"
    stub = Stub(trace, "--checkpoint-every", str(10**12))
    client = Client(stub.address)                   # first, byte for byte: O packets, then the reply
    client.send(b"qRcmd," + b"seek i50000000".hex().encode())
    keepalives = 0
    while (reply := client._read_packet()).startswith(b"O"):
        assert reply == b"O"                          # empty console output: gdb prints nothing
        keepalives += 1
    assert b"now at".hex().encode() in reply
    assert keepalives >= 20                           # 50 M instructions in pieces of 2 M
    client.send(b"qRcmd," + b"seek 0".hex().encode())                # back to the start: a restore
    while (reply := client._read_packet()).startswith(b"O"):
        assert reply == b"O"
    assert b"now at".hex().encode() in reply
    client.ask(b"vKill;1")
    stub.finish()
    stub = Stub(trace, "--checkpoint-every", str(10**12))
    out = run_gdb(gdb, guest_file("demo", "kernel.elf"), stub.address,
                  ["set remotetimeout 1", "monitor seek i999999999999", "monitor when"])
    stub.finish()
    assert "Ignoring packet error" not in out and "Remote connection closed" not in out, out
    now_at = re.search(r"now at instruction (\d+) of (\d+)", out)
    assert now_at and now_at.group(1) == now_at.group(2) and int(now_at.group(1)) > 200_000_000, out
