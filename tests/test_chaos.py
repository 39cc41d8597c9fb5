"""Chaos recording: the demo race fails clearly more often, and every failing run replays exactly."""

from __future__ import annotations

import io
import os
import re

from replayvm import hw
from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import replay
from tests.small_guests import SHUTDOWN, boot_disk

SEEDS = range(1000, 1010)
LOST = re.compile(rb"race: counter=(\d+) expected=(\d+)\nrace: LOST UPDATES")


def race_once(chaos_seed: int | None, trace=None, virtual_clock: bool = True):
    out = io.BytesIO()
    outcome, machine = run_session(SessionOptions(engine="emu", script=b"race\n", chaos_seed=chaos_seed,
                                                  trace=trace, timeout_s=60, virtual_clock=virtual_clock),
                                   output=out)
    assert outcome.reason == "script-done"
    return out.getvalue(), machine


def test_chaos_makes_the_race_fail_and_failures_replay(tmp_path, capsys):
    # On the virtual clock every run is a pure function of its seed, so these counts are the same
    # on every machine: no statistics, no bound to state. Each run has two races, the boot race
    # and the typed `race`; only the typed one is counted.
    plain, _ = race_once(None)
    assert not LOST.search(plain.split(b"$ race")[1])          # without chaos the race holds
    chaotic, failing = 0, []
    for seed in SEEDS:
        trace = tmp_path / f"chaos-{seed}.zst"
        text, _ = race_once(seed, trace)
        if LOST.search(text.split(b"$ race")[1]):
            chaotic += 1
            failing.append((trace, LOST.findall(text)))
    with capsys.disabled():
        print(f"\nrace lost updates with --chaos: {chaotic} of {len(SEEDS)} seeds (none without)")
    assert chaotic >= len(SEEDS) - 1, chaotic
    for trace, wrong in failing[:3]:                  # replays are exact: the same wrong counters
        result = replay(trace)
        assert result.verified and LOST.findall(result.console) == wrong


def timer_ticks_and_expected(trace, machine) -> tuple[int, float]:
    """(timer interrupts the guest took, ticks its programmed periodic timer owed it since it was
    started), from the trace's footer and the LAPIC's programming."""
    from replayvm.devices.lapic import divisor_of
    from replayvm.trace import TraceReader
    from replayvm import hw

    with TraceReader(trace) as reader:
        for _ in reader:
            pass
        footer = reader.footer
    timer = machine.lapic.state()
    period_ns = timer.ticr * divisor_of(timer.tdcr) * 1e9 / hw.LAPIC_BUS_HZ
    return footer["interrupt_sources"]["timer"], (footer["guest_ns"] - timer.timer_start_ns) / period_ns


def test_chaos_keeps_guest_time_honest_ticks_per_guest_second_are_the_programmed_rate(tmp_path):
    # Chaos brings ticks forward in the guest's work, never adds one: the guest takes exactly the
    # ticks its timer owes it for the guest time that passed (a tick may still be pending at the
    # end, or not yet due), with chaos as without. Earlier, chaos added ~60 ticks per period.
    for seed in (None, 1000, 1001):
        trace = tmp_path / f"ticks-{seed}.zst"
        text, machine = race_once(seed, trace)
        ticks, owed = timer_ticks_and_expected(trace, machine)
        assert owed > 10, owed
        assert owed - 2 <= ticks <= owed + 1, (seed, ticks, owed)
        if seed is not None:
            assert machine.chaos.stalls > 100        # and chaos did bring many of them forward


def test_chaos_keeps_xv6_s_ticks_at_the_programmed_rate(xv6_dir, tmp_path):
    # xv6 counts ticks for uptime() and sleep(): under the old chaos its uptime ran ~60 times
    # too fast. Now the ticks it takes are the ticks its timer owes it over the guest time that
    # passed, to within the few that merge while it boots with interrupts off (6 of 10 without
    # chaos), out of some 19,000.
    trace = tmp_path / "xv6.zst"
    out = io.BytesIO()
    outcome, machine = run_session(SessionOptions(engine="emu", disks=[xv6_dir / "xv6.img", xv6_dir / "fs.img"],
                                                  script=b"echo hi\n", chaos_seed=5, trace=trace,
                                                  timeout_s=120, virtual_clock=True), output=out)
    assert outcome.reason == "script-done" and b"\nhi\n" in out.getvalue()
    ticks, owed = timer_ticks_and_expected(trace, machine)
    assert owed > 1000 and owed - 12 <= ticks <= owed + 1, (ticks, owed)


def test_chaos_time_is_consistent_for_the_guest_s_own_clocks(tmp_path):
    # The demo's `ticks` (its tick count) and `date` (the CMOS RTC) agree under chaos: the RTC
    # moved as many seconds as ticks / 100 say, to within the RTC's one-second resolution.
    out = io.BytesIO()
    outcome, _ = run_session(SessionOptions(engine="emu", script=b"date\nticks\nrace\nrace\ndate\nticks\n",
                                            chaos_seed=1002, timeout_s=60, virtual_clock=True), output=out)
    assert outcome.reason == "script-done"
    text = out.getvalue().decode()
    dates = re.findall(r"date: \d{4}-\d\d-\d\d (\d\d):(\d\d):(\d\d)", text)
    ticks = [int(t) for t in re.findall(r"ticks: (\d+)", text)]
    assert len(dates) >= 2 and len(ticks) == 2, text
    seconds = [int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in dates[-2:]]
    elapsed_by_ticks = (ticks[1] - ticks[0]) / 100
    assert elapsed_by_ticks > 2, text                # the two races took seconds of guest time
    assert abs((seconds[1] - seconds[0]) - elapsed_by_ticks) <= 1.5, (dates, ticks)


def test_cli_repeats_chaos_runs_until_the_bug_shows_and_keeps_that_trace(tmp_path):
    import subprocess
    import sys

    from replayvm.trace import TraceReader

    trace = tmp_path / "bug.zst"
    result = subprocess.run([sys.executable, "-m", "replayvm.cli", "record", "--engine", "emu", "--chaos",
                             "--virtual-clock", "--seed", "5", "--repeat", "20", "--until-fail",
                             "LOST UPDATES", "--input", r"race\n", "-o", str(trace)],
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    matched = re.search(r"run (\d+) of 20 matched", result.stderr)
    assert f"run {matched.group(1)} of 20 (chaos seed {4 + int(matched.group(1))}): script-done, matched" \
        in result.stderr
    assert matched and "LOST UPDATES" in result.stdout
    with TraceReader(trace) as reader:
        assert reader.header["chaos_seed"] == 5 + int(matched.group(1)) - 1
    umask = os.umask(0)
    os.umask(umask)
    assert trace.stat().st_mode & 0o777 == 0o666 & ~umask     # like any trace, not a private temp file
    result = replay(trace)
    assert result.verified and LOST.search(result.console)


def device_waits(trace) -> tuple[int, int]:
    """(IDE status reads that found the disk busy, UART LSR reads that found THR full)."""
    from replayvm import hw
    from replayvm.trace import Kind, TraceReader

    busy = full = 0
    with TraceReader(trace) as reader:
        for record in reader:
            if record[0] == Kind.PIO_READ:
                port, value = record[2], record[4]
                if port == hw.IDE0_CMD_PORT + 7 and value & 0x80:
                    busy += 1
                elif port == hw.COM1_PORT + 5 and not value & 0x20:
                    full += 1
    return busy, full


def test_chaos_gives_disk_and_serial_completion_latency_that_replays(tmp_path):
    plain, chaotic = tmp_path / "plain.zst", tmp_path / "chaos.zst"
    for trace, seed in ((plain, None), (chaotic, 7)):
        out = io.BytesIO()
        outcome, _ = run_session(SessionOptions(engine="emu", script=b"disk\necho hi\n", chaos_seed=seed,
                                                trace=trace, timeout_s=60, virtual_clock=True), output=out)
        assert outcome.reason == "script-done" and b"disk: ok" in out.getvalue()
    assert device_waits(plain) == (0, 0)                 # default devices complete at once
    busy, full = device_waits(chaotic)
    assert busy > 0 and full > 0, (busy, full)           # the guest waited for both devices
    assert replay(chaotic).verified


def test_a_chaos_run_given_no_seed_draws_one_short_enough_to_type_back():
    from replayvm.chaos import SEED_BITS, new_seed

    seeds = {new_seed() for _ in range(64)}
    assert all(0 <= seed < 1 << SEED_BITS for seed in seeds)
    assert len(seeds) > 1          # 64 draws of 32 bits all equal: probability 2**-2016


# A plain-PC boot sector (`--machine pc`, as pintos runs) that ticks with the 8254 alone: IRQ0 at
# 100 Hz through the 8259, a busy loop of 2 M instructions with interrupts on, then the ticks it
# counted, and the debug exit. On the virtual clock (an instruction a ns) the loop is 2 ms of guest
# time: no tick of a 10 ms period falls inside it, unless chaos brings ticks forward.
PIT_TICKS_WHILE_BUSY = f"""
    cli
    xorw    %ax, %ax
    movw    %ax, %ds
    movw    %ax, %ss
    movw    $0x7000, %sp
    movw    $tick, 0x08*4           # IRQ0 at the BIOS's vector 8
    movw    $0, 0x08*4+2
    movb    $0xFE, %al              # only IRQ0
    outb    %al, $0x21
    movb    $0x34, %al              # channel 0, mode 2, 11932 counts (100 Hz)
    outb    %al, $0x43
    movw    $11932, %ax
    outb    %al, $0x40
    movb    %ah, %al
    outb    %al, $0x40
    sti
    movl    $1000000, %ecx
1:  decl    %ecx
    jnz     1b
    cli
    movw    ticks, %ax
    movb    $'0', %bl
    addb    %al, %bl                # the tick count as one character (at most 9 expected, or ':'...)
    cmpw    $9, %ax
    jbe     2f
    movb    $'+', %bl               # ten or more
2:  movb    %bl, %al
    outb    %al, ${hw.DEBUG_CON_PORT:#x}
    {SHUTDOWN}
tick:
    incw    %cs:ticks
    pushw   %ax
    movb    $0x20, %al              # EOI
    outb    %al, $0x20
    popw    %ax
    iret
ticks: .word 0
"""


def test_chaos_brings_the_8254s_ticks_forward_on_the_plain_pc(tmp_path):
    # Pintos ticks with the 8254, never with its local APIC's timer: chaos stalls aim at whichever
    # timer's tick is due first. On the virtual clock each run is a function of its seed.
    disk = boot_disk(tmp_path, PIT_TICKS_WHILE_BUSY)
    shown = {}
    for seed in (None, 1, 2):
        trace = tmp_path / f"pit-{seed}.zst"
        out = io.BytesIO()
        outcome, machine = run_session(SessionOptions(engine="emu", disks=[disk], machine="pc", ram_mib=4,
                                                      trace=trace, timeout_s=10, virtual_clock=True,
                                                      chaos_seed=seed), output=out)
        assert outcome.reason == "shutdown", outcome
        shown[seed] = out.getvalue()
        if seed is not None:
            assert machine.chaos.stalls >= 10, machine.chaos.stalls
            replayed = io.BytesIO()
            result = replay(trace, output=replayed)
            assert result.verified and replayed.getvalue() == shown[seed], result.mismatches
    assert shown[None] == b"0"                       # without chaos the busy loop sees no tick
    assert shown[1] == shown[2] == b"+", shown      # with it, ten or more each time
