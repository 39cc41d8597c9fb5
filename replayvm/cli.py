"""`replayvm` command line: thin verbs over the Python API. Errors are one line and a status."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from replayvm import __version__, hw
from replayvm.errors import GuestFault, ReplayVMError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"replayvm: {message}\n")
        raise SystemExit(2)


def positive_seconds(text: str) -> float:
    """A duration for --timeout: a finite number of seconds above zero (not nan, inf or -1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number of seconds above 0")
    return value


def positive_count(text: str) -> int:
    """A count for --repeat and --checkpoint-every: a whole number of 1 or more, its digits
    grouped as positions' may be (`5_000_000`, `5,000,000`)."""
    from replayvm.replay.positions import parse_count

    try:
        value = parse_count(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a count of 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="replayvm", description="Record, replay and query x86 guest sessions.")
    parser.add_argument("--version", action="version", version=f"replayvm {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    record = verbs.add_parser("record", help="boot a guest with its console (the demo guest by default)",
                              description="Boot a guest with its serial console on the terminal. "
                                          "With no --guest, --disk or --kernel, the bundled demo guest.")
    record.add_argument("--guest", metavar="NAME",
                        help="a bundled guest, built on first use: demo (the default), rustos (the "
                             "Rust teaching kernel, 64-bit), biosboot (boots through replayvm's BIOS "
                             "on --machine pc), long64 (a 64-bit test kernel)")
    record.add_argument("--disk", action="append", type=Path, default=[], metavar="IMAGE",
                        help="disk image, in IDE order (first: master, boot disk; second: slave)")
    record.add_argument("--kernel", type=Path, metavar="ELF", help="multiboot kernel to load directly")
    record.add_argument("--engine", choices=("auto", "kvm", "emu"), default="auto",
                        help="CPU engine (default auto: kvm when it can run the guest, else emu)")
    record.add_argument("--mem", type=int, default=hw.DEFAULT_RAM_MIB, metavar="MiB", help="guest RAM")
    record.add_argument("--cpus", type=int, default=1, metavar="N",
                        help=f"CPUs (1-{hw.MAX_CPUS}, default 1; xv6's `make qemu` runs 2): the emu "
                             "engine runs them in turns of instructions, each switch in the trace")
    record.add_argument("--machine", choices=hw.MACHINE_KINDS, default=None,
                        help="mp (default; a bundled guest: its own): the MP-spec PC xv6 needs (MP "
                             "table, APICs; no BIOS code runs); pc: a plain PC with replayvm's BIOS "
                             "services and the 8254 timer, no MP table (pintos); its traces need "
                             "format 3.0 readers")
    record.add_argument("--x86-64", dest="x86_64", action="store_true",
                        help="a 64-bit guest that boots from disk and enters long mode itself (a "
                             "64-bit kernel ELF is recognised without it): the emu engine opens a "
                             "vCPU that can enter long mode")
    record.add_argument("--input", metavar="TEXT",
                        help=r"type these lines (C escapes \n \t \\ \xNN), each when the prompt shows")
    record.add_argument("--prompt", default="$ ", help="prompt that --input waits for (default '$ ')")
    record.add_argument("--until", metavar="TEXT", help="end when the console shows TEXT")
    record.add_argument("--timeout", type=positive_seconds, metavar="S",
                        help="give up after S seconds of guest time (under --chaos, stalls not counted)")
    record.add_argument("--virtual-clock", action="store_true",
                        help="deterministic guest time from the instruction count (emu engine only)")
    record.add_argument("-o", "--output", type=Path, metavar="FILE",
                        help="record the session into this trace file (e.g. session.zst)")
    record.add_argument("--chaos", action="store_true",
                        help="stall the CPU at random moments (seeded) so that timer ticks land "
                             "much more often in its work, and give the disk and serial port random "
                             "latencies, so timing bugs show up; guest time stays honest and the "
                             "trace still replays exactly")
    record.add_argument("--seed", type=int, help="seed for --chaos (default: random, printed)")
    record.add_argument("--repeat", type=positive_count, metavar="K", default=1,
                        help="with --until-fail: record up to K runs")
    record.add_argument("--until-fail", metavar="PATTERN",
                        help="keep recording (up to --repeat runs) until the console matches this "
                             "regular expression; the matching run's trace is kept")

    replay = verbs.add_parser("replay", help="re-execute a trace and verify it went the same way",
                              description="Replay a recorded session from the trace alone: device "
                                          "reads from the trace, interrupts at their recorded "
                                          "positions, every write and the final state checked.")
    replay.add_argument("trace", type=Path, metavar="TRACE")
    replay.add_argument("--quiet", action="store_true", help="do not show the guest's console output")
    replay.add_argument("--continue", dest="keep_going", action="store_true",
                        help="do not stop at the first mismatching write: count them")
    replay.add_argument("--until", metavar="EVENT|iCOUNT",
                        help="stop after event number EVENT, or at instruction COUNT (i5000000, "
                             "i5_000_000 or i5,000,000), and print the CPU state")
    replay.add_argument("--stats", action="store_true", help="print replay speed on stderr")
    replay.add_argument("--gdb", metavar="[HOST:]PORT",
                        help="serve the GDB remote protocol on the replay (loopback unless HOST is "
                             "given): breakpoints, watchpoints, stepping, reverse execution")
    replay.add_argument("--seek", metavar="EVENT|iCOUNT",
                        help="start at this point (with --gdb: the debugger starts there), going "
                             "there through checkpoints; without --gdb, print the CPU state there")
    replay.add_argument("--checkpoint-every", type=positive_count, metavar="N", default=None,
                        help="with --gdb/--seek: instructions between checkpoints (default 5,000,000)")
    replay.add_argument("--no-keep-checkpoints", dest="keep_checkpoints", action="store_false",
                        help="with --gdb/--seek: do not use or keep checkpoints in the cache "
                             "($REPLAYVM_CACHE/checkpoints) for the next run on this trace")
    replay.add_argument("--engine", choices=("emu", "kvm"),
                        help="must be the engine the trace was recorded on (emu traces replay on emu, "
                             "kvm traces on kvm; replaying on the other engine is not supported yet)")
    live = replay.add_argument_group("going live", "replay to --seek (default: the recording's end), "
                                     "then continue the guest live from there with its devices as "
                                     "they were, recording a branch trace with -o")
    live.add_argument("--live", action="store_true", help="go live at --seek, or at the end")
    live.add_argument("-o", "--output", type=Path, metavar="FILE",
                      help="with --live: record the live continuation into this branch trace")
    live.add_argument("--input", metavar="TEXT",
                      help=r"with --live: type these lines (C escapes), each when the prompt shows")
    live.add_argument("--prompt", default="$ ", help="with --live: prompt that --input waits for")
    live.add_argument("--live-until", metavar="TEXT", help="with --live: end when the console shows TEXT")
    live.add_argument("--timeout", type=positive_seconds, metavar="S",
                      help="with --live: give up after S seconds of guest time")
    live.add_argument("--virtual-clock", action="store_true",
                      help="with --live: deterministic guest time from the instruction count (emu)")
    live.add_argument("--disk", action="append", type=Path, default=[], metavar="IMAGE",
                      help="with --live: the recording's disk images, in IDE order, for sectors the "
                           "recording never read (checked against the trace's hashes)")

    analyze = verbs.add_parser("analyze", help="load a trace into SQLite for SQL questions",
                               description="Load a trace into an SQLite database (tables exits, "
                                           "interrupts, inputs, clock_reads, disk_io, console, "
                                           "schedule, devices, meta; rows carry their cpu and "
                                           "address space, cr3; --processes adds processes; see "
                                           "docs/analysis.md).")
    analyze.add_argument("trace", type=Path, metavar="TRACE")
    analyze.add_argument("-o", "--output", type=Path, metavar="DB", help="database (default TRACE.db)")
    analyze.add_argument("--symbols", type=Path, action="append", default=[], metavar="ELF",
                         help="ELF with symbols (kernel; user programs for CPL 3); repeatable")
    analyze.add_argument("--append", action="store_true", help="add to a database holding other traces")
    analyze.add_argument("--processes", action="store_true",
                         help="also the table processes: which xv6 process (pid, name) each CPU ran "
                              "where, read from guest memory by replaying the trace (xv6's kernel "
                              "among --symbols)")

    sql = verbs.add_parser("sql", help="run SQL on an analysed database (or a trace)",
                           description="Run a query on a database made by analyze (opened read-only), "
                                       "or on a trace, analysed into a temporary database first.")
    sql.add_argument("source", type=Path, metavar="DB|TRACE")
    sql.add_argument("query", metavar="SQL")
    fmt = sql.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true")
    fmt.add_argument("--json", action="store_true")

    info = verbs.add_parser("info", help="summarise a trace: header, events, interrupts, size",
                            description="Print a trace's header and a summary of what it holds.")
    info.add_argument("trace", type=Path, metavar="TRACE")
    info.add_argument("--json", action="store_true", help="machine-readable output")

    guest = verbs.add_parser("guest", help="build a bundled guest if needed and print its ELF's path",
                             description="Build a bundled guest (demo, rustos) if needed and print the "
                                         "path of its kernel ELF, for `analyze --symbols` and gdb.")
    guest.add_argument("name", metavar="NAME")
    return parser


def _say(line: str) -> None:
    """A status line on stderr, at once (runs can be long)."""
    sys.stderr.write(f"replayvm: {line}\n")
    sys.stderr.flush()


def _resolve_engine(requested: str, long_mode: bool = False, cpus: int = 1) -> str:
    from replayvm.engines.probe import choose_engine

    name, reason = choose_engine(requested, long_mode, cpus)
    if requested == "auto":
        sys.stderr.write(f"replayvm: engine {name}: {reason}\n")
    return name


def cmd_record(args: argparse.Namespace) -> int:
    from replayvm.console import decode_escapes
    from replayvm.engines.registry import engine_class
    from replayvm.record.session import SessionOptions, run_session

    if args.output is not None and args.output.is_dir():
        raise UsageError(f"trace path {args.output} is a folder")
    long_mode = False
    machine = args.machine or "mp"
    if args.guest is not None:
        from replayvm.guests import guest_boot

        if args.disk or args.kernel is not None:
            raise UsageError("--guest boots a bundled guest: give it without --disk and --kernel")
        boot = guest_boot(args.guest)
        args.kernel, args.disk, long_mode = boot.kernel, list(boot.disks), boot.long_mode
        machine = args.machine or boot.machine
    if args.kernel is not None and not args.kernel.is_file():
        raise UsageError(f"kernel not found: {args.kernel}")
    for disk in args.disk:
        if not disk.is_file():
            raise UsageError(f"disk image not found: {disk}")
    script = decode_escapes(args.input, "--input") if args.input is not None else None
    prompt = decode_escapes(args.prompt, "--prompt")
    until = decode_escapes(args.until, "--until") if args.until else None
    if not 1 <= args.cpus <= hw.MAX_CPUS:
        raise UsageError(f"--cpus must be between 1 and {hw.MAX_CPUS}")
    engine = _resolve_engine(args.engine, long_mode, args.cpus)
    if args.virtual_clock and not engine_class(engine).exact_positions:
        raise UsageError("--virtual-clock needs the emu engine (guest time from its instruction count)")
    if args.until_fail is not None and script is None:
        raise UsageError("--until-fail needs --input: repeated runs are scripted")
    if args.repeat > 1 and args.until_fail is None:
        raise UsageError("--repeat needs --until-fail: runs are repeated until one matches")
    seed = args.seed
    if args.chaos and seed is None:
        from replayvm.chaos import new_seed

        seed = new_seed()
    options = SessionOptions(
        disks=args.disk, kernel=args.kernel, ram_mib=args.mem, engine=engine, script=script,
        prompt=prompt, until=until,
        timeout_s=args.timeout, interactive=script is None and sys.stdin.isatty(),
        virtual_clock=args.virtual_clock, trace=args.output, command_line=sys.argv[:],
        chaos_seed=seed if args.chaos else None, cpus=args.cpus, machine=machine, x86_64=args.x86_64)
    if args.until_fail is None:
        if args.chaos:
            _say(f"chaos seed {seed}")
        outcome, machine = run_session(options)
    else:
        import re

        from replayvm.record.repeat import record_until_match

        try:
            pattern = re.compile(args.until_fail.encode())
        except re.error as error:
            raise UsageError(f"--until-fail is not a valid regular expression: {error}") from None
        result = record_until_match(options, pattern, args.repeat,
                                    first_seed=seed if args.chaos else None, report=_say)
        if result.matched_run is None:
            _say(f"no run of {result.runs} matched {args.until_fail!r}"
                 + ("; no trace kept" if args.output else ""))
            return 1
        sys.stdout.buffer.write(result.console)
        _end_console_line(result.console)
        _say(f"run {result.matched_run} of {args.repeat} matched {args.until_fail!r}"
             + (f"; trace kept in {args.output}" if args.output else ""))
        if result.outcome is None:           # the matching run ended in a guest fault
            return 1
        return _session_status(result.outcome)
    _end_console_line(bytes(machine.console.transcript))
    return _session_status(outcome)


def _end_console_line(console: bytes) -> None:
    if console and not console.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")          # leave the shell prompt on its own line
    sys.stdout.flush()


def _session_status(outcome) -> int:
    """Exit status of a recorded session, with a line saying why when it did not end as asked."""
    if outcome.reason == "timeout":
        sys.stderr.write(f"\nreplayvm: timeout: {outcome.detail}\n")
        return 1
    if outcome.reason == "unsupported":
        sys.stderr.write(f"\nreplayvm: {outcome.detail}\n")
        return 1
    if outcome.reason == "shutdown":
        sys.stderr.write(f"\nreplayvm: {outcome.detail}\n")
        return 1
    if outcome.reason == "poweroff":            # the guest's own end: its status
        sys.stderr.write(f"\nreplayvm: {outcome.detail}\n")
        return outcome.exit_status
    return 0


def cmd_debug(args: argparse.Namespace) -> int:
    """replay --gdb / --seek: a Timeline with checkpoints, served to gdb or stopped at a point."""
    from replayvm.replay import gdbstub
    from replayvm.replay.positions import parse_position
    from replayvm.replay.timeline import DEFAULT_CHECKPOINT_EVERY, Timeline

    if args.until is not None or args.keep_going:
        raise UsageError("--gdb and --seek do not combine with --until or --continue")
    output = None if args.quiet else sys.stdout.buffer
    timeline = Timeline(args.trace, checkpoint_every=args.checkpoint_every or DEFAULT_CHECKPOINT_EVERY,
                        output=output, keep_checkpoints=args.keep_checkpoints)

    def say(line: str) -> None:
        sys.stderr.write(f"replayvm: {line}\n")
        sys.stderr.flush()

    if timeline.checkpoints_loaded:
        say(f"{timeline.checkpoints_loaded} checkpoint{'s' if timeline.checkpoints_loaded != 1 else ''} "
            f"kept from an earlier run "
            f"(up to instruction {timeline.checkpoints.newest.position:,})")
    elif timeline.checkpoint_file_note:
        say(timeline.checkpoint_file_note)
    if not timeline.complete:
        say(f"{args.trace} was cut short (its recorder stopped before the footer): it replays up "
            f"to its last event, instruction {timeline.end:,}")
    try:
        if args.seek is not None:
            wanted = parse_position(args.seek, "--seek").instruction(timeline.event_position)
            if wanted > timeline.end:
                say(f"the recording ends at instruction {timeline.end:,}: going there")
            timeline.seek(wanted)
        if args.gdb is None:
            sys.stdout.flush()
            print(f"\nreplay at {timeline.when()}")
            print(timeline.registers().describe())
        else:
            gdbstub.serve(timeline, args.gdb, announce=say)
            sys.stdout.flush()
            say(f"gdb session ended at {timeline.when()}")
        if timeline.save_checkpoints():
            kept = len(timeline.checkpoints.checkpoints) - 1
            say(f"kept {kept} checkpoint{'s' if kept != 1 else ''} for the next run")
        return 0
    finally:
        timeline.close()


def cmd_live(args: argparse.Namespace) -> int:
    """replay --live: replay to a point (verified on the way), then go on live from there."""
    from replayvm.console import decode_escapes
    from replayvm.record.live import replay_and_go_live
    from replayvm.record.session import SessionOptions

    if args.gdb is not None or args.until is not None or args.keep_going:
        raise UsageError("--live does not combine with --gdb, --until or --continue")
    if args.output is not None and args.output.resolve() == args.trace.resolve():
        raise UsageError(f"the branch trace cannot overwrite its parent {args.trace}")
    script = decode_escapes(args.input, "--input") if args.input is not None else None
    options = SessionOptions(
        script=script, prompt=decode_escapes(args.prompt, "--prompt"),
        until=decode_escapes(args.live_until, "--live-until") if args.live_until else None,
        timeout_s=args.timeout, interactive=script is None and sys.stdin.isatty(),
        virtual_clock=args.virtual_clock, trace=args.output, disks=list(args.disk),
        command_line=sys.argv[:])
    output = None if args.quiet else sys.stdout.buffer
    outcome, position = replay_and_go_live(args.trace, options, seek=args.seek, output=output,
                                           checkpoint_every=args.checkpoint_every,
                                           keep_checkpoints=args.keep_checkpoints)
    sys.stdout.flush()
    if args.output is not None:
        _say(f"live from position {position:,}: branch trace in {args.output}")
    return _session_status(outcome)


def cmd_replay(args: argparse.Namespace) -> int:
    import time

    from replayvm.replay.positions import parse_position
    from replayvm.replay.replayer import replay

    live_only = [name for name, given in (("-o", args.output is not None), ("--input", args.input is not None),
                                          ("--live-until", args.live_until is not None),
                                          ("--timeout", args.timeout is not None),
                                          ("--virtual-clock", args.virtual_clock), ("--disk", bool(args.disk)))
                 if given]
    if args.live:
        return cmd_live(args)
    if live_only:
        raise UsageError(f"{', '.join(live_only)} only with --live")
    if args.gdb is not None or args.seek is not None:
        return cmd_debug(args)

    until_event = until_position = None
    if args.until is not None:
        until = parse_position(args.until, "--until")
        if until.is_event:
            until_event = until.count
        else:
            until_position = until.count
    if args.engine is not None:
        from replayvm.trace.reader import TraceReader

        with TraceReader(args.trace) as reader:
            recorded_on = reader.header.get("engine")
        if recorded_on != args.engine:
            raise UsageError(f"{args.trace} was recorded on {recorded_on}; replaying it on {args.engine} "
                             "is not supported yet (positions are instruction counts on emu and exit "
                             "counts on kvm)")
    output = None if args.quiet else sys.stdout.buffer
    started = time.perf_counter()
    result = replay(args.trace, output=output, keep_going=args.keep_going, until_event=until_event,
                    until_position=until_position)
    elapsed = time.perf_counter() - started
    if args.stats:
        sys.stderr.write(f"replay: {result.events:,} events, {result.instructions:,} instructions in "
                         f"{elapsed:.3f} s ({result.instructions / elapsed / 1e6:.1f} M instructions/s, "
                         f"{result.events / elapsed:,.0f} events/s)\n")
    if result.console and not result.console.endswith(b"\n") and output is not None:
        output.write(b"\n")
    sys.stdout.flush()
    if result.stopped_early:
        print(f"replay stopped at event {result.events - 1}, {result.position_unit.rstrip('s')} {result.instructions}")
        print(result.cpu)
        return 0
    if result.truncated:
        print(f"replay not verified: the trace ended early (recorder stopped before its footer); "
              f"{result.events} events, {result.instructions} {result.position_unit} replayed up to there")
        return 1
    if result.mismatches:
        print(f"replay finished with {len(result.mismatches)} mismatches: {result.mismatches[0]}")
        return 1
    print(f"replay verified: {result.events} events, {result.instructions} {result.position_unit}, "
          f"state hash {result.state_hash}")
    if result.guest_end:
        print(f"the guest's end, replayed as recorded: {result.guest_end}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    import time

    from replayvm.analyze.loader import load_trace

    db_path = args.output or args.trace.with_suffix(args.trace.suffix + ".db")
    started = time.perf_counter()
    bar = None
    if sys.stderr.isatty():
        from replayvm.progress import ProgressBar

        bar = ProgressBar(sys.stderr, args.trace.stat().st_size if args.trace.is_file() else 0)
    try:
        counts = load_trace(args.trace, db_path, symbols=args.symbols, append=args.append,
                            progress=bar.update if bar is not None else None, processes=args.processes)
    except BaseException:
        if bar is not None:
            bar.close(finished=False)
        raise
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - started
    rows = sum(v for k, v in counts.items() if k != "trace_id")
    tables = ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "trace_id")
    print(f"{db_path}: trace {counts['trace_id']}: {tables}; {rows:,} rows in {elapsed:.2f} s "
          f"({rows / elapsed:,.0f} rows/s)")
    if not args.processes and args.symbols:
        from replayvm.analyze.processes import xv6_kernel_among

        if xv6_kernel_among(args.symbols):
            print("(xv6's kernel is among the symbols: --processes adds which process each CPU ran, "
                  "by replaying the trace)")
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    import csv
    import json

    from replayvm.analyze import query

    result = query(args.source, args.query)
    if args.json:
        print(json.dumps(result.dicts(), indent=2))
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(result.columns)
        writer.writerows(result.rows)
    else:
        from tabulate import tabulate

        print(tabulate(result.rows, headers=result.columns))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from replayvm.trace.summary import format_summary, summarize

    summary = summarize(args.trace)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def cmd_guest(args: argparse.Namespace) -> int:
    from replayvm.guests import guest_boot

    boot = guest_boot(args.name)
    print(boot.symbols or boot.kernel)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.verb == "record":
            return cmd_record(args)
        if args.verb == "info":
            return cmd_info(args)
        if args.verb == "replay":
            return cmd_replay(args)
        if args.verb == "analyze":
            return cmd_analyze(args)
        if args.verb == "sql":
            return cmd_sql(args)
        if args.verb == "guest":
            return cmd_guest(args)
        raise UsageError(f"unknown verb {args.verb}")
    except GuestFault as fault:
        sys.stdout.flush()
        sys.stderr.write(f"\nreplayvm: {fault}\n")
        return fault.exit_status
    except ReplayVMError as error:
        sys.stderr.write(f"replayvm: {error}\n")
        return error.exit_status
    except KeyboardInterrupt:
        sys.stderr.write("\nreplayvm: interrupted\n")
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:                 # a file-system error no verb foresaw: still one line
        where = f"{error.filename}: " if error.filename else ""
        sys.stderr.write(f"replayvm: {where}{error.strerror or error}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
