"""pintos, unmodified, on the plain PC: pintos's own tests run by bench/pintos_check.py, judged by
pintos's own checkers, every trace replayed verified.

Needs a pintos tree built outside the repository: REPLAYVM_PINTOS_DIR (see docs/pintos.md).
Runs on the virtual clock, so no verdict depends on the host's speed. Tests chosen to be quick
and to have the same verdict on the skeleton and on a completed `threads` (alarm-zero and
alarm-negative pass on both); a third, priority-change, is judged against QEMU's verdict when
QEMU is installed (the skeleton fails it, a completed project passes it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "bench" / "pintos_check.py"


def run_harness(out: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HARNESS), "--out", str(out), "--virtual-clock", *arguments],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800)


def test_threads_tests_pass_under_replayvm_and_every_trace_replays_verified(pintos_dir, tmp_path):
    result = run_harness(tmp_path, "--pintos", str(pintos_dir), "--tests", "alarm-zero,alarm-negative")
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("alarm-zero", "alarm-negative"):
        line = next(line for line in lines if line.startswith(name + " "))
        assert " PASS " in line and "verified" in line and "powered off" in line, line
        trace = tmp_path / "tests" / "threads" / f"{name}.zst"
        assert trace.is_file()                                  # kept, for replay and gdb
        assert (tmp_path / "tests" / "threads" / f"{name}.result").read_text().split()[0] == "PASS"
    assert "2 of 2 tests pass under replayvm; 2 of 2 traces replay verified" in result.stdout


@pytest.mark.skipif(shutil.which("qemu-system-i386") is None, reason="qemu-system-i386 is not installed")
def test_a_verdict_under_replayvm_is_qemus(pintos_dir, tmp_path):
    result = run_harness(tmp_path, "--pintos", str(pintos_dir), "--tests", "priority-change", "--qemu")
    line = next(line for line in result.stdout.splitlines() if line.startswith("priority-change "))
    assert "DIFFERENT VERDICT" not in line and "verified" in line, result.stdout + result.stderr
    assert result.returncode == 0
