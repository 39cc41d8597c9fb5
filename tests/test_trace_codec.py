"""The record codec (replayvm/trace/records.py) is the one place that knows a record's field order.

- Every kind's constructor (`LAYOUTS[kind].build`) takes its fields by their layout names and
  builds a record the reader's validator accepts, with each field at its named position.
- An optional trailing field (INTERRUPT's kvm landmark) is known to the codec: built when given,
  read back with `Layout.get`, None when absent, and loaded into SQL from there.
- No code outside the codec indexes a record with a literal position or builds one as a literal
  tuple (AST scans of replayvm/).
- The record table of docs/trace-format.md names every kind and every field, optional ones too,
  in layout order, with the codec's types.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from replayvm.analyze.loader import load_trace
from replayvm.trace import Kind, TraceReader, TraceWriter
from replayvm.trace import records as codec

ROOT = Path(__file__).resolve().parent.parent
SECTOR_BYTES = bytes(range(256)) * 2
SECTOR_DIGEST = hashlib.sha256(SECTOR_BYTES).digest()[:codec.HASH_SIZE]
RAM_PAGES = 16

# A value of each field, by field name; `data` and `value` depend on the kind.
SAMPLE: dict[str, Any] = {
    "dpos": 5, "port": 0x1F0, "address": 0xFEC0_0010, "size": 2, "value": 0x1234, "rip": 0x8010_2345,
    "cpl": 3, "count": 256, "vector": 32, "source": "timer", "landmark": {"rip": 0x8010_0000, "cr3": 0x1000},
    "digest": SECTOR_DIGEST, "page": 3, "register": "lapic.id", "sites": [[0x8010_0000, 7]],
    "header": {"format": "replayvm-trace", "engine": "emu"}, "footer": {"end": "script-done"},
    "disk": 0, "lba": 1234,                  # DISK_READ (format 1.2, being added)
    "cpu": 1,                                # SWITCH (feature smp, format 3.0)
    "cr3": 0x0DFB_E000,                      # ASPACE (feature aspace)
}
SAMPLE_DATA = {Kind.PIO_READ_RUN: [SECTOR_DIGEST], Kind.PIO_WRITE_RUN: SECTOR_BYTES, Kind.INPUT: b"ls\n",
               Kind.SECTOR: SECTOR_BYTES, Kind.RAM_PAGE: bytes(codec.PAGE_SIZE)}
SAMPLE_VALUE = {Kind.CLOCK: 1_700_000_000}


def sample_fields(kind: Kind) -> dict[str, Any]:
    values = {name: SAMPLE.get(name) for name in codec.LAYOUTS[kind].names}
    if "data" in values:
        values["data"] = SAMPLE_DATA[kind]
    if kind in SAMPLE_VALUE:
        values["value"] = SAMPLE_VALUE[kind]
    return values


def refuse(record: Any) -> bool:
    raise AssertionError(f"the validator refused {record!r}: "
                         f"{codec.record_problem(record, {SECTOR_DIGEST}, RAM_PAGES)}")


@pytest.mark.parametrize("kind", list(Kind), ids=lambda kind: kind.name)
def test_each_constructor_builds_a_valid_record_in_layout_order(kind):
    layout = codec.LAYOUTS[kind]
    values = sample_fields(kind)
    assert list(inspect.signature(layout.build).parameters) == list(layout.names)
    record = layout.build(**values)
    assert record == layout.build(*values.values())
    assert type(record) is tuple and type(record[codec.KIND_INDEX]) is int and record[codec.KIND_INDEX] == kind
    assert len(record) == 1 + len(layout.names)
    for name, value in values.items():
        assert record[getattr(layout, name)] == value, name
    if kind in codec.FAST_KINDS:
        validate = codec.build_validator()
        position, dropped = validate([record], {SECTOR_DIGEST}, RAM_PAGES, 0, refuse)
        assert dropped == [] and position == (values["dpos"] if layout.positioned else 0)
    else:                                    # the header and footer: checked by the reader itself
        assert (kind, layout.arity) in ((Kind.HEADER, 2), (Kind.FOOTER, 2))
        assert codec.header_ok(record[codec.HEADER.header]) if kind == Kind.HEADER \
            else codec.footer_ok(record[codec.FOOTER.footer])


def test_interrupt_landmark_is_an_optional_field_of_the_codec():
    without = codec.INTERRUPT.build(5, 32, "timer", 0x1000, 0)
    with_landmark = codec.INTERRUPT.build(5, 32, "timer", 0x1000, 0, SAMPLE["landmark"])
    assert len(without) == codec.INTERRUPT.arity == 6 and len(with_landmark) == 7
    assert codec.INTERRUPT.get(without, "landmark") is None
    assert codec.INTERRUPT.get(with_landmark, "landmark") == SAMPLE["landmark"]
    assert codec.INTERRUPT.get(with_landmark, "vector") == 32
    position, _ = codec.build_validator()([without, with_landmark], set(), RAM_PAGES, 0, refuse)
    assert position == 10
    with pytest.raises(AttributeError, match="INTERRUPT records have no field 'landmarks'"):
        codec.INTERRUPT.get(without, "landmarks")


def test_a_hot_loop_unpacking_in_another_order_is_refused_at_import():
    codec.check_unpacking((Kind.PIO_READ, Kind.MMIO_READ), "dpos", "port|address", "size", "value", "rip", "cpl")
    with pytest.raises(RuntimeError, match="unpacks CLOCK records as dpos, value, source"):
        codec.check_unpacking((Kind.CLOCK,), "dpos", "value", "source", "rip", "cpl")
    codec.check_unpacking((Kind.INTERRUPT,), "dpos", "vector", "source", "rip", "cpl", optional=("landmark",))
    with pytest.raises(RuntimeError, match="unpacks INTERRUPT records as dpos, vector, source, rip, cpl; "):
        codec.check_unpacking((Kind.INTERRUPT,), "dpos", "vector", "source", "rip", "cpl")   # forgets the landmark


def test_the_landmark_reaches_sql_when_present_and_null_when_absent(tmp_path):
    writer = TraceWriter(tmp_path / "t.zst", {"engine": "kvm", "position_unit": "exits"})
    writer.append(codec.INTERRUPT.build(3, 32, "timer", 0x1000, 0))
    writer.append(codec.INTERRUPT.build(4, 33, "com1", 0x2000, 3, {"rip": 0x2000, "cr3": 0x5000}))
    writer.close({"position": 7})
    load_trace(tmp_path / "t.zst", tmp_path / "t.db")
    with sqlite3.connect(tmp_path / "t.db") as db:
        rows = db.execute("SELECT position, vector, source, rip, cpl, landmark FROM interrupts ORDER BY seq").fetchall()
    assert rows == [(3, 32, "timer", 0x1000, 0, None), (7, 33, "com1", 0x2000, 3, '{"rip": 8192, "cr3": 20480}')]


def test_written_records_read_back_field_by_field(tmp_path):
    """The writer packs what the constructors build; the reader gives back the same fields."""
    built = [codec.LAYOUTS[kind].build(**sample_fields(kind)) for kind in codec.FAST_KINDS
             if kind not in (Kind.PIO_READ_RUN, Kind.PURE_READS)]        # need their SECTOR first / come last
    built = [codec.SECTOR.build(SECTOR_DIGEST, SECTOR_BYTES)] + built + \
        [codec.RUN.build(**sample_fields(Kind.PIO_READ_RUN)), codec.PURE_READS.build("lapic.id", [[1, 2]])]
    writer = TraceWriter(tmp_path / "t.zst", {"engine": "emu", "position_unit": "instructions",
                                              "ram_bytes": RAM_PAGES * codec.PAGE_SIZE})
    for record in built:
        writer.append(record)
    writer.close({"position": 0})
    with TraceReader(tmp_path / "t.zst") as reader:
        read = [record for record in reader if record[codec.KIND_INDEX] != Kind.FOOTER]
    assert [tuple(record) for record in read] == [tuple(r) for r in built]


# ---------------------------------------------------------------- no literal positions outside the codec
RECORD_NAMES = {"record", "r", "rec"}        # and any `.record` attribute (a replay event's record)
CODEC = Path("replayvm/trace/records.py")
# Index 0 is every record's kind (the format's definition, not a field of a layout).

ALLOWED: dict[Path, set[int]] = {}


def literal_index(node: ast.expr) -> int | None:
    """The integer a subscript's index or slice bound spells out, if it spells one."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = literal_index(node.operand)
        return None if inner is None else -inner
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.Slice):
        bounds = [literal_index(b) for b in (node.lower, node.upper) if b is not None]
        return next((b for b in bounds if b is not None), None)
    return None


def literal_record_indexing(source: str, allowed: set[int] = frozenset()) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Subscript):
            continue
        target = node.value
        name = target.id if isinstance(target, ast.Name) else \
            target.attr if isinstance(target, ast.Attribute) and target.attr == "record" else None
        index = literal_index(node.slice)
        if name in RECORD_NAMES and index is not None and index != codec.KIND_INDEX and index not in allowed:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_scan_finds_literal_record_positions():
    source = "a = record[4]\nb = r[-1]\nc = event.record[2:]\nd = record[ACCESS.value]\ne = rec[0]\nf = row[3]\n"
    assert literal_record_indexing(source) == ["line 1: record[4]", "line 2: r[-1]", "line 3: event.record[2:]"]


def test_no_code_outside_the_codec_indexes_records_by_literal_position():
    offenders = []
    for path in sorted((ROOT / "replayvm").rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative == CODEC:
            continue
        offenders += [f"{relative} {hit}" for hit in
                      literal_record_indexing(path.read_text(), ALLOWED.get(relative, set()))]
    assert not offenders, "use the layouts' named positions (replayvm.trace.records): " + "; ".join(offenders)


def hand_built_records(source: str) -> list[str]:
    """Record displays passed to a call, `append((Kind.CLOCK, dpos, ...))`: a field order written
    by hand instead of by the layout's constructor (a tuple of kinds only is a set of kinds)."""
    def is_kind(node: ast.expr) -> bool:
        return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Kind"

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            for arg in node.args:
                if isinstance(arg, (ast.Tuple, ast.List)) and len(arg.elts) >= 2 and is_kind(arg.elts[0]) \
                        and not all(is_kind(element) for element in arg.elts):
                    found.append(f"line {node.lineno}: {ast.unparse(arg)[:60]}")
    return found


def test_the_scan_finds_hand_built_records():
    source = "w.append((Kind.HALT, 5))\nx = k in (Kind.PIO_READ, Kind.PIO_WRITE)\nself._take(Kind.HALT)\n" \
             "w.append(HALT.build(5))\ncheck((Kind.PIO_READ, Kind.PIO_WRITE), 'dpos')\n"
    assert hand_built_records(source) == ["line 1: (Kind.HALT, 5)"]


def test_records_are_built_by_the_codec_only():
    offenders = []
    for path in sorted((ROOT / "replayvm").rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative != CODEC:
            offenders += [f"{relative} {hit}" for hit in hand_built_records(path.read_text())]
    assert not offenders, "build records with LAYOUTS[kind].build (replayvm.trace.records): " + "; ".join(offenders)


# ---------------------------------------------------------------- the docs' table is the codec
def top_level_items(text: str) -> list[str]:
    """`a (x, y), [b (z)]` -> ['a (x, y)', '[b (z)]']: split at commas outside parentheses/brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([" and 1 or ch in ")]" and -1 or 0
        if ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    items.append(text[start:].strip())
    return [item for item in items if item]


def named_fields(items: list[str]) -> list[tuple[str, str]]:
    fields = []
    for item in items:
        match = re.fullmatch(r"(\w+) \((.*)\)", item)
        assert match, f"not `name (type)`: {item!r}"
        fields.append((match.group(1), match.group(2)))
    return fields


def test_the_docs_record_table_names_every_kind_and_field_with_its_type():
    doc = (ROOT / "docs" / "trace-format.md").read_text()
    rows = {int(m.group(1)): (m.group(2), m.group(3)) for m in
            re.finditer(r"^\| (\d+) \| (\w+) \| (.*?) \| .* \|$", doc, re.MULTILINE)}
    assert set(rows) == {int(kind) for kind in Kind}, "one row per kind, no other"
    for kind in Kind:
        layout = codec.LAYOUTS[kind]
        name, fields = rows[int(kind)]
        assert name == kind.name
        items = top_level_items(fields)
        optional = [item[1:-1] for item in items if item.startswith("[")]
        required = [item for item in items if not item.startswith("[")]
        assert named_fields(required) == [(field, t.doc) for field, t in layout.fields], kind.name
        optional_items = [part for group in optional for part in top_level_items(group)]
        assert named_fields(optional_items) == [(field, t.doc) for field, t in layout.optional], kind.name
        assert items[:len(required)] == required, f"{kind.name}: optional fields come last"
