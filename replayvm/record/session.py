"""Running a guest session: the Python API behind `replayvm record`.

A session boots the guest with its console and, when given a trace path, records it: the header
(machine, disks, initial RAM and CPU state) first, every event while it runs, and a footer with
counts and the final state when it ends -- also when the guest dies.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from replayvm import __version__, hw
from replayvm.console import Console
from replayvm.devices.disk import MISSING_SECTOR_END, MissingSector
from replayvm.errors import GuestFault, TraceWriteError, UsageError
from replayvm.machine import Machine, MachineConfig, RunOutcome
from replayvm.record.recorder import Recorder, initial_ram_pages, ram_digest
from replayvm.trace.format import FEATURE_ASPACE, FEATURE_KVM_SMP, FEATURE_PC, FEATURE_SMP, FEATURE_X86_64
from replayvm.trace.records import RAM_PAGE
from replayvm.trace.writer import TraceWriter


@dataclass
class SessionOptions:
    disks: list[Path] = field(default_factory=list)
    kernel: Path | None = None
    ram_mib: int = hw.DEFAULT_RAM_MIB
    engine: str = "emu"                  # already resolved: "kvm" or "emu"
    script: bytes | None = None          # --input, escapes decoded
    prompt: bytes = b"$ "
    until: bytes | None = None
    timeout_s: float | None = None
    interactive: bool = False
    virtual_clock: bool = False
    trace: Path | None = None
    command_line: list[str] = field(default_factory=list)
    chaos_seed: int | None = None
    cpus: int = 1                        # several: the trace is format 3.0 with feature "smp"
    machine: str = "mp"                  # hw.MACHINE_KINDS
    x86_64: bool = False                 # a 64-bit guest booted from disk (an ELF64 kernel says so itself)


def bundled_demo_disk() -> Path:
    """The demo guest's disk image, built from `guests/demo` on first use."""
    from replayvm.guests import guest_file

    return guest_file("demo", "disk.img")


def run_session(options: SessionOptions, output: BinaryIO | None = None) -> tuple[RunOutcome, Machine]:
    """Boot the guest, run it until the session ends (recording it if asked), return how it ended."""
    if options.trace is not None:
        check_trace_path(options.trace)
    console = Console(output if output is not None else sys.stdout.buffer, script=options.script,
                      prompt=options.prompt, until=options.until, interactive=options.interactive)
    disks = list(options.disks)
    if not disks and options.kernel is None:
        disks = [bundled_demo_disk()]
    config = MachineConfig(disks=disks, kernel=options.kernel, ram_mib=options.ram_mib,
                           engine=options.engine, virtual_clock=options.virtual_clock,
                           chaos_seed=options.chaos_seed, cpus=options.cpus, machine=options.machine,
                           x86_64=options.x86_64)
    try:
        machine = Machine(config, console)
    except BaseException:
        console.close()
        raise
    try:
        outcome = run_machine(machine, options)
    finally:
        machine.close()
    return outcome, machine


def run_machine(machine: Machine, options: SessionOptions, branch: dict | None = None) -> RunOutcome:
    """Run `machine` until the session ends, recording it into `options.trace` if given (a
    `branch`: the header fields of a trace that goes live from a replay, see record.live). The
    trace gets its footer however the run ends; a write failure ends the session."""
    recording = None
    watcher = None
    outcome: RunOutcome | None = None
    end_detail = "the recorder stopped"             # unless the run ends with an outcome or a fault
    try:
        if options.trace is not None:
            recording = start_recording(machine, options, branch=branch)
            watcher = _WriteFailureWatch(recording[0], machine.console)
        try:
            outcome = machine.run(timeout_s=options.timeout_s)
        except MissingSector as missing:         # a live guest read what its trace lacks
            outcome = RunOutcome(MISSING_SECTOR_END, machine.clock.now_ns(), machine.engine.position,
                                 str(missing))
            raise UsageError(str(missing)) from None
    except GuestFault as fault:
        end_detail = str(fault).splitlines()[0]
        raise
    finally:
        if watcher is not None:
            watcher.stop()
        if recording is not None:
            finish_recording(machine, *recording, outcome.reason if outcome else "fault",
                             outcome.detail if outcome else end_detail)
    return outcome


class _WriteFailureWatch:
    """Ends the session soon after the trace stops being written (a full disk, an I/O error):
    a person at the console must not go on believing the session is recorded."""

    POLL_S = 0.1

    def __init__(self, writer: TraceWriter, console: Console) -> None:
        self.writer = writer
        self.console = console
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="trace-write-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(self.POLL_S):
            if self.writer.error is not None:
                self.console.request_quit()
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def check_trace_path(path: Path) -> None:
    """Refuse, before booting, a trace path that cannot be a new file (one line, not a traceback)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"trace path {path} is a folder")
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"cannot write trace {path}: folder {folder} does not exist")


def start_recording(machine: Machine, options: SessionOptions, branch: dict | None = None,
                    ) -> tuple[TraceWriter, Recorder, float]:
    """Write the header and the initial RAM, and attach a recorder. A `branch` (replay --live)
    adds the header fields of a trace that starts inside another: parent, start_position,
    devices; its initial state is the CPU's now."""
    header = {
        "format": "replayvm-trace", "replayvm": __version__, "engine": machine.engine.name,
        "position_unit": machine.engine.position_unit,
        "ram_bytes": len(machine.ram),
        "cpuid": [list(entry) for entry in machine.engine.cpuid_table],
        "boot": "multiboot" if options.kernel is not None else "disk",
        "kernel": str(options.kernel) if options.kernel is not None else None,
        "disks": [{"name": disk.name, "path": str(disk.path) if disk.path else None,
                   "sha256": disk.sha256(), "sectors": disk.sector_count} for disk in machine.disks],
        "command_line": options.command_line, "start_time": time.time(),
        "clock": "virtual" if options.virtual_clock else "wall",
        "chaos_seed": options.chaos_seed,
        "initial_state": machine.boot_state.to_dict(),
    }
    # Every recording gives each event's address space (ASPACE records), so every trace names a
    # feature (format 3.0): a reader that does not know ASPACE refuses it in one line.
    features = [FEATURE_ASPACE]
    if machine.cpus > 1:
        features.append(FEATURE_SMP)
        header["cpus"] = machine.cpus
        if not machine.engine.exact_positions:   # kvm: SWITCH records may carry landmarks
            features.append(FEATURE_KVM_SMP)
    if machine.config.machine == "pc":
        features.append(FEATURE_PC)
    if machine.x86_64:
        features.append(FEATURE_X86_64)
    header["features"] = features            # older readers must refuse it (format 3.0)
    start_position = 0
    if branch is not None:
        header.update(branch)
        header["initial_state"] = machine.engine.get_state().to_dict()
        start_position = int(branch["start_position"])
    try:
        writer = TraceWriter(options.trace, header)
    except OSError as error:                 # read-only, no permission, disk full at the header
        raise UsageError(f"cannot write trace {options.trace}: {error.strerror or error}") from None
    for number, page in initial_ram_pages(machine.ram):
        writer.append(RAM_PAGE.build(number, page))
    recorder = Recorder(machine, writer, start_position=start_position)
    machine.halt_observers.append(recorder.halted)
    return writer, recorder, time.monotonic()


def finish_recording(machine: Machine, writer: TraceWriter, recorder: Recorder, started: float,
                     reason: str, detail: str) -> None:
    recorder.finish()
    engine = machine.engine
    try:
        final_state = engine.get_state().to_dict()
    except Exception as error:               # the footer must still be written
        final_state = {"error": str(error)}
    lapic_id_reads = recorder.lapic_id_reads_logged_away + engine.pure_reads
    footer = {
        "end": reason, "detail": detail, "counts": dict(recorder.counts),
        "interrupt_sources": dict(recorder.interrupt_sources),
        "instructions": engine.icount, "position": engine.position,
        "guest_ns": machine.clock.now_ns(), "wall_s": time.monotonic() - started,
        "lapic_id_reads": lapic_id_reads, "final_state": final_state,
        "ram_sha256": ram_digest(machine.ram),
        "console_sha256": hashlib.sha256(bytes(machine.console.transcript)).hexdigest(),
    }
    if machine.cpus > 1:
        try:
            footer["cpu_states"] = engine.cpu_states()
        except Exception as error:           # the footer must still be written
            footer["cpu_states"] = [{"error": str(error)}] * machine.cpus
    try:
        writer.close(footer=footer)
    except OSError as error:                 # e.g. the disk filled up while the guest ran
        raise TraceWriteError(
            f"trace {writer.path}: writing failed ({error.strerror or error}) after "
            f"{writer.bytes_written:,} bytes, and the session was ended; what was written before "
            f"replays as a trace cut short") from None
