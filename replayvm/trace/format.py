"""Constants of the trace format: magic, versions, record kinds, limits. One home for each."""

from __future__ import annotations

import enum
import struct

from replayvm.errors import ReplayVMError

MAGIC = b"RVMTRACE"
FORMAT_MAJOR = 1                 # readers refuse a major version they do not know
FORMAT_MINOR = 2                 # 1.1: the footer carries the record digest (trace_sha256);
                                 # 1.2: DISK_READ records (kind 64: 1.0/1.1 readers skip them)
BRANCH_MAJOR = 2                 # 2.0: a branch trace (replay --live), which starts inside another
                                 # trace: a 1.x reader would replay it from the wrong start, so it
                                 # must refuse it, naming both versions
BRANCH_MINOR = 0
FEATURES_MAJOR = 3               # 3.0: a trace whose machine needs more than a 1.x/2.x reader knows
FEATURES_MINOR = 0               # (several CPUs, a plain PC, long mode...): its header's `features`
                                 # names each, and a reader refuses a feature it does not know, by
                                 # name; older readers refuse the major. Branches of it stay 3.x.
READABLE_MAJORS = (FORMAT_MAJOR, BRANCH_MAJOR, FEATURES_MAJOR)
# The machine features this release replays: each one a trace may name in its header's `features`.
# A feature is added here in the release that records it, never removed.
# "smp": several CPUs (header `cpus`, SWITCH records).
# "pc": the plain PC (`--machine pc`: replayvm's BIOS, the 8254, no MP table).
# "x86-64": a 64-bit guest (the kernel is an ELF64), which the emu engine runs on a vCPU that can
# enter long mode; named whenever the recording's guest is 64-bit, since the header is written
# before it runs (whether it did enter long mode is not known yet).
# "kvm-smp": several CPUs recorded on the kvm engine, whose SWITCH records may carry a landmark
# (a switch between exits, after a CPU ran its time without one); named with "smp".
# "aspace": every event's address space: ASPACE records give the CR3 of the CPU making the next
# event whenever it differs from the last one given for that CPU (replay checks them, analysis
# puts them on every row). Named by every recording since replayvm 0.7.0.
FEATURE_SMP = "smp"
FEATURE_KVM_SMP = "kvm-smp"
FEATURE_X86_64 = "x86-64"
FEATURE_PC = "pc"
FEATURE_ASPACE = "aspace"
KNOWN_FEATURES: frozenset[str] = frozenset({FEATURE_SMP, FEATURE_PC, FEATURE_X86_64, FEATURE_KVM_SMP,
                                            FEATURE_ASPACE})
DIGEST_MINOR = 1                 # the first minor whose footer must carry the digest
DISK_READ_MINOR = 2              # the first minor that logs every sector the disks hand out
FILE_HEADER = struct.Struct("<8sHH")          # magic, major, minor
FRAME_HEADER = struct.Struct("<II")           # compressed length, crc32 of the compressed bytes

# Limits: a trace is untrusted input.
MAX_FRAME_COMPRESSED = 64 << 20
MAX_FRAME_DECOMPRESSED = 256 << 20
MAX_BIN_LEN = 16 << 20
MAX_STR_LEN = 1 << 20
MAX_ARRAY_LEN = 1 << 20
MAX_MAP_LEN = 1 << 16
# What the writer puts in one frame: well under both frame limits whatever the records (a frame is
# cut once its body passes this; one record is at most a 16 MiB bytes field plus a few fields).
FRAME_BODY_TARGET = 16 << 20
OPTIONAL_KIND_MIN = 64           # kinds >= this may be skipped by readers that do not know them


class Kind(enum.IntEnum):
    """Record kinds: each record is a msgpack array whose first element is its kind.

    Positions (`dpos`) are deltas from the previous positioned record: instruction counts on
    the emu engine, exit counts on the kvm engine (see docs/trace-format.md).
    """

    HEADER = 0            # [0, {header fields}]
    PIO_READ = 1          # [1, dpos, port, size, value, rip, cpl]
    PIO_WRITE = 2         # [2, dpos, port, size, value, rip, cpl]
    MMIO_READ = 3         # [3, dpos, addr, size, value, rip, cpl]
    MMIO_WRITE = 4        # [4, dpos, addr, size, value, rip, cpl]
    PIO_READ_RUN = 5      # [5, dpos, port, size, count, data | sector-hash list, rip, cpl]
    INTERRUPT = 6         # [6, dpos, vector, source, rip, cpl]
    INPUT = 7             # [7, dpos, source, bytes]
    CLOCK = 8             # [8, dpos, source, value, rip, cpl]   (a time value the guest read)
    HALT = 9              # [9, dpos]
    SECTOR = 10           # [10, sha256-16 bytes, 512 bytes]   content table entry, before first use
    RAM_PAGE = 11         # [11, page number, 4096 bytes]      initial RAM, non-zero pages only
    FOOTER = 12           # [12, {footer fields}]
    PIO_WRITE_RUN = 13    # [13, dpos, port, size, count, data, rip, cpl]
    PURE_READS = 14       # [14, register name, [[rip, count], ...]]  reads not logged one by one
    SWITCH = 15           # [15, dpos, cpu, (landmark)]   from here on CPU `cpu` runs (feature "smp",
                          # format 3.0; a landmark only with the feature "kvm-smp")
    ASPACE = 16           # [16, cr3]   the running CPU's CR3 from its next event on (feature "aspace")
    DISK_READ = 64        # [64, disk index, lba, sha256-16 bytes]   a sector a disk handed out (1.2)


POSITIONED = frozenset({Kind.PIO_READ, Kind.PIO_WRITE, Kind.MMIO_READ, Kind.MMIO_WRITE,
                        Kind.PIO_READ_RUN, Kind.PIO_WRITE_RUN, Kind.INTERRUPT, Kind.INPUT,
                        Kind.CLOCK, Kind.HALT, Kind.SWITCH})
EVENT_KINDS = POSITIONED


class TraceFormatError(ReplayVMError):
    """A trace that cannot be read: one line naming the problem and where (byte / frame)."""

    exit_status = 2


class TraceAlteredError(TraceFormatError):
    """The trace's records are not the ones its recorder wrote (the footer's record digest does
    not match): exit status 2, like any other unreadable trace; distinct from a divergence."""

    exit_status = 2
