"""Checkpoints kept between runs, so that `replay --seek` and a gdb session start fast on a trace
that has been replayed before.

A file per trace, in the cache (`$REPLAYVM_CACHE/checkpoints/<trace sha256>.ckpt`, default
`~/.cache/replayvm`): "RVMCKPT" and a format byte, then one zstd stream of msgpack objects: a
header (the trace's sha256, RAM size, checkpoint interval, Unicorn version, the vCPU context of
position 0), then one map per checkpoint (position, the vCPU as a map of EngineSnapshot's
fields -- with several CPUs, every CPU's context and state --, place in the trace, changed RAM pages), then the console and input the replay had produced.

Unicorn's vCPU context is a copy of QEMU's CPU state, and a few of its bytes are pointers into the
process that saved it. They are found by comparing the position-0 context saved in the file with
the one this process has at position 0 (same guest state, different process): where those differ,
this process's bytes are used. Anything wrong with a file (another trace, another version, a
damaged stream) makes it ignored and rebuilt, never trusted: it is a cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Protocol

import msgpack
import zstandard

from replayvm.engines.base import EngineSnapshot
from replayvm.replay.checkpoints import CheckpointStore
from replayvm.replay.replayer import DueInput, Event, ReplayPlace, Replayer
from replayvm.trace.format import Kind

# 4: named vCPU fields (EngineSnapshot) and the device state; 5: EngineSnapshot.cpus (several CPUs);
# 6: the events' address spaces and the trace reading's CPU and CR3s (feature "aspace")
MAGIC = b"RVMCKPT\x06"
MAX_OBJECT = 512 << 20


class KeptTimeline(Protocol):
    """What saving and loading read of a timeline (`replay.timeline.Timeline` is one). Declared
    here rather than imported: the timeline imports this module, and an import back would be a
    circle (tests/test_layers.py)."""

    checkpoints: CheckpointStore
    replayer: Replayer
    every: int                       # instructions between checkpoints
    trace_sha256: str

    @property
    def position(self) -> int: ...


def trace_digest(trace: Path) -> str:
    digest = hashlib.sha256()
    with open(trace, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_path(digest: str) -> Path:
    """Where the checkpoints of the trace with this sha256 are kept."""
    from replayvm.guests import cache_root

    return cache_root() / "checkpoints" / f"{digest[:32]}.ckpt"


def _event(event: Event | None) -> list | None:
    return None if event is None else [event.index, int(event.kind), event.position, event.record, event.cr3]


def _unevent(data: list | None) -> Event | None:
    return None if data is None else Event(data[0], Kind(data[1]), data[2], data[3], data[4])


def _replay_state(place: ReplayPlace) -> dict:
    return {"cursor": place.cursor, "position": place.position, "index": place.index,
            "next": _event(place.next), "recent": [_event(e) for e in place.recent],
            "run_data": place.run_data, "run_offset": place.run_offset, "run_event": _event(place.run_event),
            "console": place.console, "inputs": place.inputs, "mismatches": place.mismatches,
            "landmark_reached": place.landmark_reached, "stopped_early": place.stopped_early,
            "due_inputs": [[d.index, d.position, d.data] for d in place.due_inputs],
            "disk_reads": [list(r) for r in place.disk_reads], "latest_tsc": place.latest_tsc,
            "devices": place.devices, "trace_cpu": place.trace_cpu,
            "trace_cr3": [list(pair) for pair in place.trace_cr3]}


def _unreplay_state(data: dict) -> ReplayPlace:
    return ReplayPlace(
        cursor=data["cursor"], position=data["position"], index=data["index"], next=_unevent(data["next"]),
        recent=tuple(_unevent(e) for e in data["recent"]), run_data=data["run_data"],
        run_offset=data["run_offset"], run_event=_unevent(data["run_event"]), console=data["console"],
        inputs=data["inputs"], mismatches=data["mismatches"], landmark_reached=data["landmark_reached"],
        stopped_early=data["stopped_early"],
        due_inputs=tuple(DueInput(i, p, bytes(d)) for i, p, d in data["due_inputs"]),
        disk_reads=tuple((disk, lba, bytes(digest)) for disk, lba, digest in data["disk_reads"]),
        latest_tsc=data["latest_tsc"], devices=data["devices"], trace_cpu=data["trace_cpu"],
        trace_cr3=tuple((cpu, cr3) for cpu, cr3 in data["trace_cr3"]))


def _header(timeline: KeptTimeline) -> dict:
    import unicorn

    from replayvm import __version__

    first = timeline.checkpoints.checkpoints[0]
    return {"trace_sha256": timeline.trace_sha256, "ram_bytes": len(timeline.replayer.ram),
            "every": timeline.every, "unicorn": unicorn.__version__, "replayvm": __version__,
            "counters_size": len(first.cpu.counters), "context0": first.cpu.context}


def save(timeline: KeptTimeline, path: Path) -> None:
    """Write every checkpoint of `timeline` to `path` (atomically: a temporary file renamed)."""
    store = timeline.checkpoints
    replayer = timeline.replayer
    replayer._remember_output()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    packer = msgpack.Packer(use_bin_type=True)
    with open(temporary, "wb") as raw:
        raw.write(MAGIC)
        with zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
            out.write(packer.pack(_header(timeline)))
            for checkpoint in store.checkpoints[1:]:
                out.write(packer.pack({
                    "position": checkpoint.position,
                    "cpu": checkpoint.cpu.to_dict(),
                    "replay": _replay_state(checkpoint.replay),
                    "delta": [[page, data] for page, data in checkpoint.delta.items()],
                }))
            out.write(packer.pack({"console": replayer._console_seen,
                                   "inputs": replayer._inputs_seen}))
    os.replace(temporary, path)


def _in_this_process(context: bytes, here: bytes, process_bytes: list[int]) -> bytes:
    """A vCPU context from the file with this process's pointers (see the module docstring)."""
    fixed = bytearray(context)
    for i in process_bytes:
        fixed[i] = here[i]
    return bytes(fixed)


class CheckpointFileError(Exception):
    pass


def load(timeline: KeptTimeline, path: Path) -> int:
    """Adopt the checkpoints in `path` into a timeline that is still at position 0; returns how
    many. Raises CheckpointFileError (and adopts nothing) when the file does not fit."""
    store = timeline.checkpoints
    if len(store.checkpoints) != 1 or timeline.position != 0:
        raise CheckpointFileError("checkpoints are adopted by a new timeline only")
    try:
        with open(path, "rb") as raw:
            if raw.read(len(MAGIC)) != MAGIC:
                raise CheckpointFileError("not a replayvm checkpoint file of this version")
            reader = zstandard.ZstdDecompressor().stream_reader(raw)
            unpacker = msgpack.Unpacker(reader, raw=False, strict_map_key=False,
                                        max_buffer_size=MAX_OBJECT)
            header = next(unpacker)
            expected = _header(timeline)
            for key in ("trace_sha256", "ram_bytes", "every", "unicorn", "replayvm", "counters_size"):
                if header.get(key) != expected[key]:
                    raise CheckpointFileError(f"made for another {key}")
            here, there = expected["context0"], header["context0"]
            if len(here) != len(there):
                raise CheckpointFileError("vCPU context of another size")
            process_bytes = [i for i in range(len(here)) if here[i] != there[i]]
            loaded = []
            output = None
            for item in unpacker:
                if "console" in item:
                    output = item
                    break
                cpu = EngineSnapshot.from_dict(item["cpu"])
                if len(cpu.context) != len(here) or len(cpu.counters) != header["counters_size"]:
                    raise CheckpointFileError("a checkpoint of another size")
                others = cpu.cpus
                if others is not None:           # the other CPUs' contexts: the same fix-up
                    if any(c is not None and len(c) != len(here) for c in others["contexts"]):
                        raise CheckpointFileError("a checkpoint of another size")
                    others = {**others, "contexts": [None if c is None else _in_this_process(c, here, process_bytes)
                                                     for c in others["contexts"]]}
                loaded.append((item["position"],
                               dataclasses.replace(cpu, context=_in_this_process(cpu.context, here, process_bytes),
                                                   cpus=others),
                               _unreplay_state(item["replay"]), {p: d for p, d in item["delta"]}))
            if output is None:
                raise CheckpointFileError("the file ends early")
    except (OSError, ValueError, KeyError, IndexError, TypeError, StopIteration,
            zstandard.ZstdError, msgpack.exceptions.ExtraData) as error:
        raise CheckpointFileError(f"unreadable ({error.__class__.__name__})") from None
    for position, cpu, replay_state, delta in loaded:
        store.adopt(position, cpu, replay_state, delta)
    store.finish_adopting()
    replayer = timeline.replayer
    replayer._console_seen = bytes(output["console"])
    replayer._inputs_seen = [bytes(b) for b in output["inputs"]]
    return len(loaded)
