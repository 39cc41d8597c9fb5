"""The command line as a user meets it: real processes, one-line errors, exit statuses."""

from __future__ import annotations

import os
import subprocess
import sys


from tests.asm import ENTER_FLAT_PM32, FLAT_GDT, assemble


def replayvm(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replayvm.cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("replayvm: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_disk_image_is_a_one_line_error(tmp_path):
    assert_one_line_error(replayvm("record", "--engine", "emu", "--disk", str(tmp_path / "nope.img")),
                          "not found", "nope.img")


def test_disk_image_smaller_than_a_sector_is_refused(tmp_path):
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"\0" * 100)
    assert_one_line_error(replayvm("record", "--engine", "emu", "--disk", str(tiny)), "smaller than")


def test_unbootable_disk_is_refused(tmp_path):
    blank = tmp_path / "blank.img"
    blank.write_bytes(b"\0" * 4096)
    assert_one_line_error(replayvm("record", "--engine", "emu", "--disk", str(blank)), "boot signature")


def test_unknown_option_is_a_one_line_error():
    assert_one_line_error(replayvm("record", "--no-such-option"), "unrecognized arguments")


def test_kvm_engine_without_dev_kvm_is_a_one_line_error(tmp_path):
    # A path that does not exist stands for a host without KVM (the engine honours REPLAYVM_KVM_DEVICE).
    result = replayvm("record", "--engine", "kvm", env={"REPLAYVM_KVM_DEVICE": str(tmp_path / "kvm")})
    assert_one_line_error(result, "kvm")


def test_triple_fault_prints_cpu_state_and_exits_1(tmp_path):
    # A boot sector that enters protected mode with an empty IDT and executes int3.
    boot = assemble(ENTER_FLAT_PM32 + """
    lidt idtdesc
    int3
idtdesc: .word 0
    .long 0
""" + FLAT_GDT, 0x7C00, bits=16)
    image = tmp_path / "fault.img"
    image.write_bytes(boot.ljust(510, b"\0") + b"\x55\xAA" + bytes(512 * 7))
    trace = tmp_path / "fault.zst"
    result = replayvm("record", "--engine", "emu", "--disk", str(image), "--timeout", "5", "-o", str(trace))
    assert result.returncode == 1, result
    assert "triple fault" in result.stderr
    assert "rip=" in result.stderr and "cr0=" in result.stderr
    assert "Traceback" not in result.stderr
    info = replayvm("info", str(trace))                 # the trace of a dead guest is still whole
    assert info.returncode == 0 and "ended by fault" in info.stdout, info
