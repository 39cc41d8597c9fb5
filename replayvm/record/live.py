"""Going live (`replay --live`): a replay stopped at some point hands its machine to the world
and records on -- a recording that starts from a replay, so it lives with the recorder.

Replay runs the recorded machine with its real devices (replay.replayer), so wherever it stops,
the machine -- CPU, RAM, every device, what the guest wrote to its disks -- is in the state it had
at that point of the recording. Going live swaps the machine's input side back: the console (a
terminal or `--input`) types into the UART, the clock runs on from the replay's guest time, the
LAPIC's own timer fires again, and the disks hand out the sectors the trace showed them hand out,
or, for sectors the recording never read, the image given with `--disk` (checked against the
trace's hash). A new trace is recorded from there: a *branch*, whose header names its parent
trace and the position it went live at, and carries the devices' state, so the branch replays on
its own (`replayvm replay branch.zst`). With several CPUs the header carries every CPU
(`start_cpus`) and the live part takes its turns from a new scheduler from that position on.

What the branch's first state does not carry: the x87/SSE registers and MSRs (CpuState has the
general, segment and control registers), and the one-instruction interrupt shadow after `sti` or
`mov ss` -- seek to an event, not into such a shadow, to go live.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from replayvm.clock import GuestClock, VirtualClock
from replayvm.console import Console
from replayvm.devices.disk import TraceDisk
from replayvm.errors import UsageError
from replayvm.machine import RunOutcome
from replayvm.record.session import SessionOptions, check_trace_path, run_machine
from replayvm.replay.replayer import Replayer


def attach_images(replayer: Replayer, images: list[Path]) -> None:
    """Give the replayed disks their images, in IDE order (for sectors the recording never
    read), each checked against the trace's hash: done before the replay runs, so that a wrong
    image is refused at once."""
    disks = [disk for disk in replayer.machine.disks if isinstance(disk, TraceDisk)]
    if len(images) > len(disks):
        raise UsageError(f"the recording had {len(disks)} disk(s); {len(images)} --disk images given")
    for disk, image in zip(disks, images):
        if not image.is_file():
            raise UsageError(f"disk image not found: {image}")
        try:
            disk.attach_image(image)
        except ValueError as error:
            raise UsageError(str(error)) from None


def go_live(replayer: Replayer, options: SessionOptions, output: BinaryIO | None = None,
            parent_sha256: str | None = None, last_event: int | None = None) -> RunOutcome:
    """Continue the replayed guest live from where `replayer` stands (see the module docstring).
    The live part runs as `options` say (console, clock, timeout; `disks`: the recording's images,
    for sectors it never read; machine, engine and chaos are the recording's, without chaos).
    Records a branch trace when `options.trace` is given; returns how the live session ended."""
    if options.trace is not None:
        check_trace_path(options.trace)
    machine = replayer.machine
    if options.virtual_clock and not machine.engine.exact_positions:
        raise UsageError("--virtual-clock needs the emu engine")
    attach_images(replayer, options.disks)
    position = replayer.engine.position
    event = last_event + 1 if last_event is not None else replayer.events_done
    replayer.hand_over(last_event)
    console = Console(output if output is not None else sys.stdout.buffer, script=options.script,
                      prompt=options.prompt, until=options.until, interactive=options.interactive,
                      shown_before=bytes(replayer.console))
    machine.set_console(console)
    now = max(replayer.clock.now_ns(), replayer.latest_tsc)
    clock: GuestClock = VirtualClock(replayer.clock.epoch_s) if options.virtual_clock else GuestClock()
    clock.epoch_s = replayer.clock.epoch_s
    machine.set_clock(clock)
    clock.resume_at(now)
    branch = {"parent": {"trace": str(replayer.reader.path), "trace_sha256": parent_sha256,
                         "position": position, "event": event},
              "start_position": position, "devices": machine.save_devices(),
              "boot": replayer.header.get("boot", "disk"), "kernel": replayer.header.get("kernel")}
    if machine.cpus > 1:                      # the other CPUs, as the branch's replay starts them
        branch["start_cpus"] = machine.engine.start_cpus()      # type: ignore[attr-defined]
    session = replace(options, engine=machine.engine.name, chaos_seed=None)
    return run_machine(machine, session, branch=branch)


def replay_and_go_live(trace: Path, options: SessionOptions, seek: str | None = None,
                       output: BinaryIO | None = None, checkpoint_every: int | None = None,
                       keep_checkpoints: bool = True) -> tuple[RunOutcome, int]:
    """Replay `trace` to `seek` (an event number or i<position>; None: the recording's end),
    verifying it on the way, then go live there. Returns the live outcome and the position."""
    from replayvm.replay.checkpoint_file import trace_digest
    from replayvm.replay.positions import parse_position
    from replayvm.replay.timeline import DEFAULT_CHECKPOINT_EVERY, Timeline
    from replayvm.trace.reader import check_unaltered

    check_unaltered(trace)
    if options.trace is not None:
        check_trace_path(options.trace)              # before the replay, not after it
    point = None if seek is None else parse_position(seek, "--seek")
    if point is not None and not point.is_event:       # a position: through checkpoints
        timeline = Timeline(trace, checkpoint_every=checkpoint_every or DEFAULT_CHECKPOINT_EVERY,
                            output=output, keep_checkpoints=keep_checkpoints)
        replayer = timeline.replayer
        try:
            attach_images(replayer, options.disks)
            timeline.seek(min(point.count, timeline.end))
            timeline.save_checkpoints()
        except BaseException:
            timeline.close()
            raise
        closer = timeline.close
        last_event = None
    else:
        # An event: replay stops right after it, before whatever the recording did next at the
        # same position (typed input handed over at a halt shares the halt's position).
        last_event = None if point is None else point.count
        replayer = Replayer(trace, output=output, until_event=last_event)
        closer = replayer.close
        try:
            attach_images(replayer, options.disks)
            reached = replayer.run_to(None)
            if reached not in ("end", "stopped"):
                raise UsageError(f"{trace}: the replay stopped before reaching the point to go live at")
            if last_event is not None and not replayer.stopped_early:
                raise UsageError(f"{trace}: --seek {last_event} is past the end: the trace has "
                                 f"{replayer.events_done} events")
            if last_event is None and replayer.footer is None:
                raise UsageError(f"{trace} was cut short (its recorder stopped before the footer): "
                                 f"its end is not a point to go live at; --seek to one of its events")
        except BaseException:
            replayer.close()
            raise
    try:
        footer = replayer.footer or {}
        if replayer.at_recorded_end and footer.get("end") in ("fault", "unsupported", "shutdown"):
            raise UsageError(f"{trace}: the recording ended with the guest's {footer.get('end')} "
                             f"({footer.get('detail')}): nothing to go live from there")
        position = replayer.engine.position
        outcome = go_live(replayer, options, output=output, parent_sha256=trace_digest(trace),
                          last_event=last_event)
        return outcome, position
    finally:
        closer()
