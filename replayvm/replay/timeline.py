"""A replay you can move along: step, continue to breakpoints and watchpoints, seek to any
instruction count, and go backwards (reverse step, reverse continue).

Positions are instruction counts (emu traces). Every stop is *settled*: whatever the recording did
at that count (an interrupt, an exception) has been delivered, so EIP is the next instruction to
execute and a position names exactly one CPU state. Going back restores the nearest checkpoint at
or before the target and re-executes forward; checkpoints are taken every `checkpoint_every`
instructions the first time the replay passes there (replay.checkpoints).

The replayer under the timeline answers the guest from the trace and checks its writes as usual:
a divergence while moving along the timeline is raised as for a plain replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from replayvm.engines.registry import engine_class
from replayvm.engines.base import DebugEngine, DebugStop, SnapshotEngine
from replayvm.errors import UsageError
from replayvm.replay import checkpoint_file
from replayvm.replay.checkpoints import FINE_EVERY, FINE_SPAN, CheckpointStore, FineTrail
from replayvm.replay.replayer import Replayer
from replayvm.trace.format import POSITIONED
from replayvm.trace.reader import TraceReader
from replayvm.trace.records import DPOS_INDEX

DEFAULT_CHECKPOINT_EVERY = 5_000_000       # instructions between checkpoints
INTERRUPT_CHUNK = 2_000_000                # how far a run goes between looks for Ctrl-C (or progress)

WATCH_READ = 1
WATCH_WRITE = 2
WATCH_ACCESS = 3


@dataclass
class Stop:
    """Why the timeline stopped: "step", "break", "watch", "seek", "end" (the recording's end),
    "begin" (reverse execution reached the start) or "interrupted" (the debugger asked)."""

    reason: str
    position: int
    address: int | None = None            # breakpoint PC, or the data address a watchpoint saw


class Timeline:
    def __init__(self, trace: Path, checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                 output: BinaryIO | None = None, keep_checkpoints: bool = False) -> None:
        with TraceReader(trace) as reader:
            recorded_on = str(reader.header.get("engine"))
        engine_type = engine_class(recorded_on)
        if not engine_type.exact_positions:
            raise UsageError(f"{trace}: recorded on {recorded_on}; stepping, seeking and reverse "
                             f"execution need a trace recorded on emu (positions on {recorded_on} "
                             f"are {engine_type.position_unit}, and it has no checkpoints or exact "
                             f"breakpoints)")
        if checkpoint_every < 1:
            raise UsageError("the checkpoint interval must be at least one instruction")
        self.replayer = Replayer(trace, seekable=True)
        engine = self.replayer.engine
        assert isinstance(engine, DebugEngine) and isinstance(engine, SnapshotEngine)
        self.trace = Path(trace)
        self.engine: DebugEngine = engine
        self.every = checkpoint_every
        self.output = output
        self._shown = 0
        self.breakpoints: set[int] = set()
        self.watches: set[tuple[int, int, int]] = set()          # (address, length, access)
        self.interrupt_check: Callable[[], bool] | None = None
        self.progress: Callable[[], None] | None = None    # called between pieces of a long run
        self._event_positions, self._end, self.complete = self._scan_events()
        self.checkpoints = CheckpointStore(self.replayer)
        self.checkpoints.take()
        self._trail: FineTrail | None = None
        self._reverse_stepped_to: int | None = None    # where the last reverse step landed
        self.checkpoint_file: Path | None = None
        self.trace_sha256 = ""                     # known when checkpoints are kept
        self.checkpoints_loaded = 0
        self.checkpoint_file_note = ""
        if keep_checkpoints:
            self._load_checkpoints()

    # ---------------------------------------------------------------- checkpoints kept in a file
    def _load_checkpoints(self) -> None:
        """Adopt the checkpoints an earlier run kept for this trace (replay.checkpoint_file)."""
        self.trace_sha256 = checkpoint_file.trace_digest(self.trace)
        self.checkpoint_file = checkpoint_file.cache_path(self.trace_sha256)
        if not self.checkpoint_file.exists():
            return
        try:
            self.checkpoints_loaded = checkpoint_file.load(self, self.checkpoint_file)
        except checkpoint_file.CheckpointFileError as error:
            self.checkpoint_file_note = f"ignored the kept checkpoints ({error})"

    def save_checkpoints(self) -> bool:
        """Keep this timeline's checkpoints for the next run, if it took new ones."""
        if self.checkpoint_file is None or len(self.checkpoints.checkpoints) - 1 <= self.checkpoints_loaded:
            return False
        checkpoint_file.save(self, self.checkpoint_file)
        return True

    # ---------------------------------------------------------------- where we are
    @property
    def position(self) -> int:
        return self.engine.position

    @property
    def end(self) -> int:
        """The last position the replay can reach: where the recording ended, or for a trace cut
        short, its last event."""
        return self._end

    @property
    def events_done(self) -> int:
        """How many of the trace's events the replay has consumed so far."""
        return self.replayer._index - (1 if self.replayer.next is not None else 0)

    def when(self) -> str:
        done = self.events_done
        last = f"after event {done - 1}" if done else "before event 0"
        return f"instruction {self.position} of {self.end}, {last} (of {len(self._event_positions)})"

    def _scan_events(self) -> tuple[list[int], int, bool]:
        """One pass over the trace: every event's position, where the recording ended, and
        whether it has its footer (False: the recorder was stopped before it finished)."""
        positions, position = [], 0
        with TraceReader(self.trace) as reader:
            for record in reader:
                if record[0] in POSITIONED:
                    position += record[DPOS_INDEX]
                    positions.append(position)
            footer = reader.footer
        end = int(footer.get("position") or position) if footer else position
        return positions, end, footer is not None

    def event_position(self, index: int) -> int:
        """The position of event `index` (numbered from 0, as `replay --until` and analysis do)."""
        if not 0 <= index < len(self._event_positions):
            raise UsageError(f"no event {index}: the trace has {len(self._event_positions)}")
        return self._event_positions[index]

    # ---------------------------------------------------------------- moving forward
    def cont(self) -> Stop:
        """Run forward to the next breakpoint or watchpoint, or the end of the recording."""
        self._arm(True, skip_current=True)
        return self._stop(self._forward(None, interruptible=True))

    def step(self, count: int = 1) -> Stop:
        """Execute `count` instructions (a watchpoint still stops a step early)."""
        self._arm(True, skip_current=True)
        return self._stop(self._forward(self.position + count, interruptible=False))

    def seek(self, position: int) -> Stop:
        """Go to `position` (clamped to the recording), backwards or forwards, breakpoints ignored."""
        position = min(max(0, position), self.end)
        index = self.checkpoints.at_or_before(position)
        checkpoint = self.checkpoints.checkpoints[index]
        if position < self.position or checkpoint.position > self.position:
            self.checkpoints.restore(index)
        self._arm(False, skip_current=False)
        self._forward(position, interruptible=False)
        return Stop("seek", self.position)

    # ---------------------------------------------------------------- moving backward
    def reverse_step(self) -> Stop:
        """Back one instruction: from a fine checkpoint just behind when there is one (the
        second and later steps of a row of them), else from a checkpoint along a new trail."""
        if self.position == 0:
            return Stop("begin", 0)
        target = self.position - 1
        in_a_row = self._reverse_stepped_to == self.position
        self._reverse_stepped_to = target
        if not in_a_row and (self._trail is None or self._trail.at_or_before(target) is self._trail.fines[0]):
            self.seek(target)                      # a lone step: a trail would cost more than it saves
            self._reverse_stepped_to = target
            return Stop("step", self.position)
        index = self.checkpoints.at_or_before(target)
        trail = self._trail
        if trail is None or trail.base_index != index:
            trail = self._trail = FineTrail(self.checkpoints, index)
        trail.restore(trail.at_or_before(target))      # the base at worst
        self._arm(False, skip_current=False)
        lower = max(target - FINE_SPAN, trail.base_position)
        lower += -lower % FINE_EVERY
        while self.position < target:
            grid = self.position + 1
            grid = max(grid + -grid % FINE_EVERY, lower)
            if grid >= target:
                self._forward(target, interruptible=False)
                break
            self._forward(grid, interruptible=False)
            if not trail.has(grid):
                trail.take()
        return Stop("step", self.position)

    def reverse_continue(self) -> Stop:
        """Go back to the latest breakpoint or watchpoint hit before here, or to the start."""
        here = self.position
        index = self.checkpoints.at_or_before(max(0, here - 1))
        while here > 0 and index >= 0:
            hits = self._hits(index, here)
            if hits:
                position, reason, address = hits[-1]
                self.seek(position)
                return Stop(reason, self.position, address)
            here = self.checkpoints.checkpoints[index].position
            index -= 1
        self.seek(0)
        return Stop("begin", 0)

    def _hits(self, index: int, before: int) -> list[tuple[int, str, int]]:
        """Breakpoint and watchpoint hits from checkpoint `index` up to position `before`."""
        self.checkpoints.restore(index)
        self._arm(True, skip_current=False)
        hits = []
        while self._forward(before, interruptible=False) == "debug":
            hit = self.engine.take_debug_hit()
            position = self.position
            if hit.kind is DebugStop.BREAK and position < before:
                hits.append((position, "break", self.engine.linear_pc()))
            elif hit.kind is DebugStop.WATCH and position <= before:
                hits.append((position - 1, "watch", hit.address))   # in reverse: before the access
            self.engine.resume_here()
        return hits

    # ---------------------------------------------------------------- machinery
    def _arm(self, on: bool, skip_current: bool) -> None:
        engine = self.engine
        engine.set_breakpoints(sorted(self.breakpoints) if on else [])
        engine.set_watchpoints(sorted(self.watches) if on else [])
        engine.take_debug_hit()
        if skip_current:
            engine.resume_here()
        else:
            engine.resume_anywhere()

    def _forward(self, limit: int | None, interruptible: bool) -> str:
        """run_to in pieces, taking a checkpoint at each interval boundary passed for the first time."""
        engine = self.engine
        while True:
            newest = self.checkpoints.newest.position
            boundary = newest + self.every
            piece = limit
            if engine.position >= newest:
                piece = boundary if piece is None else min(piece, boundary)
            if interruptible and self.interrupt_check is not None or self.progress is not None:
                chunk = engine.position + INTERRUPT_CHUNK
                piece = chunk if piece is None else min(piece, chunk)
            outcome = self.replayer.run_to(piece)
            if outcome == "limit" and engine.position == boundary:
                self.checkpoints.take()
            self._show_console()
            if self.progress is not None:
                self.progress()
            if outcome != "limit":
                return outcome
            if limit is not None and engine.position >= limit:
                return "limit"
            if interruptible and self.interrupt_check is not None and self.interrupt_check():
                return "interrupted"

    def _stop(self, outcome: str) -> Stop:
        if outcome == "debug":
            hit = self.engine.take_debug_hit()
            if hit.kind is DebugStop.WATCH:
                return Stop("watch", self.position, hit.address)
            return Stop("break", self.position, self.engine.linear_pc())
        if outcome == "limit":
            return Stop("step", self.position)
        return Stop(outcome, self.position)

    def _show_console(self) -> None:
        """Print console output the first time the replay produces it (not again after going back)."""
        console = self.replayer.console
        if self.output is not None and len(console) > self._shown:
            self.output.write(bytes(console[self._shown:]))
            self.output.flush()
            self._shown = len(console)

    # ---------------------------------------------------------------- state for the debugger
    def registers(self):
        return self.engine.get_state()

    @property
    def x86_64(self) -> bool:
        """Whether the trace's guest is 64-bit (its header names the x86-64 feature)."""
        return self.replayer.machine.x86_64

    def read_memory(self, address: int, length: int) -> bytes:
        """Guest-virtual memory through the guest's page tables (GuestAddressFault where an
        address does not translate to RAM)."""
        return self.engine.read_memory(address, length)

    def close(self) -> None:
        self.replayer.close()

