"""replayvm's own BIOS (`--machine pc`): each service on a register file and RAM of the test's,
and the bundled biosboot guest booting through it, recorded and replayed on both engines."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest

from replayvm import hw
from replayvm.boot import bios
from replayvm.devices.disk import Disk
from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import replay
from replayvm.trace import Kind, TraceReader
from replayvm.trace.format import FEATURES_MAJOR, FILE_HEADER
from replayvm.trace.records import DISK_READ

RAM = 4 << 20
STACK = 0x7000                    # SS = 0, SP here: the frame `int` pushed (IP, CS, FLAGS)


class FakeCpu:
    """Registers by name, as the engines offer them to the BIOS."""

    def __init__(self, **regs: int) -> None:
        self.regs = {"eax": 0, "ebx": 0, "ecx": 0, "edx": 0, "esi": 0, "edi": 0, "esp": STACK,
                     "eip": 0, "eflags": 2, "cs": bios.BIOS_SEGMENT, "ds": 0, "es": 0, "ss": 0}
        self.regs.update(regs)

    def reg(self, name: str) -> int:
        return self.regs[name]

    def set_reg(self, name: str, value: int) -> None:
        self.regs[name] = value


class Bench:
    """A BIOS on 4 MiB of RAM with the given disks; `call(vector, **regs)` services one `int`."""

    def __init__(self, disks: list[Disk] | None = None) -> None:
        self.ram = memoryview(bytearray(RAM))
        bios.install(self.ram)
        self.cpu = FakeCpu()
        self.serial: list[int] = []
        self.failures: list[str] = []
        self.services = bios.BiosServices(self.ram, lambda: self.cpu, disks or [], self.serial.append,
                                          self.failures.append)

    def call(self, vector: int, flags: int = 0x0202, **regs: int) -> FakeCpu:
        self.cpu = FakeCpu(**regs)
        self.cpu.regs["eip"] = hw.BIOS_STUBS_OFFSET + vector * hw.BIOS_STUB_SIZE
        self.ram[STACK + 4:STACK + 6] = flags.to_bytes(2, "little")
        self.services.write(0, 1, self.cpu.regs["eax"] & 0xFF)
        return self.cpu

    @property
    def flags(self) -> int:
        return int.from_bytes(self.ram[STACK + 4:STACK + 6], "little")

    @property
    def carry(self) -> bool:
        return bool(self.flags & bios.FLAG_CF)


def disk_of(sectors: int) -> Disk:
    return Disk(b"".join(bytes([n & 0xFF]) * 512 for n in range(sectors)), "disk0")


def test_every_vector_points_at_its_own_stub_in_the_f_segment():
    ram = memoryview(bytearray(RAM))
    bios.install(ram)
    for vector in (0, 0x10, 0x13, 0xFF):
        offset, segment = struct.unpack_from("<HH", ram, vector * 4)
        assert segment == 0xF000
        linear = (segment << 4) + offset
        assert bytes(ram[linear:linear + 3]) == bytes((0xE6, hw.BIOS_CALL_PORT, 0xCF))   # out; iret
        assert bios.stub_vector(offset) == bios.stub_vector(offset + 2) == vector


def test_teletype_writes_the_text_screen_and_keeps_the_cursor_in_the_bios_data_area():
    bench = Bench()
    for char in b"Hi\r\nA":
        bench.call(0x10, eax=0x0E00 | char)
    screen = bytes(bench.ram[hw.CGA_TEXT_ADDR:hw.CGA_TEXT_ADDR + 4])
    assert screen == b"H\x07i\x07"
    assert bench.ram[hw.CGA_TEXT_ADDR + 160] == ord("A")
    assert (bench.ram[hw.BDA_CURSOR], bench.ram[hw.BDA_CURSOR + 1]) == (1, 1)
    assert bench.serial == []                      # the teletype is not the serial port
    for _ in range(30):                            # the screen scrolls: the cursor stays on row 24
        bench.call(0x10, eax=0x0E0A)
    assert bench.ram[hw.BDA_CURSOR + 1] == 24


def test_extended_read_copies_sectors_through_the_disks_door_and_clears_carry():
    disk = disk_of(8)
    seen: list[int] = []
    disk.on_read = lambda lba, data: seen.append(lba)
    bench = Bench([disk])
    packet = 0x600
    bench.ram[packet:packet + 16] = struct.pack("<BBHHHQ", 16, 0, 2, 0x0000, 0x2000, 3)
    cpu = bench.call(0x13, flags=0x0203, eax=0x4200, edx=0x80, esi=packet)
    assert not bench.carry and cpu.regs["eax"] >> 8 & 0xFF == 0
    assert seen == [3, 4]                          # every sector went through Disk.read_sector
    assert bytes(bench.ram[0x20000:0x20200]) == bytes([3]) * 512
    assert bytes(bench.ram[0x20200:0x20400]) == bytes([4]) * 512
    assert struct.unpack_from("<H", bench.ram, packet + 2)[0] == 2


def test_a_read_past_the_end_reports_how_many_sectors_it_copied():
    bench = Bench([disk_of(4)])
    packet = 0x600
    bench.ram[packet:packet + 16] = struct.pack("<BBHHHQ", 16, 0, 3, 0, 0x2000, 2)
    cpu = bench.call(0x13, eax=0x4200, edx=0x80, esi=packet)
    assert bench.carry and cpu.regs["eax"] >> 8 & 0xFF == bios.SECTOR_NOT_FOUND
    assert struct.unpack_from("<H", bench.ram, packet + 2)[0] == 2


def test_a_missing_drive_sets_carry_and_the_probes_answer_for_a_present_one():
    bench = Bench([disk_of(2016)])
    cpu = bench.call(0x13, eax=0x4100, ebx=0x55AA, edx=0x81)
    assert bench.carry and cpu.regs["eax"] >> 8 == bios.BAD_COMMAND
    cpu = bench.call(0x13, flags=0x0203, eax=0x4100, ebx=0x55AA, edx=0x80)
    assert not bench.carry and cpu.regs["ebx"] == 0xAA55 and cpu.regs["ecx"] & 1
    cpu = bench.call(0x13, eax=0x0800, edx=0x80)
    assert not bench.carry
    assert cpu.regs["ecx"] & 0x3F == 63 and cpu.regs["edx"] >> 8 & 0xFF == 15   # sectors, last head
    assert (cpu.regs["ecx"] >> 8) + 1 == 2 and cpu.regs["edx"] & 0xFF == 1       # cylinders, drives


def test_chs_read_addresses_the_sector_the_geometry_says():
    bench = Bench([disk_of(2016)])
    cpu = bench.call(0x13, eax=0x0201, ecx=0x0002, edx=0x0180, ebx=0x1000, es=0)   # C0 H1 S2
    assert not bench.carry and cpu.regs["eax"] & 0xFF == 1
    assert bench.ram[0x1000] == (1 * 63 + 1) & 0xFF


def test_extended_memory_is_below_64_mib_with_the_upper_half_of_eax_zero():
    bench = Bench()
    cpu = bench.call(0x15, eax=0xDEAD8800)
    assert cpu.regs["eax"] == RAM // 1024 - 1024 and not bench.carry


def test_e820_lists_the_memory_map_one_entry_per_call():
    bench = Bench()
    entries, ebx = [], 0
    while True:
        cpu = bench.call(0x15, eax=0xE820, edx=bios.SMAP, ebx=ebx, ecx=20, edi=0x500)
        assert not bench.carry and cpu.regs["eax"] == bios.SMAP and cpu.regs["ecx"] == 20
        entries.append(struct.unpack_from("<QQI", bench.ram, 0x500))
        ebx = cpu.regs["ebx"]
        if ebx == 0:
            break
    assert entries[0] == (0, 639 * 1024, bios.E820_USABLE)
    assert entries[-1] == (0x100000, RAM - 0x100000, bios.E820_USABLE)
    cpu = bench.call(0x15, eax=0xE801)
    assert cpu.regs["eax"] == cpu.regs["ecx"] == 3072 and cpu.regs["ebx"] == 0


def test_serial_sends_to_com1_with_bit_7_of_ah_clear():
    bench = Bench()
    cpu = bench.call(0x14, eax=0x00E3, edx=0)
    assert not cpu.regs["eax"] & 0x8000
    cpu = bench.call(0x14, eax=0x0141, edx=0)
    assert bench.serial == [0x41] and not cpu.regs["eax"] & 0x8000


def test_keyboard_has_no_key_and_the_tick_count_is_midnight():
    bench = Bench()
    bench.call(0x16, eax=0x0100)
    assert bench.flags & bios.FLAG_ZF
    cpu = bench.call(0x1A, eax=0, ecx=0x1234, edx=0x5678)
    assert cpu.regs["ecx"] == cpu.regs["edx"] == 0 and not bench.carry


def test_every_other_vector_returns_with_carry_set():
    bench = Bench()
    for vector in (0x17, 0x40, 0x4F):
        bench.call(vector, flags=0x0202)
        assert bench.carry
    assert bench.failures == []


def test_boot_failure_is_one_line_with_what_the_loader_printed():
    bench = Bench()
    for char in b"Not found\r\n":
        bench.call(0x10, eax=0x0E00 | char)
    bench.call(0x18)
    assert len(bench.failures) == 1 and "\n" not in bench.failures[0]
    assert "int 0x18" in bench.failures[0] and "Not found" in bench.failures[0]


def test_a_write_to_the_port_from_outside_the_stubs_does_nothing():
    bench = Bench()
    bench.cpu = FakeCpu(eax=0x0E41, cs=0)
    bench.services.write(0, 1, 0x41)
    assert bench.services.calls == 0 and bench.ram[hw.CGA_TEXT_ADDR] == 0


# ------------------------------------------------------------------ the bundled biosboot guest
BIOSBOOT_LINES = [b"biosboot: sector 0", b"biosboot: stage 2 loaded", b"biosboot: drive 0x81 absent (CF)",
                  b"biosboot: KiB above 1 MiB 0x0C00", b"biosboot: E820 entries 0x0004",
                  b"biosboot: unknown call: CF set", b"biosboot: IRQ0 ticks 0x000A", b"biosboot: done"]


def record_biosboot(trace: Path, engine: str, **kwargs):
    from replayvm.guests import guest_file

    out = io.BytesIO()
    outcome, machine = run_session(SessionOptions(disks=[guest_file("biosboot", "disk.img")], trace=trace,
                                                  engine=engine, machine="pc", ram_mib=4, timeout_s=60,
                                                  **kwargs), output=out)
    return outcome, out.getvalue()


def check_biosboot(trace: Path, engine: str, **kwargs) -> None:
    outcome, console = record_biosboot(trace, engine, **kwargs)
    assert outcome.reason == "poweroff" and outcome.exit_status == 0, outcome
    assert console.replace(b"\r", b"").splitlines() == BIOSBOOT_LINES
    with trace.open("rb") as f:
        assert FILE_HEADER.unpack(f.read(FILE_HEADER.size))[1] == FEATURES_MAJOR
    with TraceReader(trace) as reader:
        assert reader.header["features"] == ["aspace", "pc"]
        disk_reads = [r for r in reader if r[0] == Kind.DISK_READ]
    lbas = [r[DISK_READ.lba] for r in disk_reads]                   # stage 2, read by int 0x13 AH=0x42
    assert lbas and lbas == list(range(1, len(lbas) + 1))
    replayed = io.BytesIO()
    result = replay(trace, output=replayed)
    assert result.verified, result.mismatches
    assert replayed.getvalue() == console
    assert "powered off" in result.guest_end


def test_biosboot_boots_through_the_bios_and_replays_verified_on_emu(tmp_path):
    check_biosboot(tmp_path / "biosboot.zst", "emu", virtual_clock=True)


def test_biosboot_boots_through_the_same_stubs_on_kvm(tmp_path, require_kvm):
    check_biosboot(tmp_path / "biosboot.zst", "kvm")


def test_the_mp_machine_names_no_machine_feature_and_has_no_bios(demo_trace):
    from replayvm.guests import guest_file
    from replayvm.console import Console
    from replayvm.machine import Machine, MachineConfig

    with demo_trace.open("rb") as f:
        assert FILE_HEADER.unpack(f.read(FILE_HEADER.size))[1:] == (3, 0)
    with TraceReader(demo_trace) as reader:
        assert reader.header["features"] == ["aspace"]          # no "pc": the MP machine
    machine = Machine(MachineConfig(disks=[guest_file("biosboot", "disk.img")], ram_mib=4),
                      Console(io.BytesIO()))
    try:
        assert machine.bios is None and machine.pit is None
        assert bytes(machine.ram[0:1024]) == bytes(1024)            # no IVT: no BIOS code at all
        assert machine.pio.lookup(hw.PIT_PORT) is None
    finally:
        machine.close()


def test_a_pc_trace_is_refused_by_a_reader_that_does_not_know_the_feature(tmp_path, monkeypatch):
    from replayvm.trace import reader as reader_module
    from replayvm.trace.format import TraceFormatError

    trace = tmp_path / "biosboot.zst"
    record_biosboot(trace, "emu", virtual_clock=True)
    monkeypatch.setattr(reader_module, "KNOWN_FEATURES", frozenset())
    with pytest.raises(TraceFormatError, match="pc"):
        replay(trace, output=io.BytesIO())


def test_a_pc_trace_goes_live_midway_and_its_branch_replays_verified(tmp_path):
    """Going live hands the 8254 back to the clock: the guest's remaining ticks come, it powers
    off, and the branch trace (a plain PC's too) replays on its own."""
    from replayvm.record.live import replay_and_go_live

    trace = tmp_path / "biosboot.zst"
    record_biosboot(trace, "emu", virtual_clock=True)
    branch = tmp_path / "branch.zst"
    outcome, _ = replay_and_go_live(trace, SessionOptions(engine="emu", trace=branch, timeout_s=60,
                                                          virtual_clock=True),
                                    seek="100", output=io.BytesIO(), keep_checkpoints=False)
    assert outcome.reason == "poweroff"
    with TraceReader(branch) as reader:
        assert reader.header["features"] == ["aspace", "pc"]
    assert replay(branch, output=io.BytesIO()).verified


def test_the_plain_pc_refuses_a_multiboot_kernel_in_one_line(tmp_path):
    from replayvm.cli import main

    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(b"\x7fELF" + bytes(60))
    with pytest.raises(Exception) as refused:
        run_session(SessionOptions(kernel=kernel, machine="pc", engine="emu", ram_mib=4),
                    output=io.BytesIO())
    assert "--machine pc boots from a disk" in str(refused.value)
    assert main(["record", "--machine", "pc", "--engine", "emu", "--kernel", str(kernel)]) == 2
