"""The engine interface (replayvm.engines.base) is what both engines really offer, and all callers use.

- Each engine has every member of `Engine` with the protocol's parameters, and is an instance of
  exactly the optional protocols its docstring claims (emu: SnapshotEngine and DebugEngine; kvm:
  HardwareDebugEngine). KVM is real here: the kvm half is skipped only without /dev/kvm.
- Stopping at a position works on both engines alike, between runs and from a device access.
- A snapshot round-trips through the named fields a checkpoint file stores.
- No caller probes an engine with getattr/hasattr, reaches into its C state, or branches on its
  name: a source scan (as tests/test_imports.py does for imports).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import msgpack
import pytest

from replayvm.engines import base
from replayvm.engines.base import (DebugEngine, DebugStop, Engine, EngineSnapshot, HardwareDebugEngine,
                                   SnapshotEngine, StopReason)
from tests.harness import HANG_BUDGET_NS
from tests.test_kvm_engine import REALMODE_MARKS, realmode_machine

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = (SnapshotEngine, DebugEngine, HardwareDebugEngine)
CLAIMED = {"emu": {SnapshotEngine, DebugEngine}, "kvm": {HardwareDebugEngine}}


def protocol_members(protocol: type) -> dict[str, object]:
    """Name -> declaration (function, property or annotation) of every member `protocol` declares
    itself and inherits from other protocols (not from typing.Protocol or object)."""
    members: dict[str, object] = {}
    for klass in reversed(protocol.__mro__):
        if klass in (object, base.Protocol) or not getattr(klass, "_is_protocol", False):
            continue
        for name, annotation in klass.__dict__.get("__annotations__", {}).items():
            members[name] = annotation
        for name, value in vars(klass).items():
            if not name.startswith("_") and (callable(value) or isinstance(value, property)):
                members[name] = value
    return members


@pytest.fixture(params=["emu", "kvm"])
def engine_name(request) -> str:
    if request.param == "kvm":
        request.getfixturevalue("require_kvm")
    return request.param


def test_the_protocols_declare_what_callers_use():
    """The members the issue names, so that a member dropped from base.py is noticed."""
    members = protocol_members(Engine)
    for name in ("name", "exact_positions", "position_unit", "position", "icount", "last_error",
                 "on_interrupt", "cpuid_table", "run", "request_stop", "stop_here", "move_stop",
                 "exit_context", "get_state", "set_state", "interrupt_landmark", "pure_read_sites",
                 "pure_reads", "close"):
        assert name in members, name
    assert {"save_cpu", "restore_cpu"} <= set(protocol_members(SnapshotEngine))
    assert {"set_breakpoints", "set_watchpoints", "take_debug_hit", "linear_pc", "resume_here",
            "resume_anywhere", "read_memory"} <= set(protocol_members(DebugEngine))
    assert "set_guest_debug" in protocol_members(HardwareDebugEngine)
    for protocol in (Engine, *OPTIONAL):
        for name, member in vars(protocol).items():
            if callable(member) and not name.startswith("_") or isinstance(member, property):
                assert (member.fget if isinstance(member, property) else member).__doc__, \
                    f"{protocol.__name__}.{name} says nothing"


def test_each_engine_has_every_member_with_the_protocols_parameters(engine_name):
    machine, engine, _ = realmode_machine(engine_name)
    try:
        claimed = CLAIMED[engine_name]
        for protocol in (Engine, *claimed):
            for name, declared in protocol_members(protocol).items():
                assert hasattr(engine, name), f"{engine_name} lacks {protocol.__name__}.{name}"
                if inspect.isfunction(declared):
                    wanted = inspect.signature(declared).parameters
                    offered = inspect.signature(getattr(engine, name)).parameters
                    for parameter in list(wanted.values())[1:]:            # after self
                        assert parameter.name in offered, f"{engine_name}.{name} lacks {parameter.name}"
                        assert offered[parameter.name].default == parameter.default, \
                            f"{engine_name}.{name}({parameter.name}=...) has another default"
                    extra = [p for p in list(offered.values()) if p.name not in wanted
                             and p.default is inspect.Parameter.empty]
                    assert not extra, f"{engine_name}.{name} needs more than the protocol gives: {extra}"
        for protocol in OPTIONAL:
            assert isinstance(engine, protocol) == (protocol in claimed), (engine_name, protocol.__name__)
        assert type(engine).name == engine_name
        assert type(engine).exact_positions is (engine_name == "emu")
        assert type(engine).position_unit == ("instructions" if engine.exact_positions else "exits")
        assert (engine.icount is None) is (not engine.exact_positions)
        assert engine.pure_read_sites() == {} and engine.pure_reads == 0       # nothing run yet
        assert engine.interrupt_landmark() is None
        assert engine.last_error == "" and engine.on_interrupt is None
    finally:
        engine.close()


def test_run_until_a_position_stops_exactly_there_on_both_engines(engine_name):
    """The guest's first instructions are all port accesses, so instruction and exit counts agree:
    both engines stop after the third (OUT 0x80, IN 0x81, OUT 0x82) and finish as without a stop."""
    machine, engine, mmio = realmode_machine(engine_name)
    try:
        first = 3 if engine_name == "kvm" else 9 + 3      # emu also counts the 9 instructions before
        assert engine.run(budget_ns=HANG_BUDGET_NS, until_position=first) is StopReason.BUDGET
        assert engine.position == first
        assert machine.ports.writes == [(0, 1, 0x11), (2, 1, 0x5A)]
        assert engine.run(until_position=first) is StopReason.BUDGET          # there already
        assert engine.position == first
        assert engine.run(budget_ns=HANG_BUDGET_NS) is StopReason.HALT, engine.last_error
        assert [v for off, _, v in machine.ports.writes if off == 0] == REALMODE_MARKS
    finally:
        engine.close()


def test_stop_here_and_move_stop_from_a_device_access_on_both_engines(engine_name):
    machine, engine, _ = realmode_machine(engine_name)
    ports = machine.ports
    seen: list[int] = []

    def on_mark() -> None:
        seen.append(engine.position)
        if len(seen) == 1:
            engine.move_stop(engine.position + 2)          # past the IN and the OUT 0x82
        elif len(seen) == 2:
            engine.stop_here()

    ports.on_write[0] = on_mark
    try:
        assert engine.run(budget_ns=HANG_BUDGET_NS) is StopReason.BUDGET
        assert engine.position == seen[0] + 2 and ports.writes[-1] == (2, 1, 0x5A)
        assert engine.run(budget_ns=HANG_BUDGET_NS) is StopReason.STOP_REQUESTED
        assert engine.position == seen[1] and ports.writes[-1] == (0, 1, 0x22)
        assert engine.run(budget_ns=HANG_BUDGET_NS) is StopReason.HALT, engine.last_error
        assert [v for off, _, v in ports.writes if off == 0] == REALMODE_MARKS
    finally:
        engine.close()


def test_an_emu_snapshot_round_trips_through_its_named_fields():
    """save_cpu() at the interrupt-heavy middle of the guest, then through to_dict + msgpack (what
    a checkpoint file does) and back: restoring it replays the rest of the guest identically."""
    machine, engine, _ = realmode_machine("emu")
    try:
        assert engine.run(budget_ns=HANG_BUDGET_NS, until_position=40) is StopReason.BUDGET
        snapshot = engine.save_cpu()
        assert isinstance(snapshot, EngineSnapshot) and snapshot.engine == "emu"
        stored = msgpack.unpackb(msgpack.packb(snapshot.to_dict(), use_bin_type=True), raw=False)
        assert EngineSnapshot.from_dict(stored) == snapshot
        ram = bytes(machine.ram)
        pending = list(machine.interrupts.pending)
        writes = len(machine.ports.writes)
        state = engine.get_state()
        assert engine.run(budget_ns=HANG_BUDGET_NS, until_position=60) is StopReason.BUDGET
        first_run = (engine.get_state(), machine.ports.writes[writes:], bytes(machine.ram))

        machine.ram[:] = ram
        del machine.ports.writes[writes:]
        machine.interrupts.pending[:] = pending
        engine.restore_cpu(EngineSnapshot.from_dict(stored))
        assert engine.position == 40 and engine.get_state() == state
        assert engine.run(budget_ns=HANG_BUDGET_NS, until_position=60) is StopReason.BUDGET
        assert (engine.get_state(), machine.ports.writes[writes:], bytes(machine.ram)) == first_run
    finally:
        engine.close()


def test_a_snapshot_from_elsewhere_is_refused_before_it_changes_anything():
    machine, engine, _ = realmode_machine("emu")
    try:
        snapshot = engine.save_cpu()
        data = snapshot.to_dict()
        for broken in ({**data, "halted": 1}, {**data, "pending_fault": [13, None]},
                       {k: v for k, v in data.items() if k != "counters"}, {**data, "context": "x"}):
            with pytest.raises(ValueError):
                EngineSnapshot.from_dict(broken)
        before = engine.get_state()
        with pytest.raises(ValueError):
            engine.restore_cpu(EngineSnapshot.from_dict({**data, "engine": "kvm"}))
        with pytest.raises(ValueError):
            engine.restore_cpu(EngineSnapshot.from_dict({**data, "counters": data["counters"][:-1]}))
        assert engine.get_state() == before
    finally:
        engine.close()


def test_a_debug_hit_is_named_by_the_interface_not_by_the_c_constants():
    machine, engine, _ = realmode_machine("emu")
    try:
        engine.set_breakpoints([0x7C00 + 3])                  # after cli (1 byte), xor (2 bytes)
        assert engine.run(budget_ns=HANG_BUDGET_NS) is StopReason.DEBUG
        hit = engine.take_debug_hit()
        assert hit.kind is DebugStop.BREAK and engine.linear_pc() == 0x7C03
        assert engine.take_debug_hit().kind is DebugStop.NONE
        engine.resume_here()
        engine.resume_anywhere()                               # undone: the same breakpoint again
        position = engine.position
        assert engine.run(budget_ns=HANG_BUDGET_NS) is StopReason.DEBUG
        assert engine.take_debug_hit().kind is DebugStop.BREAK and engine.position == position
        engine.set_breakpoints([])
        assert engine.run(budget_ns=HANG_BUDGET_NS) is StopReason.HALT
    finally:
        engine.close()


def old_layout(path: Path, magic: bytes) -> None:
    """Rewrite a checkpoint file as the previous layout wrote it: each vCPU a positional list
    (context, counters, fault, halted, interrupts, exceptions), under `magic`."""
    import zstandard

    from replayvm.replay import checkpoint_file

    with open(path, "rb") as raw:
        raw.read(len(checkpoint_file.MAGIC))
        items = list(msgpack.Unpacker(zstandard.ZstdDecompressor().stream_reader(raw), raw=False,
                                      strict_map_key=False, max_buffer_size=checkpoint_file.MAX_OBJECT))
    for item in items[1:-1]:
        cpu = item["cpu"]
        item["cpu"] = [cpu["context"], cpu["counters"], cpu["pending_fault"], cpu["halted"],
                       cpu["interrupts_delivered"], cpu["exceptions_delivered"]]
    with open(path, "wb") as raw:
        raw.write(magic)
        with zstandard.ZstdCompressor().stream_writer(raw) as out:
            for item in items:
                out.write(msgpack.packb(item, use_bin_type=True))


@pytest.mark.parametrize("magic, why", [(b"RVMCKPT\x02", "of this version"), (None, "unreadable")])
def test_a_checkpoint_file_of_the_tuple_layout_is_ignored_and_rebuilt(demo_trace, tmp_path, monkeypatch,
                                                                       magic, why):
    """Checkpoint files are a cache: one written before the vCPU was an EngineSnapshot (format 2),
    or one claiming this format with the old positional vCPU, is refused in one note and rebuilt."""
    from replayvm.replay import checkpoint_file
    from replayvm.replay.timeline import Timeline

    monkeypatch.setenv("REPLAYVM_CACHE", str(tmp_path / "cache"))
    first = Timeline(demo_trace, checkpoint_every=1_000_000, keep_checkpoints=True)
    first.seek(3_000_000)
    assert first.save_checkpoints()
    first.close()
    old_layout(first.checkpoint_file, magic or checkpoint_file.MAGIC)
    again = Timeline(demo_trace, checkpoint_every=1_000_000, keep_checkpoints=True)
    try:
        assert again.checkpoints_loaded == 0
        assert "ignored the kept checkpoints" in again.checkpoint_file_note and why in again.checkpoint_file_note
        again.seek(3_000_000)
        assert again.save_checkpoints()
    finally:
        again.close()
    rebuilt = Timeline(demo_trace, checkpoint_every=1_000_000, keep_checkpoints=True)
    try:
        assert rebuilt.checkpoints_loaded == 3 and rebuilt.checkpoint_file_note == ""
        assert all(isinstance(c.cpu, EngineSnapshot) for c in rebuilt.checkpoints.checkpoints)
    finally:
        rebuilt.close()


# ---------------------------------------------------------------- callers: a source scan
SCANNED = ("replayvm", "bench", "tests")
NOT_CALLERS = ("replayvm/engines/",             # the engines themselves
               "tests/test_engine_interface.py")  # ... and this test, which inspects them
# Engine-name branches still to go: the replayer is being rewritten onto Machine (issue 11,
# item 1), which takes `exact_positions` and the optional protocols instead of `on_kvm`.
NAME_BRANCHES_PENDING: set[str] = set()


def is_engine(node: ast.AST) -> bool:
    """`engine`, `self.engine`, `machine.engine`, `kvm_engine`...: an expression naming an engine."""
    if isinstance(node, ast.Name):
        return node.id == "engine" or node.id.endswith("_engine")
    return isinstance(node, ast.Attribute) and node.attr == "engine"


def engine_misuses(source: str, filename: str) -> list[str]:
    """Where `source` probes an engine (getattr/hasattr), reaches into its C state (`.state`),
    or compares an engine's name with a literal."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("getattr", "hasattr") and node.args and is_engine(node.args[0]):
            found.append(f"{filename}:{node.lineno}: {node.func.id}() on an engine")
        elif isinstance(node, ast.Attribute) and node.attr == "state" and is_engine(node.value):
            found.append(f"{filename}:{node.lineno}: an engine's C state")
        elif isinstance(node, ast.Attribute) and node.attr == "on_kvm":
            found.append(f"{filename}:{node.lineno}: on_kvm")
        elif isinstance(node, ast.Compare) and filename not in NAME_BRANCHES_PENDING:
            operands = [node.left, *node.comparators]
            if any(isinstance(o, ast.Attribute) and o.attr == "name" and is_engine(o.value) for o in operands) \
                    and any(isinstance(o, ast.Constant) and isinstance(o.value, str) for o in operands):
                found.append(f"{filename}:{node.lineno}: a branch on the engine's name")
    return found


def caller_files() -> list[tuple[str, str]]:
    files = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if not relative.startswith(NOT_CALLERS) and path.resolve().is_relative_to(ROOT / folder):
                files.append((relative, path.read_text()))
    return files


def test_the_scan_finds_each_kind_of_misuse():
    source = ("x = getattr(engine, 'icount', None)\nhasattr(self.engine, 'state')\n"
              "engine.state.skip_icount = 0\nif machine.engine.name == 'emu': pass\n"
              "if self.replayer.on_kvm: pass\n")
    assert len(engine_misuses(source, "example.py")) == 5
    assert engine_misuses("getattr(machine, 'lapic', None)\nengine.name\n", "example.py") == []


def test_no_caller_probes_an_engine_or_branches_on_its_name():
    found = []
    for relative, source in caller_files():
        found += [f for f in engine_misuses(source, relative)
                  if relative not in NAME_BRANCHES_PENDING or "on_kvm" not in f]
    assert not found, "use the Engine protocol (replayvm.engines.base) instead:\n" + "\n".join(found)
