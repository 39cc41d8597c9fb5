"""Replay and seek speed of this tree against an earlier revision, measured in the same run.

    python bench/compare_revisions.py [--base REV] [--rounds N] [--quick] [--bench replay,seek]

Why one run: the build host has 2 cores shared with other jobs, so figures taken on different
days (or minutes apart) differ by more than most changes do. This script measures both trees
on the same traces, in alternating runs, and prints each metric's median for the base, for the
current tree and their ratio (current / base: above 1 means the current tree is slower).

How:
- the base revision (default: the newest tag, else BASE_RELEASE) is checked out into a temporary
  `git worktree` outside the repository, removed at the end; its cffi extensions are copied from
  the current tree when their C sources (engines/emu_build.py, kvm_build.py) are identical,
  built there otherwise;
- the traces are recorded once, by the base tree, on the virtual clock (an earlier release's trace
  must replay on the current tree, so both replay identical input);
- then N rounds of bench/bench_replay.py and bench/bench_seek.py (this tree's scripts, so the
  measuring code is the same) run as subprocesses with PYTHONPATH at each tree, the order of the
  two trees swapped every round (base, current, current, base, ...) so that a drift in the
  host's load weighs on both alike. Each figure is kept as wall and CPU seconds
  (bench_figures.py); CPU time moves less when other jobs share the cores.

--quick records one short demo session and runs short seek steps: a check that the comparison
works end to end (tests/test_bench_scripts.py), not a measurement. Exit status: 0 when every run
completed (whatever the ratios: this script reports, it does not judge), 1 when a run failed,
2 for a usage error (e.g. an unknown revision).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BASE_RELEASE = "7895a1b"      # replayvm 0.2.0 (main before issue 11); used when the repo has no tag
EXTENSIONS = {                # cffi build script -> the extension it builds (next to it)
    "replayvm/engines/emu_build.py": "_uc",
    "replayvm/engines/kvm_build.py": "_kvm",
}
BENCHES = ("replay", "seek")
QUICK_RAM_MIB = 16            # --quick: the demo guest needs a few MiB; checkpoints cost per MiB of RAM
RUN_TIMEOUT_S = 3600          # one bench run of one tree; a hang must not keep the machine forever

# Runs a bench script (or the replayvm CLI) with `replayvm` imported from one tree only. Under
# PYTHONPATH alone, `replayvm.guests` would be missing (pyproject maps guests/ to it at install) or
# come from the installed checkout: map it to the same tree, as tests/test_imports.py does.
RUNNER = r"""
import importlib.util, runpy, sys
tree, kind, target, *arguments = sys.argv[1:]
import replayvm
if not replayvm.__file__.startswith(tree + "/"):
    sys.exit(f"compare_revisions: replayvm came from {replayvm.__file__}, not from {tree}")
spec = importlib.util.spec_from_file_location("replayvm.guests", f"{tree}/guests/__init__.py",
                                              submodule_search_locations=[f"{tree}/guests"])
guests = importlib.util.module_from_spec(spec)
sys.modules["replayvm.guests"] = guests
spec.loader.exec_module(guests)
replayvm.guests = guests
if kind == "cli":
    from replayvm.cli import main
    sys.exit(main(arguments))
sys.argv = [target, *arguments]
sys.path.insert(0, str(__import__("pathlib").Path(target).parent))
runpy.run_path(target, run_name="__main__")
"""


class UsageError(Exception):
    """A bad argument: one line on stderr, exit status 2."""


class RunFailed(Exception):
    """A recording or bench run did not complete: exit status 1."""


@dataclass(frozen=True)
class Session:
    """A guest session recorded once by the base tree and replayed by both."""
    name: str
    script: str                               # typed lines, in the CLI's --input escapes
    xv6: bool = False
    benches: tuple[str, ...] = BENCHES
    ram_mib: int | None = None                # None: the CLI's default


@dataclass(frozen=True)
class Plan:
    sessions: tuple[Session, ...]
    seek_arguments: tuple[str, ...] = ()


FULL_PLAN = Plan(sessions=(
    Session("demo: echo, date, disk", r"echo hello\ndate\ndisk\n", benches=("replay",)),
    Session("demo: spin 40 (CPU-bound)", r"spin 40\n", benches=("replay",)),
    Session("demo: spin 300, race", r"spin 300\nrace\necho done\n", benches=("seek",)),
    Session("xv6: ls, echo hello, cat README", r"ls\necho hello\ncat README\n", xv6=True),
))
QUICK_PLAN = Plan(sessions=(Session("demo: echo hello", r"echo hello\n", ram_mib=QUICK_RAM_MIB),),
                  seek_arguments=("--every", "1000000", "--reverse-steps", "3"))


@dataclass
class Tree:
    """A source tree whose `replayvm` a subprocess imports (PYTHONPATH=root)."""
    label: str
    root: Path
    figures: dict[str, dict[str, list[float]]] = field(default_factory=dict)   # metric -> unit -> runs

    def run(self, kind: str, target: str, arguments: list[str], *, cwd: Path,
            quiet: bool = False) -> subprocess.CompletedProcess:
        environment = dict(os.environ, PYTHONPATH=str(self.root))
        command = [sys.executable, "-c", RUNNER, str(self.root), kind, target, *arguments]
        try:
            result = subprocess.run(command, env=environment, cwd=cwd, stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RunFailed(f"{self.label}: {target} {' '.join(arguments)}: no end after "
                            f"{RUN_TIMEOUT_S} s") from None
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
            raise RunFailed(f"{self.label}: {target} {' '.join(arguments)} failed "
                            f"(exit {result.returncode}):\n{tail}")
        if not quiet:
            sys.stdout.write(result.stdout)
        return result

    def keep(self, document: dict) -> None:
        for metric, units in document["metrics"].items():
            for unit, value in units.items():
                self.figures.setdefault(metric, {}).setdefault(unit, []).append(value)


def git(repo: Path, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *arguments], capture_output=True, text=True,
                          check=check, stdin=subprocess.DEVNULL)


def default_base(repo: Path) -> str:
    """The previous release: the newest tag reachable from HEAD, else BASE_RELEASE."""
    described = git(repo, "describe", "--tags", "--abbrev=0", "HEAD", check=False)
    return described.stdout.strip() if described.returncode == 0 else BASE_RELEASE


def resolve(repo: Path, revision: str) -> str:
    found = git(repo, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}", check=False)
    if found.returncode != 0:
        raise UsageError(f"--base {revision!r}: no such commit or tag in {repo}")
    return found.stdout.strip()


def prepare_extensions(base: Tree, current: Tree, commit: str) -> None:
    """Give the base tree its cffi extensions: a copy of the current tree's when built from the
    same C (the build scripts hold the C), a build in the base tree otherwise."""
    for build_script, name in EXTENSIONS.items():
        same_source = git(current.root, "diff", "--quiet", commit, "--", build_script,
                          check=False).returncode == 0
        built = sorted((current.root / build_script).parent.glob(f"{name}.*.so"))
        if same_source and built:
            for library in built:
                shutil.copy2(library, base.root / build_script.rsplit("/", 1)[0] / library.name)
            print(f"base: {name} copied from the current tree (same C in {build_script})", file=sys.stderr)
        else:
            print(f"base: building {name} ({build_script} differs or is not built here)", file=sys.stderr)
            base.run("script", str(base.root / build_script), [], cwd=base.root, quiet=True)


def record_traces(base: Tree, plan: Plan, benches: list[str], folder: Path,
                  xv6_dir: Path | None) -> dict[Session, Path]:
    """Record each session the chosen benches use once, with the base tree, on the virtual clock."""
    traces = {}
    for number, session in enumerate(plan.sessions):
        if not set(session.benches) & set(benches):
            continue
        if session.xv6 and xv6_dir is None:
            print(f"{session.name}: REPLAYVM_XV6_DIR not set, skipped", file=sys.stderr)
            continue
        trace = folder / f"session{number}.zst"
        disks = ["--disk", str(xv6_dir / "xv6.img"), "--disk", str(xv6_dir / "fs.img")] if session.xv6 else []
        memory = ["--mem", str(session.ram_mib)] if session.ram_mib else []
        print(f"recording {session.name!r} with the base tree", file=sys.stderr)
        base.run("cli", "replayvm", ["record", "--engine", "emu", "--virtual-clock", *disks, *memory,
                                     "--input", session.script, "-o", str(trace)],
                 cwd=folder, quiet=True)
        if not trace.is_file():
            raise RunFailed(f"base: recording {session.name!r} left no trace")
        traces[session] = trace
    return traces


def bench_arguments(bench: str, plan: Plan, traces: dict[Session, Path], output: Path) -> list[str] | None:
    arguments = [f"--trace={session.name}={trace}" for session, trace in traces.items()
                 if bench in session.benches]
    if not arguments:
        return None
    extra = list(plan.seek_arguments) if bench == "seek" else []
    return [*arguments, *extra, "--json", str(output)]


def run_rounds(trees: tuple[Tree, Tree], benches: list[str], plan: Plan, traces: dict[Session, Path],
               rounds: int, folder: Path) -> None:
    for round_number in range(rounds):
        order = trees if round_number % 2 == 0 else trees[::-1]
        for tree in order:
            for bench in benches:
                output = folder / f"{tree.label}-{bench}-{round_number}.json"
                arguments = bench_arguments(bench, plan, traces, output)
                if arguments is None:
                    continue
                print(f"round {round_number + 1}/{rounds}: {bench} on {tree.label}", file=sys.stderr)
                tree.run("script", str(BENCH_DIR / f"bench_{bench}.py"), arguments, cwd=folder, quiet=True)
                document = json.loads(output.read_text())
                tree.keep(document)
                for metric, units in document["metrics"].items():     # as it goes: a cut run still tells
                    print(f"  {tree.label}: {metric}: wall {units['wall_s']:.3f} s, cpu {units['cpu_s']:.3f} s",
                          file=sys.stderr)


def comparison(base: Tree, current: Tree) -> list[dict]:
    """Per metric and unit: each tree's median and range, and the ratio of medians."""
    rows = []
    for metric, units in base.figures.items():
        for unit, base_runs in units.items():
            current_runs = current.figures.get(metric, {}).get(unit)
            if not current_runs:
                continue
            base_median, current_median = statistics.median(base_runs), statistics.median(current_runs)
            rows.append({"metric": metric, "unit": unit, "base_runs": base_runs, "current_runs": current_runs,
                         "base_median": base_median, "current_median": current_median,
                         "ratio": current_median / base_median if base_median > 0 else None})
    return rows


def print_comparison(rows: list[dict], base_label: str, rounds: int) -> None:
    width = max([len(row["metric"]) for row in rows] + [6])
    print(f"\n{'metric':{width}s}  unit  {'base':>9s}  {'current':>9s}  current/base  "
          f"(medians of {rounds}; base = {base_label}; range of runs in brackets)")
    for row in sorted(rows, key=lambda row: (row["metric"], row["unit"])):
        ratio = f"{row['ratio']:12.3f}" if row["ratio"] is not None else f"{'-':>12s}"
        print(f"{row['metric']:{width}s}  {row['unit'].removesuffix('_s'):4s}  {row['base_median']:8.3f}s  "
              f"{row['current_median']:8.3f}s  {ratio}  "
              f"[{min(row['base_runs']):.3f}-{max(row['base_runs']):.3f}] "
              f"[{min(row['current_runs']):.3f}-{max(row['current_runs']):.3f}]")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", metavar="REV", help=f"revision to compare against (default: the newest "
                                                      f"tag, else {BASE_RELEASE}, replayvm 0.2.0)")
    parser.add_argument("--current", type=Path, default=BENCH_DIR.parent, metavar="TREE",
                        help="the tree to measure against it, as it is on disk (default: this one)")
    parser.add_argument("--rounds", type=int, default=3, metavar="N", help="runs of each tree (default 3)")
    parser.add_argument("--bench", default=",".join(BENCHES), metavar="LIST",
                        help=f"which benches, comma-separated (default {','.join(BENCHES)})")
    parser.add_argument("--quick", action="store_true",
                        help="one short demo session and short seek steps: checks the tool, measures little")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the comparison to FILE")
    args = parser.parse_args(argv)
    benches = [name for name in args.bench.split(",") if name]
    unknown = sorted(set(benches) - set(BENCHES))
    if unknown or not benches:
        parser.error(f"--bench: choose from {', '.join(BENCHES)}")
    if args.rounds < 1:
        parser.error("--rounds: give 1 or more")
    args.benches = benches
    return args


def compare(args: argparse.Namespace) -> int:
    current_root = args.current.resolve()
    top = git(current_root, "rev-parse", "--show-toplevel", check=False)
    if top.returncode != 0:
        raise UsageError(f"--current {current_root}: not a git checkout")
    current_root = Path(top.stdout.strip())
    base_label = args.base or default_base(current_root)
    commit = resolve(current_root, base_label)
    xv6 = os.environ.get("REPLAYVM_XV6_DIR")
    xv6_dir = None if args.quick or not xv6 else Path(xv6)
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    folder = Path(tempfile.mkdtemp(prefix="replayvm-compare-"))
    base = Tree("base", folder / "base-tree")
    current = Tree("current", current_root)
    try:
        print(f"base {base_label} ({commit[:12]}) checked out in {base.root}", file=sys.stderr)
        added = git(current_root, "worktree", "add", "--detach", "--quiet", str(base.root), commit,
                    check=False)
        if added.returncode != 0:
            raise RunFailed(f"git worktree add {base.root}: {added.stderr.strip()}")
        base.root = base.root.resolve()
        prepare_extensions(base, current, commit)
        traces = record_traces(base, plan, args.benches, folder, xv6_dir)
        run_rounds((base, current), args.benches, plan, traces, args.rounds, folder)
    finally:
        if base.root.exists():
            git(current_root, "worktree", "remove", "--force", str(base.root), check=False)
        git(current_root, "worktree", "prune", check=False)
        shutil.rmtree(folder, ignore_errors=True)
    rows = comparison(base, current)
    print_comparison(rows, f"{base_label} ({commit[:12]})", args.rounds)
    if args.json:
        args.json.write_text(json.dumps({"base": base_label, "base_commit": commit,
                                         "current": str(current_root), "rounds": args.rounds,
                                         "rows": rows}, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    # A SIGTERM ends the run through the `finally` above: the temporary worktree is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return compare(args)
    except UsageError as error:
        print(f"compare_revisions: {error}", file=sys.stderr)
        return 2
    except RunFailed as error:
        print(f"compare_revisions: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compare_revisions: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
