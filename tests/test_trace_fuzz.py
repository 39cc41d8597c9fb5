"""A bounded fuzz of the trace reader and its consumers: seeded mutants (tests/fuzzing.py) through
`info`, `analyze` and `replay`, asserting no traceback, no hang, bounded memory, and no tampered
trace ever verified. Deterministic: fixed seeds, virtual-clock recordings, replays bounded by
position rather than wall time. (Thousands more: bench/fuzz_trace.py.)"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzzing import Tally, mutants, record_echo_trace, run_verbs

ROOT = Path(__file__).resolve().parent.parent
ECHO_MUTANTS = 400
SAMPLE_MUTANTS = 60


@pytest.fixture(scope="module")
def echo_trace(tmp_path_factory) -> Path:
    return record_echo_trace(tmp_path_factory.mktemp("fuzz"))


def replay_bound(trace: Path) -> int:
    """A position no replay of a mutant may reach: 1000 times the recording's length (replay never
    runs past the next recorded event, so a mutant cannot legitimately get there)."""
    from replayvm.trace.summary import summarize

    return 1000 * (summarize(trace)["position_at_end"] + 1000)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10


def test_mutants_of_a_small_trace_never_traceback_hang_or_verify_when_tampered(echo_trace, tmp_path):
    from replayvm.replay.replayer import replay

    assert replay(echo_trace).verified                       # the original is good
    bound = replay_bound(echo_trace)
    tally = Tally()
    before = peak_rss_bytes()
    for n, mutant in enumerate(mutants(echo_trace.read_bytes(), seed=20261202, count=ECHO_MUTANTS)):
        path = tmp_path / f"m{n}.zst"
        path.write_bytes(mutant.data)
        tally.add(mutant, run_verbs(path, tmp_path / f"m{n}.db", bound))
        path.unlink()
    assert tally.tampered >= ECHO_MUTANTS // 8
    assert not tally.tracebacks, tally.tracebacks[:5]
    assert not tally.multiline, tally.multiline[:5]
    assert not tally.hangs, tally.hangs[:5]
    assert not tally.tampered_verified, tally.tampered_verified[:5]
    assert peak_rss_bytes() - before < 512 << 20
    assert set(tally.outcomes["replay"]) - {"verified", "not-verified"}, tally.outcomes  # most are refused


def test_mutants_of_a_format_1_0_sample_never_traceback_in_info_or_analyze(tmp_path):
    """0.1.0's traces (no record digest) through the readers; their replays take seconds each, so
    they are replayed in bench/fuzz_trace.py."""
    sample = ROOT / "traces" / "0.1.0" / "demo-shell.zst"
    tally = Tally()
    for n, mutant in enumerate(mutants(sample.read_bytes(), seed=10, count=SAMPLE_MUTANTS, tamper_share=0)):
        path = tmp_path / f"s{n}.zst"
        path.write_bytes(mutant.data)
        tally.add(mutant, run_verbs(path, tmp_path / f"s{n}.db", None, verbs=("info", "analyze")))
    assert not tally.tracebacks and not tally.multiline, (tally.tracebacks + tally.multiline)[:5]


def test_mutants_through_the_cli_exit_with_one_line_and_no_traceback(echo_trace, tmp_path):
    chosen = mutants(echo_trace.read_bytes(), seed=7, count=4, tamper_share=0.5)
    for n, mutant in enumerate(chosen):
        path = tmp_path / f"c{n}.zst"
        path.write_bytes(mutant.data)
        for args in (["info", str(path)], ["replay", "--quiet", str(path)],
                     ["analyze", str(path), "-o", str(tmp_path / f"c{n}.db")]):
            # The timeout only detects a hang; the verdict never depends on it.
            result = subprocess.run([sys.executable, "-m", "replayvm.cli", *args], capture_output=True,
                                    text=True, timeout=300, stdin=subprocess.DEVNULL, cwd=ROOT)
            assert "Traceback" not in result.stderr, (mutant.name, args, result.stderr)
            assert result.returncode in (0, 1, 2), (mutant.name, args, result)
            if result.returncode:
                assert len(result.stderr.strip().splitlines()) == 1, (mutant.name, args, result.stderr)
            if mutant.tampered and args[0] in ("info", "replay"):
                assert result.returncode != 0 and "verified" not in result.stdout, (mutant.name, args, result)


SWEPT_KEYS = ["engine", "position_unit", "cpuid", "boot", "disks", "command_line", "clock", "chaos_seed",
              "initial_state", "initial_state.cr0", "initial_state.cr4", "initial_state.efer",
              "initial_state.gdt", "initial_state.idt", "initial_state.cs", "initial_state.cs.l",
              "initial_state.cs.db", "initial_state.cs.type", "initial_state.ss.present",
              "initial_state.tr.type", "initial_state.regs"]
SWEPT_VALUES = [0, 1, 7, 0xFFFF, (1 << 32) - 1, (1 << 64) - 1, -1, "x", None, [], {}, [0, 0], {"rax": 1}]


def test_header_fields_a_replay_loads_never_traceback(echo_trace, tmp_path):
    """Without a digest (format 1.0) an edited header is replayed: the engines must refuse an
    impossible initial state in one line. (RIPs pointing away from the code and RFLAGS with TF or
    VM set are swept in the next test.)"""
    bound = replay_bound(echo_trace)
    tally = Tally()
    from tests.fuzzing import Mutant, header_sweep

    for n, (key, value, data) in enumerate(header_sweep(echo_trace.read_bytes(), SWEPT_KEYS, SWEPT_VALUES)):
        path = tmp_path / f"h{n}.zst"
        path.write_bytes(data)
        tally.add(Mutant(f"{key}={value!r}", data), run_verbs(path, tmp_path / f"h{n}.db", bound))
    assert not tally.tracebacks and not tally.multiline and not tally.hangs, \
        (tally.tracebacks + tally.multiline + tally.hangs)[:5]


def test_a_replayed_guest_sent_astray_by_its_header_diverges_instead_of_hanging(echo_trace, tmp_path):
    """A format 1.0 header (no digest) whose initial RIP points away from the code, or whose
    RFLAGS sets TF or VM, makes a guest that never does what the trace says next: the replay
    loop stops at the next recorded event's position and reports a divergence (or the engine
    refuses the state), never running on."""
    bound = replay_bound(echo_trace)
    tally = Tally()
    from tests.fuzzing import Mutant, header_sweep

    sweep = header_sweep(echo_trace.read_bytes(), ["initial_state.regs.rip"], [0, 0xFFFF, 0x7C00 + 1]) + \
        header_sweep(echo_trace.read_bytes(), ["initial_state.regs.rflags"], [0x102, 0x20002, 0x20302])
    outcomes = []
    for n, (key, value, data) in enumerate(sweep):
        path = tmp_path / f"astray{n}.zst"
        path.write_bytes(data)
        result = run_verbs(path, tmp_path / f"astray{n}.db", bound, verbs=("replay",))
        tally.add(Mutant(f"{key}={value!r}", data), result)
        outcomes.append((key, value, result["replay"]))
    assert not tally.tracebacks and not tally.multiline and not tally.hangs, \
        (tally.tracebacks + tally.multiline + tally.hangs)[:5]
    assert all(outcome in ("divergence", "refused") for _, _, outcome in outcomes), outcomes
