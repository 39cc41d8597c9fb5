"""A public 64-bit kernel as an outside check: swetland/xv6 (x86-64 xv6, a local build named by
REPLAYVM_XV6_64_DIR, never committed; README says how to build it) on both engines.

It boots by multiboot v1 with the a.out kludge (an ELF64 kernel: a 64-bit vCPU), finds its CPUs
through ACPI (the `mp` machine's RSDP and MADT; its MP-table fallback dereferences NULL when there
is no RSDP), and uses the LAPIC timer, IOAPIC, IDE PIO (fs on disk 1) and COM1. It runs
unmodified on emu, with one CPU and with two. One fact of PVM (this machine's /dev/kvm), not of
replayvm, shapes the kvm test: an `int` from ring 3 arrives as #UD, so the unmodified port's first
system call kills init. The kvm copy carries the documented workaround (a #UD on `cd 40` is the
system call; RIP += 2) and PHYSTOP 32 MiB (PVM emulates kernel code one instruction at a time, and
kinit fills every free page); it is made in a temp folder, patched there and built with the port's
own Makefile.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import replay
from tests.conftest import local_build

RAM_MIB = 512                        # its Makefile's `qemu -m 512`
INT_AS_UD_FIX = ("kernel/trap.c", "  if(tf->trapno == T_SYSCALL){\n",
                 "  if(tf->trapno == T_ILLOP && (tf->cs & 3) == 3 &&\n"
                 "     ((uchar*)tf->eip)[0] == 0xcd && ((uchar*)tf->eip)[1] == T_SYSCALL){\n"
                 "    tf->trapno = T_SYSCALL;   // PVM turns a user-mode `int` into #UD\n"
                 "    tf->eip += 2;\n"
                 "  }\n"
                 "  if(tf->trapno == T_SYSCALL){\n")
SMALL_PHYSTOP = ("include/memlayout.h", "#define PHYSTOP 0xE000000", "#define PHYSTOP 0x2000000")


@pytest.fixture(scope="session")
def xv6_64_dir() -> Path:
    path = local_build("REPLAYVM_XV6_64_DIR", "a build of github:swetland/xv6 at fa7208ce8ed3; "
                                              "README's test section says how")
    missing = [n for n in ("out/kernel.elf", "fs.img", "xv6.img", "Makefile") if not (path / n).is_file()]
    if missing:
        pytest.fail(f"REPLAYVM_XV6_64_DIR={path} lacks {', '.join(missing)}")
    return path


def patched_build(source: Path, dest: Path, *patches: tuple[str, str, str]) -> Path:
    """Copy the tree (without its build output), apply the patches, build it with its Makefile."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("out", "*.img", ".git"))
    for name, old, new in patches:
        path = dest / name
        text = path.read_text()
        assert text.count(old) == 1, f"{name}: the line to patch is not there once: {old!r}"
        path.write_text(text.replace(old, new))
    result = subprocess.run(["make", "-j2", "xv6.img", "fs.img"], cwd=dest, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return dest


def session(tree: Path, script: bytes, engine: str, trace: Path | None = None, until: bytes | None = None,
            timeout_s: float = 300):
    out = io.BytesIO()
    outcome, _ = run_session(SessionOptions(
        kernel=tree / "out/kernel.elf", disks=[tree / "xv6.img", tree / "fs.img"], engine=engine,
        ram_mib=RAM_MIB, script=script, until=until, trace=trace, timeout_s=timeout_s), output=out)
    return outcome, out.getvalue().decode(errors="replace").replace("\r\n", "\n")


def assert_ls_listing(text: str) -> None:
    assert "init: starting sh" in text and "$ ls\n" in text, text[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in text.split("$ ls\n")[1].splitlines()
            if len(line.split()) == 4}
    assert rows["README"][0] == "2" and rows["."][0] == "1", rows          # a file, a directory
    assert {"cat", "ls", "sh", "usertests", "zombie"} <= rows.keys(), rows


def test_unmodified_port_boots_through_acpi_runs_ls_and_replays_verified_on_emu(xv6_64_dir, tmp_path):
    trace = tmp_path / "xv6-64.zst"
    outcome, text = session(xv6_64_dir, b"ls\n", "emu", trace=trace)
    assert outcome.reason == "script-done", (outcome, text[-2000:])
    assert "acpi: cpu#0 apicid 0\nacpi: ioapic#0 @fec00000 id=1 base=0\n" in text, text[:500]
    assert "mpinit" not in text                              # the MADT, not the fallback
    assert_ls_listing(text)
    moved = tmp_path / "moved.zst"                           # the trace alone: no kernel, no disks
    moved.write_bytes(trace.read_bytes())
    out = io.BytesIO()
    result = replay(moved, output=out)
    assert result.verified and not result.mismatches
    assert out.getvalue().decode(errors="replace").replace("\r\n", "\n") == text


def test_unmodified_port_starts_its_second_cpu_from_the_madt_and_replays_verified(xv6_64_dir, tmp_path):
    trace = tmp_path / "xv6-64-smp.zst"
    out = io.BytesIO()
    outcome, _ = run_session(SessionOptions(
        kernel=xv6_64_dir / "out/kernel.elf", disks=[xv6_64_dir / "xv6.img", xv6_64_dir / "fs.img"],
        engine="emu", ram_mib=RAM_MIB, script=b"echo hi\n", trace=trace, timeout_s=300, cpus=2,
        virtual_clock=True), output=out)
    text = out.getvalue().decode(errors="replace").replace("\r\n", "\n")
    assert outcome.reason == "script-done", (outcome, text[-2000:])
    assert "acpi: cpu#1 apicid 1\n" in text and "cpu1: starting" in text, text[:500]
    assert "$ echo hi\nhi\n" in text
    replayed = io.BytesIO()
    result = replay(trace, output=replayed)
    assert result.verified and not result.mismatches
    assert replayed.getvalue() == out.getvalue()


def test_on_pvm_its_first_system_call_is_ud_and_the_workaround_records_and_replays(
        xv6_64_dir, require_kvm, tmp_path):
    outcome, text = session(xv6_64_dir, b"ls\n", "kvm", until=b"init exiting", timeout_s=120)
    assert outcome.reason == "until", (outcome, text[-2000:])
    assert "initcode: trap 6 " in text, text[-2000:]         # T_ILLOP on initcode's `int $64`

    tree = patched_build(xv6_64_dir, tmp_path / "kvm", INT_AS_UD_FIX, SMALL_PHYSTOP)
    trace = tmp_path / "xv6-64-kvm.zst"
    outcome, text = session(tree, b"ls\n", "kvm", trace=trace)
    assert outcome.reason == "script-done", (outcome, text[-2000:])
    assert_ls_listing(text)
    out = io.BytesIO()
    result = replay(trace, output=out)     # a tick right after a LAPIC ID read: by its landmark
    assert result.verified and not result.mismatches
    assert out.getvalue().decode(errors="replace").replace("\r\n", "\n") == text
