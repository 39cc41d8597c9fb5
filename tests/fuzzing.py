"""Trace mutants for the fuzz test (tests/test_trace_fuzz.py) and bench/fuzz_trace.py.

A mutant is a trace file changed the way damage or an attacker would change it:
- raw: bytes flipped, the file cut short, bytes inserted or deleted (frame checksums then fail);
- re-encoded with valid frame checksums: frames decompressed, records decoded and changed (a
  field's value or type, the kind, the arity, records dropped, duplicated or swapped, bytes of a
  frame body flipped), packed, compressed and given correct CRCs again;
- tampered: re-encoded, every record still well typed, but what the guest saw changed (a read
  value, an interrupt's vector or position, a typed byte, a clock value). These must never replay
  verified: the record digest (format 1.1) reports them as altered, a replay as divergent.

`run_verbs` puts a mutant through `info`, `analyze` and `replay` (the Python APIs) and classifies
what happened. A replay is bounded by position (`until_position`), never by wall time: a replay
that reaches the bound without the trace ending is counted as a hang.
"""

from __future__ import annotations

import copy
import random
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import zstandard

from replayvm.errors import ReplayVMError
from replayvm.trace.format import Kind, TraceAlteredError
from tests.asm import ENTER_FLAT_PM32, FLAT_GDT
from tests.trace_tools import frame, split_frames, unpack

INTERESTING = [0, 1, -1, 7, 255, 256, 0xFFFF, 0x10000, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63,
               (1 << 64) - 1, -(1 << 63), 1.5, float("nan"), "", "x" * 70, "timer", b"", b"\0" * 16,
               b"x" * 513, None, True, [], [1, 2], [[b"\1" * 16]], {}, {"a": 1}, {"rip": 1 << 70 >> 7},
               {"a": {"b": [b"x"]}}]
RAW = ("flip", "truncate", "insert", "delete")
RECORD = ("field", "kind", "drop_field", "add_field", "drop_record", "dup_record", "swap_records",
          "nest", "body_flip", "map_field")
TAMPER = ("read_value", "interrupt_vector", "interrupt_position", "input_byte", "clock_value")


@dataclass
class Mutant:
    name: str
    data: bytes
    tampered: bool = False           # semantic: must not replay verified, must not pass `info`


@dataclass
class Tally:
    """What happened to the mutants, per verb; every list must stay empty."""

    mutants: int = 0
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)
    tracebacks: list[str] = field(default_factory=list)
    multiline: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    tampered_verified: list[str] = field(default_factory=list)
    tampered: int = 0

    def add(self, mutant: Mutant, results: dict[str, str]) -> None:
        self.mutants += 1
        self.tampered += mutant.tampered
        for verb, result in results.items():
            kind = result.split(":", 1)[0]
            self.outcomes.setdefault(verb, {}).setdefault(kind, 0)
            self.outcomes[verb][kind] += 1
            if kind == "traceback":
                self.tracebacks.append(f"{mutant.name} {verb}: {result}")
            elif kind == "multiline":
                self.multiline.append(f"{mutant.name} {verb}: {result}")
            elif kind == "bounded":
                self.hangs.append(f"{mutant.name} {verb}")
        if mutant.tampered and (results.get("replay") == "verified" or results.get("info") == "ok"):
            self.tampered_verified.append(f"{mutant.name}: {results}")


# ---------------------------------------------------------------- making mutants
def _records(data: bytes) -> tuple[bytes, list[list]]:
    file_header, bodies = split_frames(data)
    return file_header, [unpack(body) for body in bodies]


def _encode(file_header: bytes, frames: list[list], bodies: dict[int, bytes] | None = None) -> bytes:
    packer = msgpack.Packer(use_bin_type=True)
    compressor = zstandard.ZstdCompressor(level=1)
    out = bytearray(file_header)
    for i, records in enumerate(frames):
        body = (bodies or {}).get(i)
        if body is None:
            body = b"".join(packer.pack(r) for r in records)
        out += frame(compressor.compress(body))
    return bytes(out)


def _pick(rng: random.Random, frames: list[list], kinds: set[int] | None = None,
          first_frame: int = 1) -> tuple[int, int] | None:
    """(frame, index) of a random record (of one of `kinds`), None when there is none."""
    spots = [(f, i) for f in range(first_frame, len(frames)) for i, r in enumerate(frames[f])
             if kinds is None or (isinstance(r, list) and r and r[0] in kinds)]
    return rng.choice(spots) if spots else None


def raw_mutant(data: bytes, rng: random.Random) -> Mutant:
    how = rng.choice(RAW)
    out = bytearray(data)
    if how == "flip":
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] ^= rng.randint(1, 255)
    elif how == "truncate":
        del out[rng.randrange(len(out)):]
    elif how == "insert":
        at = rng.randrange(len(out) + 1)
        out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        at = rng.randrange(len(out))
        del out[at:at + rng.randint(1, 64)]
    return Mutant(f"raw-{how}", bytes(out))


def record_mutant(data: bytes, rng: random.Random) -> Mutant:
    file_header, frames = _records(data)
    how = rng.choice(RECORD)
    spot = _pick(rng, frames, first_frame=0 if rng.random() < 0.1 else 1)
    if spot is None:
        return Mutant(f"rec-{how}-none", data)
    f, i = spot
    record = frames[f][i]
    bodies = None
    if how == "field":
        record[rng.randrange(len(record))] = copy.deepcopy(rng.choice(INTERESTING))
    elif how == "kind":
        record[0] = rng.choice([0, 1, 2, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 42, 63, 64, 200, -1])
    elif how == "drop_field" and len(record) > 1:
        del record[rng.randrange(1, len(record))]
    elif how == "add_field":
        record.append(copy.deepcopy(rng.choice(INTERESTING)))
    elif how == "drop_record":
        del frames[f][i]
    elif how == "dup_record":
        frames[f].insert(i, copy.deepcopy(record))
    elif how == "swap_records" and len(frames[f]) > 1:
        j = rng.randrange(len(frames[f]))
        frames[f][i], frames[f][j] = frames[f][j], frames[f][i]
    elif how == "nest" and len(record) > 1:
        j = rng.randrange(1, len(record))
        record[j] = [record[j]]
    elif how == "body_flip":
        packer = msgpack.Packer(use_bin_type=True)
        body = bytearray(b"".join(packer.pack(r) for r in frames[f]))
        if body:
            for _ in range(rng.randint(1, 3)):
                body[rng.randrange(len(body))] ^= rng.randint(1, 255)
        bodies = {f: bytes(body)}
    elif how == "map_field":
        maps = [(g, r) for g, records in enumerate(frames) for r in records
                if isinstance(r, list) and len(r) == 2 and isinstance(r[1], dict)]
        if maps:
            _, r = rng.choice(maps)
            key = rng.choice(sorted(r[1]) or ["x"])
            if rng.random() < 0.3:
                r[1].pop(key, None)
            else:
                r[1][key] = copy.deepcopy(rng.choice(INTERESTING))
    return Mutant(f"rec-{how}", _encode(file_header, frames, bodies))


def tamper_mutant(data: bytes, rng: random.Random) -> Mutant | None:
    """A well-typed change of what the guest saw; None when the trace has no such record."""
    file_header, frames = _records(data)
    how = rng.choice(TAMPER)
    kinds = {"read_value": {int(Kind.PIO_READ), int(Kind.MMIO_READ)},
             "interrupt_vector": {int(Kind.INTERRUPT)}, "interrupt_position": {int(Kind.INTERRUPT)},
             "input_byte": {int(Kind.INPUT)}, "clock_value": {int(Kind.CLOCK)}}[how]
    spot = _pick(rng, frames, kinds)
    if spot is None:
        return None
    record = frames[spot[0]][spot[1]]
    if how == "read_value":
        record[4] ^= 1 << rng.randrange(8 * record[3])
    elif how == "interrupt_vector":
        record[2] = (record[2] + rng.randrange(1, 256)) % 256
    elif how == "interrupt_position":
        record[1] = record[1] + 1 if record[1] == 0 or rng.random() < 0.5 else record[1] - 1
    elif how == "input_byte":
        data_bytes = bytearray(record[3])
        data_bytes[rng.randrange(len(data_bytes))] ^= rng.randint(1, 255)
        record[3] = bytes(data_bytes)
    else:
        record[3] ^= 1 << rng.randrange(8)
    return Mutant(f"tamper-{how}", _encode(file_header, frames), tampered=True)


def mutants(data: bytes, seed: int, count: int, tamper_share: float = 0.25) -> list[Mutant]:
    """`count` mutants of a trace, the same ones for the same seed."""
    rng = random.Random(seed)
    out: list[Mutant] = []
    while len(out) < count:
        roll = rng.random()
        if roll < tamper_share:
            mutant = tamper_mutant(data, rng)
            if mutant is None:
                continue
        elif roll < tamper_share + (1 - tamper_share) / 2:
            mutant = record_mutant(data, rng)
        else:
            mutant = raw_mutant(data, rng)
        out.append(mutant)
    return out


# ---------------------------------------------------------------- running them
def run_verbs(path: Path, db: Path, replay_bound: int | None, verbs=("info", "analyze", "replay")) -> dict[str, str]:
    """Each verb's outcome: ok / verified / not-verified / altered / divergence / refused (a
    one-line ReplayVMError), bounded (replay reached the position bound: a hang), multiline
    (an error of more than one line) or traceback (anything else raised)."""
    from replayvm.analyze.loader import load_trace
    from replayvm.replay.replayer import Divergence, replay
    from replayvm.trace.summary import format_summary, summarize

    results: dict[str, str] = {}
    for verb in verbs:
        try:
            if verb == "info":
                format_summary(summarize(path))
                results[verb] = "ok"
            elif verb == "analyze":
                load_trace(path, db)
                results[verb] = "ok"
            else:
                result = replay(path, until_position=replay_bound)
                results[verb] = "verified" if result.verified else "bounded" if result.stopped_early \
                    else "not-verified"
        except ReplayVMError as error:
            if "\n" in str(error).strip():
                results[verb] = f"multiline: {error}"
            else:
                results[verb] = "altered" if isinstance(error, TraceAlteredError) else \
                    "divergence" if isinstance(error, Divergence) else "refused"
        except Exception:
            results[verb] = "traceback: " + " | ".join(traceback.format_exc().strip().splitlines()[-4:])
        finally:
            for leftover in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"),
                             db.with_name(db.name + "-journal")):
                leftover.unlink(missing_ok=True)
    return results


ECHO_GUEST = ENTER_FLAT_PM32 + r"""
    mov $0x7000, %esp
    mov $timer, %eax             # IDT at 0x1000: vector 0x30, the LAPIC timer
    mov $0x1000 + 0x30 * 8, %edi
    mov %ax, (%edi)
    movw $8, 2(%edi)
    movw $0x8E00, 4(%edi)
    shr $16, %eax
    mov %ax, 6(%edi)
    lidt idtdesc
    movl $0x1FF, 0xFEE000F0      # LAPIC on; timer periodic, vector 0x30
    movl $0xB, 0xFEE003E0
    movl $0x20030, 0xFEE00320
    movl $200000, 0xFEE00380
    mov $0, %al                  # a clock read (CMOS seconds)
    out %al, $0x70
    in $0x71, %al
    mov $0x2000, %edi            # a read run of one sector (stored as a sector hash), and a short one
    mov $512, %ecx
    mov $0x3FF, %dx
    rep insb
    mov $16, %ecx
    rep insb
    call prompt
    sti
idle:
    hlt
    jmp idle
timer:                           # each tick: echo what was typed; a prompt after each line
    push %eax
    push %edx
poll:
    mov $0x3FD, %dx
    in %dx, %al
    test $1, %al
    jz done
    mov $0x3F8, %dx
    in %dx, %al
    out %al, %dx
    cmp $10, %al
    jne poll
    call prompt
    jmp poll
done:
    movl $0, 0xFEE000B0
    pop %edx
    pop %eax
    iret
prompt:
    mov $0x3F8, %dx
    mov $'$', %al
    out %al, %dx
    mov $' ', %al
    out %al, %dx
    ret
idtdesc: .word 0x30 * 8 + 7
    .long 0x1000
""" + FLAT_GDT


def record_echo_trace(directory: Path) -> Path:
    """A tiny session (about 60 events, 200 instructions, 2 MiB of RAM) of a boot-sector guest that
    echoes typed lines from its timer interrupt: every kind of event in a trace that replays in
    milliseconds. Virtual clock: the same trace every time."""
    import io

    from replayvm.record.session import SessionOptions, run_session
    from tests.asm import assemble

    boot = assemble(ECHO_GUEST, 0x7C00, bits=16)
    assert len(boot) <= 510
    image = directory / "echo.img"
    image.write_bytes(boot.ljust(510, b"\0") + b"\x55\xAA" + bytes(512 * 7))
    trace = directory / "echo.zst"
    outcome, _ = run_session(SessionOptions(engine="emu", disks=[image], ram_mib=2, virtual_clock=True,
                                            script=b"hello\nworld\n", trace=trace, timeout_s=60),
                             output=io.BytesIO())
    assert outcome.reason == "script-done", outcome
    return trace


def without_digest(data: bytes) -> tuple[bytes, list[list]]:
    """A format 1.1 trace turned into a 1.0 one (no record digest), as (file header, frames of
    records): edits of it are then replayed rather than refused as altered."""
    from replayvm.trace.format import FILE_HEADER, FORMAT_MAJOR, MAGIC

    _, frames = _records(data)
    del frames[-1][0][1]["trace_sha256"]
    return FILE_HEADER.pack(MAGIC, FORMAT_MAJOR, 0), frames


def header_sweep(data: bytes, keys: list[str], values: list) -> list[tuple[str, object, bytes]]:
    """(key, value, trace) for every header field `key` (dotted: `initial_state.regs.rip`) set to
    every value, in a trace without digest."""
    file_header, frames = without_digest(data)
    out = []
    for key in keys:
        for value in values:
            edited = copy.deepcopy(frames)
            target = edited[0][0][1]
            *path, last = key.split(".")
            for part in path:
                target = target[part]
            target[last] = copy.deepcopy(value)
            out.append((key, value, _encode(file_header, edited)))
    return out
