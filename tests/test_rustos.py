"""rustos, the bundled Rust teaching kernel (guests/rustos), on both engines: it boots by
multiboot into long mode, takes timer and COM1 interrupts, runs preemptive tasks and a ring-3
task with system calls, reads the IDE disk; its sessions replay verified from the trace alone.
On emu the sessions run on the virtual clock (every count below is the same on every host), are
counted exactly as the reference per-instruction counting counts them, and replay under gdb.

The kernel is built with Debian's Rust packages (rustc-web, cargo-web, rust-web-src): without
them these tests skip on a developer machine and fail on CI, which installs them (.ci/run).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from elftools.elf.elffile import ELFFile

from replayvm.guests import GuestBoot, guest_boot
from replayvm.record.session import SessionOptions, run_session
from replayvm.replay.replayer import replay
from replayvm.trace.summary import summarize
from tests.conftest import ON_CI, kvm_usable
from tests.test_gdb import Stub, gdb, run_gdb  # noqa: F401  (gdb: the fixture)

XORSHIFT_SEED = 0x2545F4914F6CDD1D      # the ring-3 program's starting value (guests/rustos/src/user.rs)
RUSTOS_RAM_MIB = 64
TIMER_VECTOR = 32                       # guests/rustos/src/trap.rs


def xorshift_step(x: int) -> int:
    mask = (1 << 64) - 1
    x ^= (x << 13) & mask
    x ^= x >> 7
    return x ^ ((x << 17) & mask)


def xorshift(steps: int, x: int = XORSHIFT_SEED) -> int:
    """What the ring-3 program computes: `steps` xorshift64 steps. A step is linear over GF(2),
    so `steps` of them are one 64x64 bit matrix (kept as the images of the 64 unit vectors),
    raised to that power by squaring: a billion steps cost a few thousand operations."""
    def apply(images: list[int], v: int) -> int:
        out = 0
        for bit in range(64):
            if v >> bit & 1:
                out ^= images[bit]
        return out

    power = [xorshift_step(1 << bit) for bit in range(64)]
    while steps:
        if steps & 1:
            x = apply(power, x)
        power = [apply(power, image) for image in power]
        steps >>= 1
    return x


def test_xorshift_by_matrix_powers_is_the_step_repeated():
    x = XORSHIFT_SEED
    for _ in range(1000):
        x = xorshift_step(x)
    assert xorshift(1000) == x and xorshift(0) == XORSHIFT_SEED


@pytest.fixture(scope="session")
def rustos() -> GuestBoot:
    """rustos built (once per cache); no Rust toolchain: skipped here, a failure on CI."""
    from replayvm.errors import ReplayVMError

    try:
        return guest_boot("rustos")
    except ReplayVMError as error:
        if "apt-get install" in str(error) and not ON_CI:
            pytest.skip(str(error))
        raise


ENGINES = ("kvm", "emu")
# The ring-3 program's long run: on kvm 200 rounds of a million steps (~2 s of guest time); on emu,
# on the virtual clock (1 ns per instruction, a tick every 10 M instructions), 20 rounds (~220 M
# instructions, ~22 ticks) keep the test short.
CPU_BOUND_ROUNDS = {"kvm": 200, "emu": 20}
EMU_SESSION = {"virtual_clock": True}        # host timing never decides an emu verdict here


def require_engine(engine: str) -> None:
    """kvm needs /dev/kvm (a failure on CI without it); emu runs everywhere."""
    if engine == "kvm":
        ok, why = kvm_usable()
        if not ok:
            if ON_CI:
                pytest.fail(f"CI requires KVM: {why}")
            pytest.skip(why)


def rustos_session(boot: GuestBoot, script: bytes, trace=None, engine: str = "kvm", **kwargs):
    out = io.BytesIO()
    if engine == "emu":
        kwargs = {**EMU_SESSION, **kwargs}
    outcome, machine = run_session(SessionOptions(
        engine=engine, kernel=boot.kernel, disks=list(boot.disks), script=script, trace=trace,
        ram_mib=RUSTOS_RAM_MIB, timeout_s=120, **kwargs), output=out)
    return outcome, out.getvalue().decode(errors="replace").replace("\r\n", "\n"), machine


def test_rustos_is_a_64bit_multiboot_kernel_with_symbols(rustos):
    assert rustos.long_mode and rustos.symbols == rustos.kernel
    with rustos.kernel.open("rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == 64 and elf.get_machine_arch() == "x64"
        names = {s.name for s in elf.get_section_by_name(".symtab").iter_symbols()}
    assert {"_start32", "kernel_main", "trap", "trap_stub_6", "switch_stacks"} <= names
    assert {"rustos::race_step", "rustos::ide::read_sector", "rustos::task::schedule"} <= names  # readable
    # Soft-float: PVM cannot emulate SSE in kernel code, so no xmm register may appear.
    code = subprocess.run(["objdump", "-d", str(rustos.kernel)], capture_output=True, text=True).stdout
    assert "%xmm" not in code
    assert rustos.disks[0].read_bytes()[512:545] == b"hello from the IDE disk, sector 1"


def test_missing_rust_toolchain_is_one_line_naming_the_packages(tmp_path):
    env = dict(os.environ, REPLAYVM_RUSTC=str(tmp_path / "no-rustc"), REPLAYVM_CACHE=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "replayvm.cli", "record", "--guest", "rustos"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "apt-get install rustc-web cargo-web rust-web-src" in result.stderr


def test_guest_selection_refuses_unknown_guests_and_disks(tmp_path):
    for args, message in ((["--guest", "nosuch"], "no bundled guest named 'nosuch'"),
                          (["--guest", "kvmtests"], "no bundled guest named 'kvmtests'"),
                          (["--guest", "demo", "--disk", "x.img"], "without --disk and --kernel")):
        result = subprocess.run([sys.executable, "-m", "replayvm.cli", "record", *args],
                                capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, result.stderr


class Recorded(NamedTuple):
    engine: str
    outcome: object
    text: str
    machine: object
    trace: Path
    delivered: list[tuple[int, bool, int]]   # emu: (vector, raised by `int`, CPL before it)


def watch_deliveries(stack: contextlib.ExitStack) -> list[tuple[int, bool, int]]:
    """Every vector the emu engine delivers, as it delivers it (observed, not replaced): which
    vector, whether an `int` instruction raised it, and the ring it interrupted."""
    from replayvm.engines import x86_delivery

    delivered: list[tuple[int, bool, int]] = []
    deliver = x86_delivery.deliver_with_escalation

    def observed(cpu, vector: int, *, software: bool, error_code, return_eip: int) -> None:
        delivered.append((vector, software, cpu.reg("cs") & 3))
        deliver(cpu, vector, software=software, error_code=error_code, return_eip=return_eip)

    stack.enter_context(pytest.MonkeyPatch.context()).setattr(
        x86_delivery, "deliver_with_escalation", observed)
    return delivered


@pytest.fixture(scope="module", params=ENGINES)
def recorded(request, rustos, tmp_path_factory) -> Recorded:
    """One session of every feature per engine: typed commands (COM1 input through the IOAPIC),
    the disk, the ring-3 program computing (CPU_BOUND_ROUNDS rounds of a million steps: many
    timer ticks), the race, the task list."""
    engine = request.param
    require_engine(engine)
    trace = tmp_path_factory.mktemp(f"rustos-{engine}") / "rustos.zst"
    script = f"help\ndisk\nuser 3 1000\nuser {CPU_BOUND_ROUNDS[engine]} 1000000\nrace\ntasks\nticks\n"
    with contextlib.ExitStack() as stack:
        delivered = watch_deliveries(stack) if engine == "emu" else []
        outcome, text, machine = rustos_session(rustos, script.encode(), trace=trace, engine=engine)
    return Recorded(engine, outcome, text, machine, trace, delivered)


def test_rustos_boots_into_long_mode_and_runs_its_shell(recorded):
    text, machine = recorded.text, recorded.machine
    assert recorded.outcome.reason == "script-done", text
    assert "rustos: long mode, 64-bit" in text
    assert "$ help\ncommands: echo TEXT" in text                      # typed bytes echoed: COM1 RX
    assert "disk: sector 1: hello from the IDE disk, sector 1" in text   # IDE PIO
    assert re.search(r"race: counter=\d+ expected=\d+\nrace: (ok|LOST UPDATES)", text)
    assert re.search(r"task 0: shell \(preempted \d+ times\)", text)
    ticks = int(re.search(r"ticks: (\d+)", text).group(1))
    assert ticks > 0 and machine.lapic.timer_interrupts_raised >= ticks
    assert machine.x86_64                           # emu: a UC_MODE_64 vCPU for the ELF64 kernel


def test_ring3_task_computes_and_makes_system_calls(recorded):
    """`int 0x80` from ring 3: a #UD on PVM, taken as the system call by the kernel; on emu the
    instruction itself goes through the IDT's DPL-3 gate, and no #UD is ever raised."""
    text = recorded.text
    assert text.count("user: hello from ring 3") == 2                  # SYS_WRITE
    # SYS_PROGRESS each round and SYS_EXIT with the value: the task ran in its own address space.
    assert f"exits with {xorshift(3 * 1000):#018x} after 3 rounds" in text
    rounds = CPU_BOUND_ROUNDS[recorded.engine]
    assert f"exits with {xorshift(rounds * 1_000_000):#018x} after {rounds} rounds" in text
    if recorded.engine == "emu":
        system_calls = (1 + 3 + 1) + (1 + rounds + 1)      # write, a progress per round, exit
        assert recorded.delivered.count((0x80, True, 3)) == system_calls
        assert not [d for d in recorded.delivered if d[0] == 6]            # no #UD
        assert not [d for d in recorded.delivered if d[0] == 0x80 and d[2] != 3]


def test_cpu_bound_ring3_task_is_preempted_by_the_timer_many_times(recorded):
    """PVM gives no debug exits in native ring-3 code: the kvm engine places each tick that
    arrives while the task computes at the task's next entry into the kernel (its next system
    call), where replay can find it. The task is preempted there, many times. The emu engine
    stops ring-3 code at any instruction: the ticks interrupt the computation itself."""
    text, machine = recorded.text, recorded.machine
    rounds = CPU_BOUND_ROUNDS[recorded.engine]
    found = re.search(rf"after {rounds} rounds, preempted (\d+) times \((\d+) in ring 3\)", text)
    preempted, in_ring3 = int(found.group(1)), int(found.group(2))
    assert preempted >= 5, text
    if recorded.engine == "kvm":
        assert machine.engine.deferred_interrupts() >= 5          # ticks that came while ring 3 ran
    else:
        assert in_ring3 >= 5, text
        assert recorded.delivered.count((TIMER_VECTOR, False, 3)) >= in_ring3
    summary = summarize(recorded.trace)
    assert summary["interrupts_by_source"]["timer"] >= preempted and summary["interrupts_by_source"]["com1"] > 0


def test_rustos_session_replays_verified_from_the_trace_alone(recorded, tmp_path):
    moved = tmp_path / "moved.zst"                      # no disk image, no kernel: the trace only
    moved.write_bytes(recorded.trace.read_bytes())
    out = io.BytesIO()
    result = replay(moved, output=out)
    assert result.verified and not result.mismatches
    assert out.getvalue().decode(errors="replace").replace("\r\n", "\n") == recorded.text


# On the command line: kvm is what `auto` picks here (PVM runs long mode); emu is asked for.
ENGINE_ARGS = {"kvm": [], "emu": ["--engine", "emu"]}


@pytest.mark.parametrize("engine", ENGINES)
def test_record_guest_rustos_info_replay_and_analyze_on_the_command_line(rustos, engine, tmp_path):
    require_engine(engine)
    trace, db = tmp_path / "t.zst", tmp_path / "t.db"

    def cli(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "replayvm.cli", *args], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout + result.stderr

    text = cli("record", "--guest", "rustos", *ENGINE_ARGS[engine], "--mem", str(RUSTOS_RAM_MIB),
               "--input", "disk\n", "-o", str(trace))
    if engine == "kvm":
        assert "engine kvm: KVM runs 64-bit long-mode guests here" in text
    assert "disk: sector 1: hello from the IDE disk" in text
    info = cli("info", str(trace))
    assert "boot from multiboot" in info and f"engine {engine}," in info
    assert "replay verified" in cli("replay", str(trace), "--quiet")
    elf = cli("guest", "rustos").strip()
    assert elf == str(rustos.kernel)
    cli("analyze", str(trace), "--symbols", elf, "-o", str(db))
    rows = cli("sql", str(db), "SELECT function FROM exits_per_function")
    assert "rustos::ide::read_sector" in rows and "trap" in rows


def test_ci_installs_the_rust_toolchain():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "apt-get install -y -qq rustc-web cargo-web rust-web-src" in ci


# emu on the virtual clock from seed 1: the same runs on every host.
CHAOS_ARGS = {"kvm": [], "emu": ["--engine", "emu", "--virtual-clock", "--seed", "1"]}


@pytest.mark.parametrize("engine", ENGINES)
def test_chaos_catches_the_race_and_replay_gives_the_same_wrong_counter(rustos, engine, tmp_path):
    require_engine(engine)
    trace = tmp_path / "race.zst"
    result = subprocess.run([sys.executable, "-m", "replayvm.cli", "record", "--guest", "rustos",
                             *CHAOS_ARGS[engine], "--mem", str(RUSTOS_RAM_MIB), "--chaos", "--repeat", "5",
                             "--until-fail", "LOST UPDATES", "--input", "race\n", "-o", str(trace)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    recorded = re.search(r"race: counter=(\d+) expected=(\d+)", result.stdout)
    assert recorded and int(recorded.group(1)) < int(recorded.group(2))
    out = io.BytesIO()
    assert replay(trace, output=out).verified
    replayed = re.search(r"race: counter=(\d+)", out.getvalue().decode(errors="replace"))
    assert replayed.group(1) == recorded.group(1)


@pytest.mark.parametrize("recorded", ["kvm"], indirect=True)
def test_kvm_places_interrupts_only_where_replay_can_find_them(recorded):
    """Every interrupt placed between exits has a landmark in kernel code (not in native ring-3
    code, where PVM gives no breakpoints) at an instruction's start (RF clear: not halfway
    through a `rep`, where a breakpoint cannot stop)."""
    from replayvm.trace.format import Kind
    from replayvm.trace.reader import TraceReader
    from replayvm.trace.records import INTERRUPT

    user_base = 0x80_0000_0000                          # guests/rustos/src/memory.rs USER_BASE
    landmarks = []
    with TraceReader(recorded.trace) as reader:
        for record in reader:
            if record[0] == Kind.INTERRUPT and INTERRUPT.get(record, "landmark") is not None:
                landmarks.append(INTERRUPT.get(record, "landmark"))
    assert len(landmarks) >= 5
    assert all(lm["rip"] < user_base and not lm["rflags"] & (1 << 16) for lm in landmarks), landmarks


def test_emu_counts_rustos_exactly_as_the_reference_counts(rustos, monkeypatch, tmp_path):
    """The fast engine (its own 4-level walk, counting per translated block) and the reference
    (QEMU's walk, a hook per instruction) give the same trace event for event -- every
    interrupt at the same instruction, in ring-3 code too -- and the same final state; each
    trace replays verified under the other."""
    from tests.test_emu_exactness import check_same_sessions

    events = check_same_sessions(monkeypatch, tmp_path, b"help\ndisk\nuser 3 1000\nuser 5 1000000\nrace\n",
                                 kernel=rustos.kernel, disks=list(rustos.disks), ram_mib=RUSTOS_RAM_MIB)
    assert len(events) > 500


def test_emu_counts_rustos_under_chaos_exactly_as_the_reference_counts(rustos, monkeypatch, tmp_path):
    """Chaos stalls make ticks land every few thousand instructions: in the ring-3 loop, in the
    race's window, inside the kernel's handlers."""
    from replayvm.trace.format import Kind
    from tests.test_emu_exactness import check_same_sessions

    events = check_same_sessions(monkeypatch, tmp_path, b"user 3 1000000\nrace\n", chaos_seed=5,
                                 kernel=rustos.kernel, disks=list(rustos.disks), ram_mib=RUSTOS_RAM_MIB)
    assert sum(1 for event in events if event[0] == Kind.INTERRUPT) > 1000


RACE_SEEDS = range(1, 11)
LOST = re.compile(r"race: counter=(\d+) expected=(\d+)\nrace: LOST UPDATES")
RACE = re.compile(r"race: counter=(\d+) expected=(\d+)\nrace: (?:ok|LOST UPDATES)")


def test_chaos_on_emu_makes_the_race_lose_updates_more_often_and_replays_the_wrong_counter(
        rustos, tmp_path, capsys):
    """On the virtual clock a session is a pure function of its script and seed, so these counts
    are the same on every host. Without chaos, sessions of the same script are identical: the
    plain side runs its races one after the other in one session instead, each starting at
    another phase of the timer. With chaos, one race per seed."""
    outcome, plain, _ = rustos_session(rustos, b"race\n" * len(RACE_SEEDS), engine="emu")
    assert outcome.reason == "script-done", plain
    plain_races = RACE.findall(plain)
    plain_lost = sum(1 for counter, expected in plain_races if int(counter) < int(expected))
    assert len(plain_races) == len(RACE_SEEDS)
    chaotic_lost, failing = 0, []
    for seed in RACE_SEEDS:
        trace = tmp_path / f"chaos-{seed}.zst"
        outcome, text, _ = rustos_session(rustos, b"race\n", trace=trace, engine="emu", chaos_seed=seed)
        assert outcome.reason == "script-done", text
        if LOST.search(text):
            chaotic_lost += 1
            failing.append((trace, LOST.findall(text)))
    with capsys.disabled():
        print(f"\nrustos on emu, virtual clock: the race lost updates in {chaotic_lost} of "
              f"{len(RACE_SEEDS)} chaos sessions (seeds {RACE_SEEDS.start}-{RACE_SEEDS.stop - 1}), "
              f"in {plain_lost} of {len(plain_races)} races without chaos")
    assert chaotic_lost >= len(RACE_SEEDS) - 1 and chaotic_lost > plain_lost
    for trace, wrong in failing[:3]:                  # replays are exact: the same wrong counters
        out = io.BytesIO()
        result = replay(trace, output=out)
        assert result.verified and LOST.findall(out.getvalue().decode(errors="replace").replace("\r\n", "\n")) == wrong


# The TrapFrame (guests/rustos/src/trap.rs) that `trap` gets in RDI: 15 registers, then these.
FRAME_VECTOR, FRAME_RIP, FRAME_CS = 15 * 8, 17 * 8, 18 * 8
USER_BASE = 0x80_0000_0000                              # guests/rustos/src/memory.rs


def test_gdb_on_an_emu_replay_of_rustos(rustos, gdb, tmp_path):
    """gdb with the amd64 description on an emu replay of rustos: a breakpoint at a Rust function
    by its path, 64-bit registers, stepi and reverse-stepi back to identical registers, the
    backtrace into the shell; the timer handler (`trap` for vector 32, a condition gdb evaluates
    on the frame); and a breakpoint in the ring-3 program, in its own address space."""
    from tests.test_long_mode import amd64_registers

    trace = tmp_path / "rustos.zst"
    outcome, _, _ = rustos_session(rustos, b"disk\nuser 2 1000\n", trace=trace, engine="emu")
    assert outcome.reason == "script-done"
    stub = Stub(trace)
    out = run_gdb(gdb, rustos.kernel, stub.address, [
        "show architecture", "break rustos::ide::read_sector", "continue",
        "echo BEFORE\\n", "info registers",
        "stepi", "echo STEPPED\\n", "info registers",
        "reverse-stepi", "echo BACK\\n", "info registers", "bt 2",
        "delete", f"break trap if *(long *)($rdi + {FRAME_VECTOR}) == {TIMER_VECTOR}", "continue",
        "echo TICK\\n", f"print/x *(long *)($rdi + {FRAME_CS})", "monitor when",
        "delete", f"break *{USER_BASE:#x}", "continue",
        "echo RING3\\n", "info registers",
        "stepi", "reverse-stepi", "echo RING3BACK\\n", "info registers",
    ])
    stub.finish()
    assert 'currently "i386:x86-64"' in out, out
    assert "Breakpoint 1, 0x" in out and "in rustos::ide::read_sector ()" in out, out
    before, stepped, back = (amd64_registers(out, m) for m in ("BEFORE", "STEPPED", "BACK"))
    assert re.search(r"^r15\s+0x", before, re.M), before
    assert re.search(r"^rip\s+0x[0-9a-f]+\s+0x[0-9a-f]+ <rustos::ide::read_sector>", before, re.M), before
    assert re.search(r"^cs\s+0x8\b", before, re.M) and re.search(r"^efer\s+0x500\b", before, re.M)
    assert stepped != before and back == before            # identical registers after reverse-stepi
    assert re.search(r"^#1\s+0x[0-9a-f]+ in rustos::shell \(\)", out, re.M), out
    tick = out.split("TICK\n", 1)[1]
    assert re.match(r"\$\d+ = 0x(8|23)\n", tick), tick     # the timer interrupted ring 0 or ring 3
    assert re.search(r"instruction \d+ of \d+, after event \d+", tick)
    ring3, ring3_back = amd64_registers(out, "RING3"), amd64_registers(out, "RING3BACK")
    assert re.search(rf"^rip\s+{USER_BASE:#x}\b", ring3, re.M) and re.search(r"^cs\s+0x23\b", ring3, re.M)
    assert re.search(r"^rsp\s+0x80000\w{5}\b", ring3, re.M), ring3      # the user stack, 64-bit
    assert ring3_back == ring3


def test_bench_rustos_prints_figures_for_the_engines_asked(rustos, tmp_path):
    """bench/bench_rustos.py end to end in a tiny run on emu: the figures are there (never
    compared with anything: they are the host's)."""
    script = Path(__file__).resolve().parent.parent / "bench" / "bench_rustos.py"
    result = subprocess.run([sys.executable, str(script), "--engines", "emu", "--rounds", "2",
                             "--iterations", "1000", "--runs", "1"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "rustos on emu, median of 1" in result.stdout and "rustos on kvm" not in result.stdout
    assert re.search(r"boot to the prompt\s+\d+\.\d+ s", result.stdout)
    assert re.search(r"all instructions counted\s+[\d,]+: [\d,]+ MIPS recording", result.stdout)


@pytest.mark.parametrize("recorded", ["emu"], indirect=True)
def test_replay_until_prints_a_long_mode_cpu_with_all_sixteen_registers(recorded):
    """`replay --until` in the ring-3 program (the emu session is on the virtual clock: the same
    instruction is there on every host): r8-r15 and EFER too, 64-bit values whole."""
    result = subprocess.run([sys.executable, "-m", "replayvm.cli", "replay", str(recorded.trace),
                             "--until", "i100,000,000", "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    state = result.stdout + result.stderr
    assert re.search(r"rip=0x80000000\w\w ", state) and "cs=0x0023" in state, state   # ring 3
    assert re.search(r"r12=0x\w+ r13=0x\w+ r14=0x\w+ r15=0x0*f4240\b", state), state   # ITERATIONS
    assert "efer=0x500" in state
