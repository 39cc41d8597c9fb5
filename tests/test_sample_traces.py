"""Traces recorded by earlier releases keep replaying: every sample under traces/ verifies."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from replayvm.replay.replayer import replay
from replayvm.trace import TraceReader
from tests.conftest import ON_CI, kvm_usable

TRACES = Path(__file__).resolve().parent.parent / "traces"

# What each sample's replayed console must show (traces/README.md says how each was recorded).
EXPECTED_CONSOLE = {
    "demo-shell.zst": b"hello",
    "demo-race.zst": b"race: ok",
    "demo-chaos-race.zst": b"race: LOST UPDATES",
}
SINCE = {"demo-branch.zst": ((0, 3, 0), b"branch"),      # kinds of sample later releases added
         "demo-smp-race.zst": ((0, 6, 0), b"(2 CPUs)"),           # format 3.0, feature smp
         "biosboot.zst": ((0, 6, 0), b"biosboot: done"),           # feature pc
         "long64.zst": ((0, 6, 0), b"long64: back in ring 0"),      # feature x86-64
         "rustos.zst": ((0, 6, 0), b"user: hello from ring 3"),     # feature x86-64
         "smp64-kvm.zst": ((0, 7, 0), b"locked counter 80")}       # features smp, kvm-smp: replays on kvm


def sample_traces() -> list[Path]:
    return sorted(TRACES.glob("*/*.zst"))


def test_every_release_folder_has_a_sample_of_each_kind() -> None:
    releases = {path.parent.name for path in sample_traces()}
    assert {"0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0"} <= releases
    for release in releases:
        names = {path.name for path in (TRACES / release).glob("*.zst")}
        version = tuple(int(part) for part in release.split("."))
        expected = set(EXPECTED_CONSOLE) | {name for name, (since, _) in SINCE.items() if version >= since}
        assert expected <= names, release


@pytest.mark.parametrize("trace", sample_traces(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_sample_trace_replays_verified(trace: Path) -> None:
    with TraceReader(trace) as reader:                 # the folder names the release that wrote it
        assert reader.header["replayvm"] == trace.parent.name
        engine = reader.header["engine"]
    if engine == "kvm":                                # a kvm trace replays on kvm (exit positions)
        usable, why = kvm_usable()
        if not usable:
            if ON_CI:
                pytest.fail(f"CI requires KVM: {why}")
            pytest.skip(f"{trace.name} was recorded on kvm: {why}")
    result = replay(trace, output=io.BytesIO())
    assert result.verified and not result.truncated and not result.mismatches
    expected = EXPECTED_CONSOLE.get(trace.name) or SINCE[trace.name][1]
    assert expected in result.console


def test_info_names_the_machine_kind_and_a_64_bit_cpu() -> None:
    from replayvm.trace.summary import format_summary, summarize

    folder = TRACES / "0.6.0"
    lines = {name: format_summary(summarize(folder / name)).splitlines()[1]
             for name in ("biosboot.zst", "long64.zst", "demo-shell.zst")}
    assert lines["biosboot.zst"].startswith("machine      pc (plain PC with a BIOS), engine emu")
    assert lines["long64.zst"].startswith("machine      mp (MP-table PC), x86-64 CPU, engine emu")
    assert lines["demo-shell.zst"].startswith("machine      mp (MP-table PC), engine emu")
