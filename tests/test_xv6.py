"""Unmodified xv6 (a local build named by REPLAYVM_XV6_DIR, never committed) on the machine."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from replayvm.record.session import SessionOptions, run_session


def xv6_session(xv6_dir: Path, script: bytes, *, engine: str = "emu", timeout_s: float = 120,
                until: bytes | None = None, tmp_path: Path | None = None):
    out = io.BytesIO()
    options = SessionOptions(disks=[xv6_dir / "xv6.img", xv6_dir / "fs.img"], engine=engine,
                             script=script, until=until, timeout_s=timeout_s)
    outcome, machine = run_session(options, output=out)
    return outcome, out.getvalue().decode("utf-8", "replace"), machine


def test_xv6_boots_to_the_shell_and_runs_commands(xv6_dir):
    outcome, text, machine = xv6_session(
        xv6_dir, b"ls\necho hello\ncat README\nmkdir d\nls d\n")
    assert outcome.reason == "script-done", (outcome, text[-2000:])
    assert "init: starting sh" in text
    lines = text.splitlines()
    assert any(line.startswith("README") and line.split()[1] == "2" for line in lines), text
    assert any(line.split()[:1] == ["usertests"] for line in lines)
    assert "\nhello\n" in text
    assert "xv6 is a re-implementation of Dennis Ritchie's" in text       # cat README
    assert any(line.startswith(".") and line.split()[1] == "1" for line in text.split("ls d")[1].splitlines())
    assert not machine.ide.errors if hasattr(machine.ide, "errors") else True


def test_xv6_disk_writes_never_touch_the_image(xv6_dir, tmp_path):
    for name in ("xv6.img", "fs.img"):
        shutil.copy(xv6_dir / name, tmp_path / name)
    before = (tmp_path / "fs.img").read_bytes()
    outcome, text, _ = xv6_session(tmp_path, b"mkdir newdir\necho hi > newdir/f\ncat newdir/f\n")
    assert outcome.reason == "script-done", text[-2000:]
    assert "\nhi\n" in text
    assert (tmp_path / "fs.img").read_bytes() == before


@pytest.mark.slow
def test_xv6_usertests_pass(xv6_dir):
    outcome, text, _ = xv6_session(xv6_dir, b"usertests\n", timeout_s=1800, until=b"ALL TESTS PASSED")
    assert outcome.reason == "until", text[-3000:]


def test_xv6_loader_on_kvm_reaches_the_paging_switch_and_says_so(xv6_dir, require_kvm):
    outcome, text, machine = xv6_session(xv6_dir, b"ls\n", engine="kvm", timeout_s=300)
    assert outcome.reason == "unsupported", outcome
    assert "paging" in outcome.detail and "--engine emu" in outcome.detail, outcome.detail
    with (xv6_dir / "kernel").open("rb") as f:
        loaded = sum(seg["p_filesz"] for seg in ELFFile(f).iter_segments() if seg["p_type"] == "PT_LOAD")
    assert machine.ide.sectors_read >= loaded // 512       # the loader read the kernel over IDE PIO


def test_xv6_kernel_boots_by_multiboot_with_its_file_system(xv6_dir):
    out = io.BytesIO()
    options = SessionOptions(kernel=xv6_dir / "kernel", disks=[xv6_dir / "xv6.img", xv6_dir / "fs.img"],
                             engine="emu", script=b"echo multiboot\n", timeout_s=120)
    outcome, machine = run_session(options, output=out)
    text = out.getvalue().decode()
    assert outcome.reason == "script-done", text[-1000:]
    assert "\nmultiboot\n" in text
    assert machine.ide.sectors_read < 100        # the kernel came from the ELF, not the boot loader
