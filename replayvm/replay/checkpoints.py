"""Checkpoints of a replay: the vCPU, the replay's place in the trace, and RAM as page deltas.

A checkpoint lets the debugger go back in time: restore the nearest one before the wanted position
and re-execute forward (replay is deterministic, so the same instructions produce the same states).

RAM is kept as 4 KiB pages. A shadow copy holds RAM as it was at the newest checkpoint; the next
checkpoint compares RAM with it in C (`replayvm_dirty_pages`, ~memcmp speed) and keeps only the
pages that changed. Every FULL_EVERY-th checkpoint also keeps a complete page table (references to
page objects shared with earlier checkpoints, not copies), so restoring one is: write the pages of
the nearest full table, then apply at most FULL_EVERY - 1 deltas. Pages that were zero at every
checkpoint share one zero page and are not written back unless the guest has touched them since.

Checkpoints are only ever taken past the newest one: going back and forward again retraces the
recorded execution, so the shadow (RAM at the newest checkpoint) stays right.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

from typing import TYPE_CHECKING

from replayvm.engines.base import EngineSnapshot
from replayvm.engines.emu import ffi, lib

if TYPE_CHECKING:
    from replayvm.replay.replayer import ReplayPlace

PAGE = 4096
FULL_EVERY = 16
ZERO_PAGE = bytes(PAGE)


@dataclass
class Checkpoint:
    position: int
    cpu: EngineSnapshot                          # SnapshotEngine.save_cpu()
    replay: "ReplayPlace"                        # Replayer.save_state(): trace place, devices
    delta: dict[int, bytes]                      # pages changed since the previous checkpoint
    pages: list | None = None                    # every page (shared objects), every FULL_EVERY-th


@dataclass
class CheckpointStats:
    taken: int = 0
    dirty_pages: int = 0
    take_seconds: float = 0.0
    restores: int = 0
    restore_seconds: float = 0.0

    @property
    def delta_bytes(self) -> int:
        return self.dirty_pages * PAGE


class CheckpointStore:
    """The checkpoints of one replay, in position order (see the module docstring)."""

    def __init__(self, replayer) -> None:
        self.replayer = replayer
        self.engine = replayer.engine
        self.ram = replayer.ram
        self.npages = len(self.ram) // PAGE
        self._ram_ptr = ffi.from_buffer(self.ram.obj if hasattr(self.ram, "obj") else self.ram)
        self._dirty = ffi.new("uint32_t[]", self.npages)
        # The shadow starts as zeroes the OS has not even mapped yet; the first checkpoint's
        # compare copies in just the pages that are not zero, and only those need a page object.
        self._shadow = bytearray(len(self.ram))
        self._shadow_ptr = ffi.from_buffer(self._shadow)
        self._latest_pages: list = [ZERO_PAGE] * self.npages   # every page as of the newest checkpoint
        self._touched: set[int] = set()                          # pages that ever differed from zero
        self.checkpoints: list[Checkpoint] = []
        self._positions: list[int] = []
        self.stats = CheckpointStats()

    def _take_dirty(self) -> dict[int, bytes]:
        """Pages changed since the shadow was last brought up to date (and bring it up to date)."""
        count = lib.replayvm_dirty_pages(self._ram_ptr, self._shadow_ptr, self.npages, self._dirty, 1)
        shadow = memoryview(self._shadow)
        delta = {}
        for i in range(count):
            page = self._dirty[i]
            delta[page] = data = bytes(shadow[page * PAGE:(page + 1) * PAGE])
            self._latest_pages[page] = data
        self._touched.update(delta)
        return delta

    @property
    def newest(self) -> Checkpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None

    def take(self) -> Checkpoint:
        """A checkpoint at the engine's position, which must be past the newest one."""
        started = time.perf_counter()
        position = self.engine.position
        if self.checkpoints and position <= self.checkpoints[-1].position:
            raise ValueError(f"checkpoint at {position} is not past the newest ({self.checkpoints[-1].position})")
        delta = self._take_dirty()
        full = list(self._latest_pages) if len(self.checkpoints) % FULL_EVERY == 0 else None
        checkpoint = Checkpoint(position, self.engine.save_cpu(), self.replayer.save_state(), delta, full)
        self.checkpoints.append(checkpoint)
        self._positions.append(position)
        self.stats.taken += 1
        self.stats.dirty_pages += len(delta)
        self.stats.take_seconds += time.perf_counter() - started
        return checkpoint

    def adopt(self, position: int, cpu: EngineSnapshot, replay: "ReplayPlace", delta: dict[int, bytes]) -> None:
        """Append a checkpoint taken by an earlier replay of the same trace (a checkpoint file),
        as if it had been taken here; finish_adopting() then brings the shadow up to date."""
        latest = self._latest_pages
        for page, data in delta.items():
            latest[page] = data
        self._touched.update(delta)
        full = list(latest) if len(self.checkpoints) % FULL_EVERY == 0 else None
        self.checkpoints.append(Checkpoint(position, cpu, replay, delta, full))
        self._positions.append(position)

    def finish_adopting(self) -> None:
        shadow, latest = memoryview(self._shadow), self._latest_pages
        for page in self._touched:
            shadow[page * PAGE:(page + 1) * PAGE] = latest[page]

    def at_or_before(self, position: int) -> int:
        """Index of the newest checkpoint at or before `position` (there is always one at 0)."""
        return max(0, bisect.bisect_right(self._positions, position) - 1)

    def restore(self, index: int) -> Checkpoint:
        """Put the guest (RAM, vCPU) and the replay back to checkpoint `index`."""
        started = time.perf_counter()
        checkpoint = self.checkpoints[index]
        full_index = index - index % FULL_EVERY
        pages = self.checkpoints[full_index].pages
        assert pages is not None
        # Pages no checkpoint ever saw non-zero are zero in every checkpoint: of those, only the
        # ones written since the newest checkpoint (they differ from the shadow) need clearing.
        ram = self.ram
        count = lib.replayvm_dirty_pages(self._ram_ptr, self._shadow_ptr, self.npages, self._dirty, 0)
        for page in self._touched.union(self._dirty[i] for i in range(count)):
            ram[page * PAGE:(page + 1) * PAGE] = pages[page]
        for later in self.checkpoints[full_index + 1:index + 1]:
            for page, data in later.delta.items():
                ram[page * PAGE:(page + 1) * PAGE] = data
        self.engine.restore_cpu(checkpoint.cpu)
        self.replayer.restore_state(checkpoint.replay)
        self.stats.restores += 1
        self.stats.restore_seconds += time.perf_counter() - started
        return checkpoint


FINE_EVERY = 10_000          # instructions between fine checkpoints
FINE_SPAN = 50_000           # how far behind a reverse step's target fine checkpoints are taken


@dataclass
class FineCheckpoint:
    position: int
    cpu: EngineSnapshot
    replay: tuple
    pages: dict[int, bytes]      # every page that may differ from the trail's base checkpoint


class FineTrail:
    """Dense checkpoints just behind where the debugger steps backwards.

    A reverse step restores the nearest checkpoint and re-executes up to one interval (5 M
    instructions by default): fine for one step, slow for the hundreds of steps a gdb
    `reverse-next` makes. A trail starts at a checkpoint (its base), keeps the base's RAM as one
    image, and on the way to a reverse step's target takes a fine checkpoint every FINE_EVERY
    instructions over the last FINE_SPAN, holding only the pages that differ from the base. Going
    back to a fine checkpoint rewrites just the pages where RAM or the fine checkpoint differs
    from the base (both found by the C page compare), not all of RAM.

    Why compare rather than track writes with a hook: the MMU's accessed/dirty bit updates in
    page tables are memory writes no hook sees, and a debugger must not show a state that is
    almost the recorded one.
    """

    def __init__(self, store: CheckpointStore, base_index: int) -> None:
        self.store = store
        self.base_index = base_index
        base = store.checkpoints[base_index]
        self.base_position = base.position
        full_index = base_index - base_index % FULL_EVERY
        pages = list(store.checkpoints[full_index].pages)
        for later in store.checkpoints[full_index + 1:base_index + 1]:
            for page, data in later.delta.items():
                pages[page] = data
        self._base_image = bytearray(len(store.ram))         # zero pages stay untouched
        image = memoryview(self._base_image)
        for page in store._touched:
            image[page * PAGE:(page + 1) * PAGE] = pages[page]
        self._base_ptr = ffi.from_buffer(self._base_image)
        self._differing = ffi.new("uint32_t[]", store.npages)
        # The base itself is the first fine checkpoint, with no pages of its own.
        self.fines: list[FineCheckpoint] = [FineCheckpoint(base.position, base.cpu, base.replay, {})]
        self._positions: list[int] = [base.position]

    def _differing_from_base(self) -> list[int]:
        store = self.store
        count = lib.replayvm_dirty_pages(store._ram_ptr, self._base_ptr, store.npages, self._differing, 0)
        return [self._differing[i] for i in range(count)]

    def take(self) -> FineCheckpoint:
        store = self.store
        ram = store.ram
        pages = {page: bytes(ram[page * PAGE:(page + 1) * PAGE]) for page in self._differing_from_base()}
        fine = FineCheckpoint(store.engine.position, store.engine.save_cpu(),
                              store.replayer.save_state(), pages)
        index = bisect.bisect_left(self._positions, fine.position)
        self.fines.insert(index, fine)
        self._positions.insert(index, fine.position)
        return fine

    def has(self, position: int) -> bool:
        index = bisect.bisect_left(self._positions, position)
        return index < len(self._positions) and self._positions[index] == position

    def at_or_before(self, position: int) -> FineCheckpoint:
        return self.fines[max(0, bisect.bisect_right(self._positions, position) - 1)]

    def restore(self, fine: FineCheckpoint) -> None:
        store = self.store
        started = time.perf_counter()
        ram, base = store.ram, memoryview(self._base_image)
        for page in set(self._differing_from_base()).union(fine.pages):
            data = fine.pages.get(page)
            ram[page * PAGE:(page + 1) * PAGE] = base[page * PAGE:(page + 1) * PAGE] if data is None else data
        store.engine.restore_cpu(fine.cpu)
        store.replayer.restore_state(fine.replay)
        store.stats.restores += 1
        store.stats.restore_seconds += time.perf_counter() - started
