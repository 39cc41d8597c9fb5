"""A GDB remote serial protocol server on a replay: gdb (or any RSP client) debugs the recorded
session as if it were a live 32-bit x86 machine, forwards and backwards (a 64-bit guest's trace,
one naming the x86-64 feature: an amd64 machine, with gdb's amd64 registers throughout).

What a debugger may do here, and what it may not:
- read registers and memory (guest-virtual addresses, through the guest's page tables);
- software and hardware breakpoints (both are an address compare in the emulator: the guest's
  memory is never patched), write/read/access watchpoints;
- stepi, continue, Ctrl-C; reverse-stepi, reverse-continue (and what gdb builds on them:
  reverse-step, reverse-next, reverse-finish);
- `monitor when`, `monitor seek N|iN`, `monitor regs`, `monitor checkpoints`, `monitor help`.
Writes to registers or memory are refused with an error reply: a replay must stay faithful to the
recording, or it proves nothing.

Stops at the recording's end (or its start, going backwards) are reported as gdb's `replaylog`
stop, which is what gdb expects of a replay target.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time
from typing import Callable, TextIO

from replayvm.engines.base import GuestAddressFault
from replayvm.errors import UsageError
from replayvm.replay.positions import parse_position
from replayvm.replay.replayer import Divergence
from replayvm.replay.timeline import WATCH_ACCESS, WATCH_READ, WATCH_WRITE, Stop, Timeline

SIGTRAP = 5
SIGINT = 2
PACKET_SIZE = 0x4000
# While a monitor command works (a long seek), gdb waits for the reply only `remotetimeout`
# seconds (2 by default) before "Ignoring packet error"; an `O` (console output) packet resets
# its wait, so one, empty (it prints nothing), goes out this often (REPLAYVM_GDB_KEEPALIVE_S
# overrides it: 0 sends one between every two pieces of the seek, which tests use so that their
# verdict does not depend on how fast the host seeks).
KEEPALIVE_S = 0.25


def keepalive_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("REPLAYVM_GDB_KEEPALIVE_S", KEEPALIVE_S)))
    except ValueError:
        return KEEPALIVE_S
THREAD = 1

# The `g` packet order of gdb's i386 core feature: 16 general and segment registers, then x87.
CORE_REGISTERS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "rip", "rflags",
                  "cs", "ss", "ds", "es", "fs", "gs")
X87_REGISTERS = [("st%d" % i, 80) for i in range(8)] + [
    (name, 32) for name in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")]
CONTROL_REGISTERS = ("cr0", "cr2", "cr3", "cr4")

TARGET_XML = """<?xml version="1.0"?>
<!DOCTYPE target SYSTEM "gdb-target.dtd">
<target version="1.0">
  <architecture>i386</architecture>
  <feature name="org.gnu.gdb.i386.core">
    <flags id="i386_eflags" size="4">
      <field name="CF" start="0" end="0"/><field name="" start="1" end="1"/>
      <field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/>
      <field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/>
      <field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/>
      <field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/>
      <field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/>
      <field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/>
      <field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/>
      <field name="ID" start="21" end="21"/>
    </flags>
    <reg name="eax" bitsize="32" type="int32" regnum="0"/>
    <reg name="ecx" bitsize="32" type="int32"/>
    <reg name="edx" bitsize="32" type="int32"/>
    <reg name="ebx" bitsize="32" type="int32"/>
    <reg name="esp" bitsize="32" type="data_ptr"/>
    <reg name="ebp" bitsize="32" type="data_ptr"/>
    <reg name="esi" bitsize="32" type="int32"/>
    <reg name="edi" bitsize="32" type="int32"/>
    <reg name="eip" bitsize="32" type="code_ptr"/>
    <reg name="eflags" bitsize="32" type="i386_eflags"/>
    <reg name="cs" bitsize="32" type="int32"/>
    <reg name="ss" bitsize="32" type="int32"/>
    <reg name="ds" bitsize="32" type="int32"/>
    <reg name="es" bitsize="32" type="int32"/>
    <reg name="fs" bitsize="32" type="int32"/>
    <reg name="gs" bitsize="32" type="int32"/>
%(x87)s
  </feature>
  <feature name="org.replayvm.x86.control">
%(control)s
  </feature>
</target>
"""


# A 64-bit guest's trace (the x86-64 feature): gdb's amd64 core feature, whose `g` order is
# 16 64-bit general registers, RIP, a 32-bit EFLAGS and six 32-bit segment registers, then x87.
# gdb fixes the architecture when it connects, so the whole replay is shown as amd64 (the 32-bit
# entry code too, with the upper halves zero).
AMD64_CORE_REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")
AMD64_PC_REGNUM = 16
AMD64_CONTROL_REGISTERS = ("cr0", "cr2", "cr3", "cr4", "efer")


def target_xml(amd64: bool = False) -> str:
    x87 = "\n".join(f'    <reg name="{name}" bitsize="{bits}" type="{"i387_ext" if bits == 80 else "int"}"'
                    f' group="float"/>' for name, bits in X87_REGISTERS)
    if not amd64:
        control = "\n".join(f'    <reg name="{name}" bitsize="32" type="int32" group="system"/>'
                            for name in CONTROL_REGISTERS)
        return TARGET_XML % {"x87": x87, "control": control}
    core_xml = TARGET_XML.split('    <reg name="eax"')[0].replace("<architecture>i386</architecture>",
                                                                "<architecture>i386:x86-64</architecture>")
    general = "\n".join(f'    <reg name="{name}" bitsize="64" type="{_amd64_type(name)}"/>'
                        for name in AMD64_CORE_REGISTERS).replace('"/>', '" regnum="0"/>', 1)
    rest = '    <reg name="eflags" bitsize="32" type="i386_eflags"/>\n' + "\n".join(
        f'    <reg name="{name}" bitsize="32" type="int32"/>' for name in ("cs", "ss", "ds", "es", "fs", "gs"))
    control = "\n".join(f'    <reg name="{name}" bitsize="64" type="int64" group="system"/>'
                        for name in AMD64_CONTROL_REGISTERS)
    return (core_xml + general + "\n" + rest + "\n" + x87 + "\n  </feature>\n"
            '  <feature name="org.replayvm.x86.control">\n' + control + "\n  </feature>\n</target>\n")


def _amd64_type(name: str) -> str:
    return {"rip": "code_ptr", "rsp": "data_ptr", "rbp": "data_ptr"}.get(name, "int64")


def checksum(data: bytes) -> bytes:
    return b"%02x" % (sum(data) & 0xFF)


def escape_binary(data: bytes) -> bytes:
    out = bytearray()
    for byte in data:
        if byte in b"#$}*":
            out += bytes((0x7D, byte ^ 0x20))
        else:
            out.append(byte)
    return bytes(out)


class Connection:
    """Framing of the remote serial protocol over one socket: $packet#cs, acks, Ctrl-C."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.ack = True
        self.interrupted = False

    def _fill(self, timeout: float | None) -> bool:
        if timeout is not None:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return False
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("gdb closed the connection")
        self.buffer += data
        return True

    def receive(self) -> bytes:
        """The next packet's payload (acks and stray bytes skipped; Ctrl-C noted)."""
        while True:
            while self.buffer and self.buffer[0] != ord("$"):
                if self.buffer[0] == 0x03:
                    self.interrupted = True
                del self.buffer[0]
            end = self.buffer.find(b"#")
            if self.buffer and end != -1 and len(self.buffer) >= end + 3:
                payload = bytes(self.buffer[1:end])
                sent = bytes(self.buffer[end + 1:end + 3])
                del self.buffer[:end + 3]
                if self.ack:
                    good = sent.lower() == checksum(payload)
                    self.sock.sendall(b"+" if good else b"-")
                    if not good:
                        continue
                return payload
            self._fill(None)

    def send(self, payload: bytes) -> None:
        packet = b"$" + payload + b"#" + checksum(payload)
        while True:
            self.sock.sendall(packet)
            if not self.ack:
                return
            while True:
                if not self.buffer:
                    self._fill(None)
                byte = self.buffer[0]
                del self.buffer[0]
                if byte == ord("+"):
                    return
                if byte == ord("-"):
                    break
                if byte == 0x03:
                    self.interrupted = True

    def poll_interrupt(self) -> bool:
        """True once gdb has sent Ctrl-C (checked between pieces of a long continue; the byte may
        have arrived with the packet that started the run)."""
        if not self.interrupted:
            self._fill(0)
            if 0x03 in self.buffer:
                self.buffer.remove(0x03)
                self.interrupted = True
        return self.interrupted


class GdbStub:
    """Serves one gdb connection on a Timeline (see the module docstring)."""

    def __init__(self, timeline: Timeline, log: TextIO | None = None) -> None:
        self.timeline = timeline
        self.log = log
        self.software_breaks: set[int] = set()
        self.hardware_breaks: set[int] = set()
        self.watch_kinds: dict[int, str] = {}     # watched address -> "watch" | "rwatch" | "awatch"
        self.peer_swbreak = False
        self.last_stop = "S05"
        self.conn: Connection | None = None
        self.finished = False
        self.amd64 = timeline.x86_64            # a 64-bit guest: gdb's amd64 registers

    # ---------------------------------------------------------------- serving
    def serve(self, conn: Connection) -> None:
        self.conn = conn
        self.timeline.interrupt_check = conn.poll_interrupt
        self.last_stop = self._stop_reply(Stop("begin", self.timeline.position), initial=True)
        while not self.finished:
            try:
                packet = conn.receive()
                reply = self.handle(packet)
                if reply is not None:
                    conn.send(reply)
            except (ConnectionError, OSError):
                return                               # gdb went away, even in the middle of a run

    def handle(self, packet: bytes) -> bytes | None:
        """The reply to one packet (None: no reply, e.g. after a kill)."""
        text = packet.decode("latin-1")
        head = text[:1]
        try:
            if text == "?":
                return self.last_stop.encode()
            if text.startswith("qSupported"):
                self.peer_swbreak = "swbreak+" in text
                return (f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;swbreak+;hwbreak+;"
                        f"ReverseStep+;ReverseContinue+;QStartNoAckMode+;vContSupported+").encode()
            if text == "QStartNoAckMode":
                assert self.conn is not None
                self.conn.send(b"OK")
                self.conn.ack = False
                return None
            if text.startswith("qXfer:features:read:target.xml:"):
                return self._xfer(target_xml(self.amd64).encode(), text.rsplit(":", 1)[1])
            if text == "g":
                return self._read_registers()
            if head in ("G", "P"):
                return b"E01"                        # the replay is read-only
            if head == "p":
                return self._read_register(int(text[1:], 16))
            if head == "m":
                address, length = (int(x, 16) for x in text[1:].split(","))
                return self._read_memory(address, length)
            if head in ("M", "X"):
                return b"E01"
            if head in ("Z", "z"):
                return self._breakpoint(text)
            if text == "vCont?":
                return b"vCont;c;C;s;S"
            if text.startswith("vCont;"):
                action = text[6:].split(";")[0]
                return self._resume("s" if action[:1] in ("s", "S") else "c")
            if head in ("c", "C"):
                return self._resume("c")
            if head in ("s", "S"):
                return self._resume("s")
            if text in ("bc", "bs"):
                return self._resume(text)
            if text.startswith("qRcmd,"):
                return self._monitor(bytes.fromhex(text[6:]).decode("utf-8", "replace"))
            if head == "H" or head == "T":
                return b"OK"
            if text == "qC":
                return b"QC%x" % THREAD
            if text == "qfThreadInfo":
                return b"m%x" % THREAD
            if text == "qsThreadInfo":
                return b"l"
            if text == "qAttached":
                return b"1"
            if text.startswith("qSymbol"):
                return b"OK"
            if head == "D":
                self.finished = True
                return b"OK"
            if head == "k" or text.startswith("vKill"):
                self.finished = True
                return b"OK" if text.startswith("vKill") else None
            return b""                               # unsupported: gdb falls back
        except Divergence as error:
            self._say(f"replayvm: {error}")
            self.finished = True
            return b"W01"
        except (ValueError, IndexError, UsageError):
            return b"E02"

    # ---------------------------------------------------------------- packets
    def _xfer(self, document: bytes, window: str) -> bytes:
        offset, length = (int(x, 16) for x in window.split(","))
        chunk = document[offset:offset + length]
        return (b"l" if offset + length >= len(document) else b"m") + escape_binary(chunk)

    def _register_values(self) -> list[tuple[int | None, int]]:
        """(value or None when unavailable, size in bytes) in target description order."""
        state = self.timeline.registers()
        values: list[tuple[int | None, int]] = []
        if self.amd64:
            values += [(state.regs.get(name, 0), 8) for name in AMD64_CORE_REGISTERS]
            values.append((state.regs.get("rflags", 0) & 0xFFFFFFFF, 4))
            values += [(getattr(state, name).selector, 4) for name in ("cs", "ss", "ds", "es", "fs", "gs")]
            values += [(None, bits // 8) for _, bits in X87_REGISTERS]
            values += [(getattr(state, name), 8) for name in AMD64_CONTROL_REGISTERS]
            return values
        for name in CORE_REGISTERS:
            if name in state.regs:
                values.append((state.regs[name] & 0xFFFFFFFF, 4))
            else:
                values.append((getattr(state, name).selector, 4))
        values += [(None, bits // 8) for _, bits in X87_REGISTERS]
        values += [(getattr(state, name) & 0xFFFFFFFF, 4) for name in CONTROL_REGISTERS]
        return values

    @staticmethod
    def _encode(value: int | None, size: int) -> bytes:
        if value is None:
            return b"xx" * size
        return value.to_bytes(size, "little").hex().encode()

    def _read_registers(self) -> bytes:
        return b"".join(self._encode(v, s) for v, s in self._register_values())

    def _read_register(self, number: int) -> bytes:
        values = self._register_values()
        if not 0 <= number < len(values):
            return b"E45"
        return self._encode(*values[number])

    def _read_memory(self, address: int, length: int) -> bytes:
        length = min(length, PACKET_SIZE // 2)
        data = bytearray()
        while length > 0:                            # page by page: return what is mapped
            piece = min(length, 0x1000 - (address & 0xFFF))
            try:
                data += self.timeline.read_memory(address, piece)
            except GuestAddressFault:
                break
            address += piece
            length -= piece
        return data.hex().encode() if data else b"E14"

    def _breakpoint(self, text: str) -> bytes:
        insert = text[0] == "Z"
        kind, address, length = text[1:].split(",")[:3]
        kind_number, address, length = int(kind), int(address, 16), int(length, 16)
        timeline = self.timeline
        if kind_number in (0, 1):
            table = self.software_breaks if kind_number == 0 else self.hardware_breaks
            (table.add if insert else table.discard)(address)
            timeline.breakpoints = self.software_breaks | self.hardware_breaks
            return b"OK"
        if kind_number in (2, 3, 4):
            access = {2: WATCH_WRITE, 3: WATCH_READ, 4: WATCH_ACCESS}[kind_number]
            key = (address, length, access)
            if insert:
                if key not in timeline.watches and len(timeline.watches) >= 4:
                    return b"E28"                    # like the four debug registers
                timeline.watches.add(key)
                self.watch_kinds[address] = {2: "watch", 3: "rwatch", 4: "awatch"}[kind_number]
            else:
                timeline.watches.discard(key)
            return b"OK"
        return b""

    def _resume(self, how: str) -> bytes:
        timeline = self.timeline
        assert self.conn is not None
        self.conn.interrupted = False
        if how == "s":
            stop = timeline.step() if timeline.position < timeline.end else Stop("end", timeline.position)
        elif how == "c":
            stop = timeline.cont()
        elif how == "bs":
            stop = timeline.reverse_step()
        else:
            stop = timeline.reverse_continue()
        self.last_stop = self._stop_reply(stop)
        return self.last_stop.encode()

    def _stop_reply(self, stop: Stop, initial: bool = False) -> str:
        pc = self.timeline.registers().regs.get("rip", 0)
        signal = SIGINT if stop.reason == "interrupted" else SIGTRAP
        if self.amd64:
            expedited = f"{AMD64_PC_REGNUM:02x}:{pc.to_bytes(8, 'little').hex()}"
        else:
            expedited = f"08:{(pc & 0xFFFFFFFF).to_bytes(4, 'little').hex()}"
        reply = f"T{signal:02x}thread:{THREAD:x};{expedited};"
        if initial:
            return reply
        if stop.reason == "break":
            if stop.address in self.software_breaks:
                reply += "swbreak:;" if self.peer_swbreak else ""
            else:
                reply += "hwbreak:;"
        elif stop.reason == "watch" and stop.address is not None:
            kind = self._watch_kind(stop.address)
            reply += f"{kind}:{stop.address:x};"
        elif stop.reason == "end":
            reply += "replaylog:end;"
        elif stop.reason == "begin":
            reply += "replaylog:begin;"
        return reply

    def _watch_kind(self, address: int) -> str:
        for start, length, _ in self.timeline.watches:
            if start <= address < start + max(1, length):
                return self.watch_kinds.get(start, "awatch")
        return "awatch"

    # ---------------------------------------------------------------- monitor commands
    def _monitor(self, command: str) -> bytes:
        words = command.split()
        timeline = self.timeline
        if not words or words[0] == "help":
            text = ("monitor when          where the replay is (instruction count, event)\n"
                    "monitor seek N|iN     go to event N or instruction N (then: maint flush "
                    "register-cache)\n"
                    "monitor regs          CPU state, control and segment registers included\n"
                    "monitor checkpoints   checkpoints taken, their cost\n")
        elif words[0] == "when":
            text = timeline.when() + "\n"
        elif words[0] == "seek" and len(words) == 2:
            try:
                position = parse_position(words[1]).instruction(timeline.event_position)
            except UsageError as error:
                return (str(error) + "\n").encode().hex().encode()
            self._seek_keeping_gdb_waiting(position)
            self.last_stop = self._stop_reply(Stop("seek", timeline.position))
            text = (f"now at {timeline.when()}\n"
                    f"(gdb keeps its old register cache: run 'maint flush register-cache')\n")
        elif words[0] == "regs":
            text = timeline.registers().describe() + "\n"
        elif words[0] == "checkpoints":
            stats = timeline.checkpoints.stats
            text = (f"{stats.taken} checkpoints every {timeline.every:,} instructions, "
                    f"{stats.delta_bytes / 2**20:.1f} MiB of page deltas, "
                    f"{stats.take_seconds:.3f} s taking them; {stats.restores} restores in "
                    f"{stats.restore_seconds:.3f} s\n")
        else:
            text = f"unknown monitor command {command!r} (monitor help)\n"
        return text.encode().hex().encode()

    def _seek_keeping_gdb_waiting(self, position: int) -> None:
        timeline = self.timeline
        conn = self.conn
        last = [time.monotonic()]
        interval = keepalive_interval()

        def keepalive() -> None:
            now = time.monotonic()
            if conn is not None and now - last[0] >= interval:
                conn.send(b"O")
                last[0] = now

        timeline.progress = keepalive
        try:
            timeline.seek(position)
        finally:
            timeline.progress = None

    def _say(self, message: str) -> None:
        if self.log is not None:
            self.log.write(message + "\n")
            self.log.flush()


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise UsageError(f"--gdb takes HOST:PORT or PORT, not {text!r}") from None
    if not 0 <= number <= 65535:
        raise UsageError(f"--gdb port {number} is out of range")
    return host or "127.0.0.1", number


def serve(timeline: Timeline, address: str, announce: Callable[[str], None] | None = None,
          log: TextIO | None = sys.stderr) -> None:
    """Listen on `address` (HOST:PORT; loopback unless a host is given), serve one gdb session."""
    host, port = parse_address(address)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise UsageError(f"--gdb {address}: cannot listen there ({error.strerror})") from None
    listener.listen(1)
    bound_host, bound_port = listener.getsockname()[:2]
    if announce is not None:
        announce(f"gdb: listening on {bound_host}:{bound_port} "
                 f"(in gdb: target remote {bound_host}:{bound_port})")
    try:
        sock, _ = listener.accept()
    finally:
        listener.close()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        GdbStub(timeline, log=log).serve(Connection(sock))
    finally:
        sock.close()
