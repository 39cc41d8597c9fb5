"""Shared fixtures: where xv6 lives, whether /dev/kvm may be used, and built bundled guests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
DEMO_TRACE_RAM_MIB = 16          # the demo guest needs a few MiB; checkpoints cost per MiB of RAM


def kvm_usable() -> tuple[bool, str]:
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable by this user"
    return True, ""


@pytest.fixture
def require_kvm() -> None:
    """Skip without /dev/kvm on a developer machine; on CI (CI=true) its absence is a failure."""
    ok, why = kvm_usable()
    if not ok:
        if ON_CI:
            pytest.fail(f"CI requires KVM: {why}")
        pytest.skip(why)


def local_build(variable: str, what: str) -> Path:
    """The folder a test's environment variable names (a build of another project, never
    committed); the test is skipped, saying what to point it at, when the variable is unset."""
    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"{variable} is not set (point it at {what})")
    return Path(value)


@pytest.fixture(scope="session")
def xv6_dir() -> Path:
    """A local xv6-public build (xv6.img, fs.img, kernel), never committed: REPLAYVM_XV6_DIR."""
    path = local_build("REPLAYVM_XV6_DIR", "a folder with xv6.img, fs.img, kernel built from "
                                           "github:mit-pdos/xv6-public")
    missing = [n for n in ("xv6.img", "fs.img", "kernel") if not (path / n).is_file()]
    if missing:
        pytest.fail(f"REPLAYVM_XV6_DIR={path} lacks {', '.join(missing)}")
    return path


@pytest.fixture(scope="session")
def pintos_dir() -> Path:
    """A local pintos tree (src/threads built), never committed: REPLAYVM_PINTOS_DIR."""
    path = local_build("REPLAYVM_PINTOS_DIR", "a pintos tree built from a public copy, e.g. "
                                              "github:dillstead/pintos at 52fd7eb; see docs/pintos.md")
    if shutil.which("perl") is None:
        pytest.skip("perl is needed for pintos's checkers")
    return path


@pytest.fixture(scope="session")
def demo_trace(tmp_path_factory) -> Path:
    """A demo-guest session recorded on emu (`echo hello`, `race`), shared by the replay tests.

    Recorded on the virtual clock: guest time is the instruction count, so the session has the
    same length, events and checkpoints on every run and machine (on the wall clock its length
    follows the host's speed, and counts asserted on it failed on slower hosts). At 1 ns per
    instruction the race's ticks are long (about 130 M instructions in all), so the guest gets
    little RAM: every checkpoint the timeline tests take is cheaper then."""
    import io

    from replayvm.record.session import SessionOptions, run_session

    trace = tmp_path_factory.mktemp("demo-trace") / "demo.zst"
    outcome, _ = run_session(SessionOptions(engine="emu", script=b"echo hello\nrace\n", trace=trace,
                                            timeout_s=120, virtual_clock=True, ram_mib=DEMO_TRACE_RAM_MIB),
                             output=io.BytesIO())
    assert outcome.reason == "script-done"
    return trace
