"""The bundled demo guest, built from guests/demo, booted through the command line and the API."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

from elftools.elf.elffile import ELFFile

from replayvm.guests import guest_file
from replayvm.record.session import SessionOptions, run_session


def test_demo_guest_builds_a_bootable_disk_and_a_symbolised_kernel():
    disk = guest_file("demo", "disk.img").read_bytes()
    assert disk[510:512] == b"\x55\xAA" and len(disk) == 2048 * 512
    assert disk[512:516] == b"\x7fELF"
    with guest_file("demo", "kernel.elf").open("rb") as f:
        symbols = {s.name for s in ELFFile(f).get_section_by_name(".symtab").iter_symbols()}
    assert {"race_task", "race_counter", "trap", "system_call", "scheduler"} <= symbols


def test_readme_first_command_boots_the_demo_and_types_into_its_shell(tmp_path):
    # What README's first command runs, as a user would: the entry point, auto engine.
    result = subprocess.run([sys.executable, "-m", "replayvm.cli", "record", "--input", r"echo hello\n"],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                            env={**os.environ, "REPLAYVM_CACHE": os.environ.get("REPLAYVM_CACHE", str(tmp_path))})
    assert result.returncode == 0, result.stderr
    assert "replayvm demo guest" in result.stdout
    assert "$ echo hello\nhello\n$ " in result.stdout
    assert re.search(r"replayvm: engine (emu|kvm): .+", result.stderr)


def demo_session(script: bytes, **kwargs):
    out = io.BytesIO()
    outcome, machine = run_session(SessionOptions(engine="emu", script=script, timeout_s=60, **kwargs),
                                   output=out)
    return outcome, out.getvalue().decode(), machine


def test_demo_boot_sequence_devices_and_shell_commands():
    outcome, text, machine = demo_session(b"echo hi there\nticks\nspin 1\ndate\ndisk\nbogus\n")
    assert outcome.reason == "script-done", text
    assert re.search(r"date: 20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC", text)        # CMOS clock
    assert text.count("disk: ok (sector 2000 written and read back)") == 2      # IDE + IRQ 14
    assert re.search(r"race: counter=\d+ expected=\d+\nrace: (ok|LOST UPDATES)\n\$ ", text)
    assert "$ echo hi there\nhi there\n" in text                                # UART RX + echo
    assert re.search(r"ticks: \d+", text)
    assert re.search(r"spin: done \d+", text)
    assert "unknown command: bogus" in text
    assert machine.lapic.timer_interrupts_raised > 0
    assert machine.ide.sectors_written == 2 and not machine.ide.errors
    assert machine.disks[0].written_sectors() == [2000]


def test_demo_spin_is_preempted_by_the_timer_many_times_between_exits():
    outcome, text, machine = demo_session(b"ticks\nspin 20\nticks\n", virtual_clock=True)
    ticks = [int(t) for t in re.findall(r"ticks: (\d+)", text)]
    assert len(ticks) == 2 and ticks[1] - ticks[0] >= 5, text      # timer interrupts during spin
    assert "spin: done" in text


def test_demo_race_result_depends_on_where_interrupts_land():
    # With the deterministic instruction clock, the outcome is a function of the interrupt
    # positions: the same run twice gives the same counter; the wall clock gives various ones.
    results = set()
    for _ in range(2):
        _, text, _ = demo_session(b"race\n", virtual_clock=True)
        results.add(tuple(re.findall(r"race: counter=(\d+)", text)))
    assert len(results) == 1
