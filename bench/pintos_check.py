"""Run pintos's own tests under replayvm, judged by pintos's own checkers, and keep every trace.

    REPLAYVM_PINTOS_DIR=/path/to/pintos python bench/pintos_check.py                # threads
    python bench/pintos_check.py --pintos /path/to/pintos --tests alarm-multiple,priority-change
    python bench/pintos_check.py --project userprog --tests 'args-*' --qemu --markdown

replayvm never ships pintos: point this at a pintos tree you built (the folder holding `src/`,
or `src` itself; see docs/pintos.md for the two flags gcc 12 needs in userprog). For each test of
the project, what `make check` would run is taken from pintos's own Makefiles (`make -n check`):
the kernel options, the files put on the disk, the timeout. The disk is made by pintos's own
`pintos` script (`--make-disk`, with a do-nothing simulator first in PATH, since the script always
starts one), and the test runs under `replayvm record --machine pc` with the test's timeout (guest
seconds). The console output goes to pintos's `.ck` checker (perl), exactly as `make check` feeds
it; then the trace is replayed (`replayvm replay`), which must say "replay verified". With
`--qemu` the same test also runs under QEMU through the pintos script, for the second column.

Everything lands in --out (default ./pintos-results/<project>): tests/<project>/<test>.zst (the
trace: `replayvm replay` it, or debug it with `--gdb`), .output, .result, .dsk. Prints one line per
test and a summary; exit status 0 when every trace replayed verified (and, with --qemu, every
verdict agreed with QEMU's).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PINTOS_DIR_VARIABLE = "REPLAYVM_PINTOS_DIR"
RAM_MIB = 4                      # what the pintos script gives QEMU (-m 4)
REPLAY_TIMEOUT_S = 3600          # only catches a replay that hangs: replays end on their own


@dataclass
class PintosTest:
    """One test as `make check` would run it."""
    name: str                    # tests/threads/alarm-multiple
    options: list[str]           # the pintos script's options before `--` (disk contents)
    kernel_args: list[str]       # after `--`: the kernel's command line
    timeout_s: int


@dataclass
class Outcome:
    test: str
    verdict: str = "-"           # PASS / FAIL from the .ck checker
    record_s: float = 0.0
    end: str = ""                # how replayvm's run ended (its last stderr line)
    verified: bool | None = None
    replay_s: float = 0.0
    replay_note: str = ""
    qemu_verdict: str = "-"
    qemu_s: float = 0.0
    trace: Path | None = None
    notes: list[str] = field(default_factory=list)


def pintos_src(folder: Path) -> Path:
    """The pintos `src` folder from the tree's root or from `src` itself."""
    for candidate in (folder / "src", folder):
        if (candidate / "threads" / "Makefile").is_file() and (candidate / "utils" / "pintos").is_file():
            return candidate.resolve()
    raise SystemExit(f"pintos_check: {folder} is not a pintos tree (no src/threads/Makefile, src/utils/pintos)")


def build(src: Path, project: str) -> Path:
    """`make` in src/<project> (a no-op when built); the build folder."""
    result = subprocess.run(["make", "-C", str(src / project)], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"pintos_check: make in {src / project} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return src / project / "build"


def tests_of(build_dir: Path) -> list[PintosTest]:
    """Every test `make check` would run, with its pintos command line (from `make -n check`)."""
    result = subprocess.run(["make", "-n", "-C", str(build_dir), "check", "SIMULATOR=--qemu"],
                            capture_output=True, text=True)
    tests = []
    for line in result.stdout.splitlines():
        if not line.startswith("pintos ") or ">" not in line:
            continue
        command, _, redirections = line.partition(" < /dev/null")
        output = re.search(r">\s*(\S+)\.output", redirections)
        if output is None:
            continue
        words = shlex.split(command)[1:]
        split = words.index("--")
        options, kernel_args = words[:split], words[split + 1:]
        timeout = 60
        kept = []
        index = 0
        while index < len(options):
            word = options[index]
            if word == "-T":
                timeout = int(options[index + 1])
                index += 2
                continue
            if word not in ("-v", "-k", "--qemu"):
                kept.append(word)
            index += 1
        tests.append(PintosTest(output.group(1), kept, kernel_args, timeout))
    if not tests:
        raise SystemExit(f"pintos_check: `make -n check` in {build_dir} listed no tests:\n{result.stderr[-2000:]}")
    return tests


def _no_simulator(folder: Path) -> Path:
    """A folder whose `qemu-system-i386` does nothing: the pintos script then only makes the disk."""
    fake = folder / "qemu-system-i386"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    return folder


def make_disk(src: Path, build_dir: Path, test: PintosTest, disk: Path, no_sim: Path) -> None:
    env = dict(os.environ, PATH=f"{no_sim}:{src / 'utils'}:{os.environ.get('PATH', '')}")
    disk.unlink(missing_ok=True)
    command = ["pintos", "--qemu", "-v", f"--make-disk={disk}", *test.options, "--", *test.kernel_args]
    result = subprocess.run(command, cwd=build_dir, env=env, capture_output=True, text=True)
    if not disk.is_file():
        raise RuntimeError(f"the pintos script made no disk: {' '.join(command)}\n{result.stderr[-1500:]}")


def replayvm_command() -> list[str]:
    script = Path(sys.executable).parent / "replayvm"
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from replayvm.cli import main; main()"]


def check(src: Path, out: Path, test: PintosTest, output: bytes, suffix: str = "") -> str:
    """Feed `output` to the test's .ck checker as `make check` does; PASS or FAIL."""
    name = test.name + suffix
    output_file = out / f"{name}.output"
    output_file.parent.mkdir(parents=True, exist_ok=True)
    output_file.write_bytes(output.replace(b"\r\n", b"\n"))
    result_file = out / f"{name}.result"
    result_file.unlink(missing_ok=True)
    checker = src / f"{test.name}.ck"
    subprocess.run(["perl", f"-I{src}", str(checker), name, str(result_file)], cwd=out,
                   capture_output=True, text=True)
    verdict = result_file.read_text().split()[0] if result_file.is_file() and result_file.read_text().split() else "FAIL"
    return verdict


def run_test(src: Path, build_dir: Path, out: Path, test: PintosTest, no_sim: Path, *, engine: str,
             virtual_clock: bool, replay: bool, qemu: bool) -> Outcome:
    outcome = Outcome(test.name)
    disk = out / f"{test.name}.dsk"
    disk.parent.mkdir(parents=True, exist_ok=True)
    make_disk(src, build_dir, test, disk, no_sim)
    trace = out / f"{test.name}.zst"
    trace.unlink(missing_ok=True)
    command = [*replayvm_command(), "record", "--machine", "pc", "--engine", engine, "--mem", str(RAM_MIB),
               "--disk", str(disk), "-o", str(trace), "--timeout", str(test.timeout_s)]
    if virtual_clock:
        command.append("--virtual-clock")
    started = time.monotonic()
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True)
    outcome.record_s = time.monotonic() - started
    said = result.stderr.decode(errors="replace").strip().splitlines()
    outcome.end = said[-1].removeprefix("replayvm: ") if said else f"exit {result.returncode}"
    outcome.verdict = check(src, out, test, result.stdout)
    outcome.trace = trace if trace.is_file() else None
    if replay and outcome.trace is not None:
        started = time.monotonic()
        replayed = subprocess.run([*replayvm_command(), "replay", str(trace)], stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=REPLAY_TIMEOUT_S)
        outcome.replay_s = time.monotonic() - started
        text = replayed.stdout.decode(errors="replace")
        outcome.verified = replayed.returncode == 0 and "replay verified" in text
        if not outcome.verified:
            lines = (replayed.stderr.decode(errors="replace") or text).strip().splitlines()
            outcome.replay_note = lines[-1] if lines else f"exit {replayed.returncode}"
    if qemu:
        env = dict(os.environ, PATH=f"{src / 'utils'}:{os.environ.get('PATH', '')}")
        command = ["pintos", "-v", "-k", "-T", str(test.timeout_s), "--qemu", *test.options, "--",
                   *test.kernel_args]
        started = time.monotonic()
        result = subprocess.run(command, cwd=build_dir, env=env, stdin=subprocess.DEVNULL, capture_output=True)
        outcome.qemu_s = time.monotonic() - started
        outcome.qemu_verdict = check(src, out, test, result.stdout, suffix=".qemu")
    return outcome


def select(tests: list[PintosTest], patterns: str | None) -> list[PintosTest]:
    if not patterns:
        return tests
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [t for t in tests if any(fnmatch.fnmatch(t.name.rsplit("/", 1)[-1], p) for p in wanted)]
    if not chosen:
        raise SystemExit(f"pintos_check: no test matches {patterns!r}")
    return chosen


def line_of(outcome: Outcome, qemu: bool) -> str:
    replayed = {True: "verified", False: f"NOT VERIFIED ({outcome.replay_note})", None: "-"}[outcome.verified]
    text = f"{outcome.test.rsplit('/', 1)[-1]:<24} {outcome.verdict:<5} record {outcome.record_s:6.1f}s"
    if outcome.verified is not None:
        text += f"  replay {outcome.replay_s:6.1f}s {replayed}"
    if qemu:
        text += f"  qemu {outcome.qemu_verdict:<5} {outcome.qemu_s:6.1f}s"
        if outcome.qemu_verdict != outcome.verdict:
            text += "  DIFFERENT VERDICT"
    return text + f"  [{outcome.end}]"


def markdown(outcomes: list[Outcome], qemu: bool) -> str:
    head = "| test | replayvm | record s | replay | replay s |" + (" QEMU | QEMU s |" if qemu else "")
    rule = "|---|---|---:|---|---:|" + ("---|---:|" if qemu else "")
    rows = [head, rule]
    for o in outcomes:
        replayed = {True: "verified", False: "NOT verified", None: "-"}[o.verified]
        row = f"| {o.test.rsplit('/', 1)[-1]} | {o.verdict.lower()} | {o.record_s:.1f} | {replayed} | {o.replay_s:.1f} |"
        if qemu:
            row += f" {o.qemu_verdict.lower()} | {o.qemu_s:.1f} |"
        rows.append(row)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pintos", type=Path, default=os.environ.get(PINTOS_DIR_VARIABLE),
                        help=f"the pintos tree (default ${PINTOS_DIR_VARIABLE})")
    parser.add_argument("--project", default="threads", help="threads (default), userprog, vm, filesys")
    parser.add_argument("--tests", help="comma-separated test names or patterns (default: all)")
    parser.add_argument("--out", type=Path, help="where traces and results go (default ./pintos-results/PROJECT)")
    parser.add_argument("--engine", default="emu", choices=("emu", "kvm"))
    parser.add_argument("--virtual-clock", action="store_true",
                        help="guest time from the instruction count: a run's verdict does not depend on "
                             "the host's speed")
    parser.add_argument("--no-replay", action="store_true", help="do not replay the traces")
    parser.add_argument("--qemu", action="store_true", help="also run each test under QEMU (the pintos script)")
    parser.add_argument("--markdown", action="store_true", help="end with the table in Markdown")
    args = parser.parse_args(argv)
    if args.pintos is None:
        raise SystemExit(f"pintos_check: give --pintos DIR or set {PINTOS_DIR_VARIABLE}")
    for tool in ("perl", "make"):
        if shutil.which(tool) is None:
            raise SystemExit(f"pintos_check: {tool} is needed (pintos's Makefiles and checkers)")
    src = pintos_src(Path(args.pintos))
    build_dir = build(src, args.project)
    tests = select(tests_of(build_dir), args.tests)
    out = (args.out or Path("pintos-results") / args.project).resolve()
    out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="pintos-check-") as scratch:
        no_sim = _no_simulator(Path(scratch))
        for test in tests:
            outcome = run_test(src, build_dir, out, test, no_sim, engine=args.engine,
                               virtual_clock=args.virtual_clock, replay=not args.no_replay, qemu=args.qemu)
            outcomes.append(outcome)
            print(line_of(outcome, args.qemu), flush=True)
    passed = sum(o.verdict == "PASS" for o in outcomes)
    verified = sum(bool(o.verified) for o in outcomes)
    summary = f"{passed} of {len(outcomes)} tests pass under replayvm"
    if not args.no_replay:
        summary += f"; {verified} of {len(outcomes)} traces replay verified"
    if args.qemu:
        summary += (f"; {sum(o.qemu_verdict == 'PASS' for o in outcomes)} pass under QEMU, "
                    f"{sum(o.qemu_verdict == o.verdict for o in outcomes)} verdicts agree")
    print(summary)
    if args.markdown:
        print()
        print(markdown(outcomes, args.qemu))
    ok = (args.no_replay or verified == len(outcomes)) and \
        (not args.qemu or all(o.qemu_verdict == o.verdict for o in outcomes))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
