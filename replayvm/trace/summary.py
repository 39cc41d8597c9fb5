"""What `replayvm info` shows: a trace's header and a summary of its events, read by streaming."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from replayvm.trace.format import EVENT_KINDS, FEATURE_PC, FEATURE_X86_64, POSITIONED, Kind
from replayvm.trace.reader import TraceReader
from replayvm.trace.records import ASPACE, CLOCK, DPOS_INDEX, INPUT, INTERRUPT, KIND_INDEX, PURE_READS, SWITCH


def summarize(path: Path) -> dict[str, Any]:
    """Header fields, events by kind, interrupts by source, sizes; truncated traces included."""
    by_kind: Counter[str] = Counter()
    interrupts: Counter[str] = Counter()
    clocks: Counter[str] = Counter()
    input_bytes = 0
    position = 0
    ram_pages = 0
    sectors = 0
    pure_sites = 0
    cpu = 0                                     # several CPUs: who runs since turn_start
    turn_start = 0
    cpu_instructions: Counter[int] = Counter()
    aspace_changes = 0                          # ASPACE records (feature aspace), and their CR3s
    address_spaces: set[int] = set()
    with TraceReader(path) as reader:
        header = reader.header
        for record in reader:                   # validated by the reader against its layout
            kind = Kind(record[KIND_INDEX])
            if kind in POSITIONED:
                position += record[DPOS_INDEX]
            if kind in EVENT_KINDS:
                by_kind[kind.name.lower()] += 1
            if kind == Kind.INTERRUPT:
                interrupts[record[INTERRUPT.source]] += 1
            elif kind == Kind.INPUT:
                input_bytes += len(record[INPUT.data])
            elif kind == Kind.CLOCK:
                clocks[record[CLOCK.source]] += 1
            elif kind == Kind.RAM_PAGE:
                ram_pages += 1
            elif kind == Kind.SECTOR:
                sectors += 1
            elif kind == Kind.PURE_READS:
                pure_sites += len(record[PURE_READS.sites])
            elif kind == Kind.ASPACE:
                aspace_changes += 1
                address_spaces.add(record[ASPACE.cr3])
            elif kind == Kind.SWITCH:           # each CPU's own count: the sum of its turns
                cpu_instructions[cpu] += position - turn_start
                cpu, turn_start = record[SWITCH.cpu], position
        footer = reader.footer
        digest = reader.digest
        truncated = reader.truncated or footer is None
        truncated_at = reader.truncated_at
        frames = reader.frames_read
    size = os.path.getsize(path)
    events = sum(by_kind.values())
    features = header.get("features") or []
    summary = {
        "path": str(path), "format": f"{reader.major}.{reader.minor}",
        "replayvm": header.get("replayvm"), "engine": header.get("engine"),
        "position_unit": header.get("position_unit"), "ram_bytes": header.get("ram_bytes"),
        "machine": "pc" if FEATURE_PC in features else "mp", "x86_64": FEATURE_X86_64 in features,
        "boot": header.get("boot"), "clock": header.get("clock"), "chaos_seed": header.get("chaos_seed"),
        "disks": [{k: d.get(k) for k in ("name", "path", "sha256", "sectors")} for d in header.get("disks", [])],
        "command_line": header.get("command_line"), "start_time": header.get("start_time"),
        "parent": header.get("parent"), "start_position": header.get("start_position") or 0,
        "events": events, "events_by_kind": dict(by_kind), "interrupts_by_source": dict(interrupts),
        "clock_reads_by_source": dict(clocks), "input_bytes": input_bytes,
        "initial_ram_pages": ram_pages, "distinct_sectors": sectors, "frames": frames,
        "pure_read_sites": pure_sites,
        "address_space_changes": aspace_changes, "address_spaces": len(address_spaces),
        "final_position": position, "last_event_position": position, "file_bytes": size,
        "bytes_per_event": round(size / events, 2) if events else None,
        "truncated": truncated, "readable_bytes": truncated_at if reader.truncated else size,
        # "verified": the footer's record digest matches every record; "absent": a format 1.0
        # trace (no digest); None: no footer (cut short). A mismatch is an error, not a summary.
        "record_digest": digest,
    }
    if footer is not None:
        summary.update(end=footer.get("end"), instructions=footer.get("instructions"),
                       guest_seconds=(footer.get("guest_ns") or 0) / 1e9, wall_seconds=footer.get("wall_s"),
                       lapic_id_reads_not_logged=footer.get("lapic_id_reads"),
                       position_at_end=footer.get("position"),
                       ram_sha256=footer.get("ram_sha256"))
    if header.get("cpus"):
        end = footer.get("position") if footer is not None else position
        cpu_instructions[cpu] += max(0, int(end or 0) - turn_start)
        summary.update(cpus=header["cpus"],
                       cpu_instructions=[cpu_instructions[n] for n in range(int(header["cpus"]))])
    return summary


MACHINE_DESCRIPTIONS = {"mp": "mp (MP-table PC)", "pc": "pc (plain PC with a BIOS)"}   # hw.MACHINE_KINDS


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"trace        {s['path']} (format {s['format']}, replayvm {s['replayvm']})",
             f"machine      {MACHINE_DESCRIPTIONS[s['machine']]}{', x86-64 CPU' if s['x86_64'] else ''}, "
             f"engine {s['engine']}, {s['ram_bytes'] // (1 << 20) if s['ram_bytes'] else '?'} MiB RAM, "
             f"boot from {s['boot']}, {s['clock']} clock"
             + (f", chaos on (seed {s['chaos_seed']})" if s.get("chaos_seed") is not None else "")]
    if s.get("cpus"):
        lines.append(f"cpus         {s['cpus']}: " + ", ".join(
            f"cpu{n} {count:,}" for n, count in enumerate(s["cpu_instructions"]))
            + f" {s.get('position_unit') or 'instructions'} each ran")     # (kvm: exits; the key stays)
    parent = s.get("parent")
    if parent:
        lines.append(f"branch       went live from {parent['trace']} at position {parent['position']:,} "
                     f"(after {parent['event']:,} of its events)")
    for disk in s["disks"]:
        lines.append(f"disk         {disk['name']}: {disk['path'] or '(no image path)'} ({disk['sectors']} sectors, "
                     f"sha256 {str(disk['sha256'])[:16]}...)")
    if s["truncated"]:
        lines.append(f"state        TRUNCATED: readable up to byte {s['readable_bytes']} "
                     f"({s['frames']} complete frames); the recorder did not finish")
    else:
        lines.append(f"state        complete, ended by {s.get('end')}")
    if s.get("record_digest") == "verified":
        lines.append("records      intact (the footer's record digest matches)")
    elif s.get("record_digest") == "absent":
        lines.append(f"records      no record digest (format {s['format']}: written before format 1.1)")
    if s.get("instructions") is not None:
        lines.append(f"instructions {s['instructions']:,}")
    if s.get("guest_seconds") is not None and s.get("wall_seconds") is not None:
        lines.append(f"duration     {s['guest_seconds']:.3f} s guest time, {s['wall_seconds']:.3f} s wall")
    lines.append(f"events       {s['events']:,} ({s['position_unit']} position {s['final_position']:,})")
    for kind, count in sorted(s["events_by_kind"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {kind:14s} {count:>10,}")
    if s["interrupts_by_source"]:
        lines.append("interrupts   " + ", ".join(f"{k} {v:,}" for k, v in sorted(s["interrupts_by_source"].items())))
    if s["clock_reads_by_source"]:
        lines.append("clock reads  " + ", ".join(f"{k} {v:,}" for k, v in sorted(s["clock_reads_by_source"].items())))
    lines.append(f"input        {s['input_bytes']:,} bytes typed")
    if s.get("address_space_changes"):
        lines.append(f"address      {s['address_spaces']:,} address spaces (CR3), "
                     f"{s['address_space_changes']:,} changes seen at events")
    if s.get("lapic_id_reads_not_logged") is not None:
        lines.append(f"not logged   {s['lapic_id_reads_not_logged']:,} LAPIC ID reads (pure register), "
                     f"counted at {s['pure_read_sites']:,} call sites")
    lines.append(f"content      {s['initial_ram_pages']:,} initial RAM pages, {s['distinct_sectors']:,} distinct disk sectors")
    per_event = f", {s['bytes_per_event']} bytes per event" if s["bytes_per_event"] else ""
    lines.append(f"size         {s['file_bytes']:,} bytes{per_event}")
    return "\n".join(lines)
