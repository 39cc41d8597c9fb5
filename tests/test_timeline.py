"""The replay timeline: checkpoints, seek, step, reverse execution, breakpoints and watchpoints,
on real demo-guest recordings (emu engine)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from elftools.elf.elffile import ELFFile

from replayvm.guests import guest_file
from replayvm.replay.replayer import replay
from replayvm.replay.timeline import WATCH_WRITE, Timeline

EVERY = 1_000_000                # small checkpoint interval: the demo session spans several


def symbol(name: str) -> int:
    with open(guest_file("demo", "kernel.elf"), "rb") as f:
        sym = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)
    assert sym, name
    return sym[0]["st_value"]



def snapshot(timeline: Timeline) -> tuple:
    state = timeline.registers()
    return (timeline.position, tuple(sorted(state.regs.items())), state.cr3,
            hashlib.sha256(timeline.replayer.ram).hexdigest())


def test_seek_back_and_forth_gives_the_states_of_a_straight_replay(demo_trace):
    straight = Timeline(demo_trace, checkpoint_every=10**12)       # one checkpoint: at 0
    wanted = {}
    for position in (1_500_000, 3_000_001, 6_123_457):
        straight.seek(position)
        wanted[position] = snapshot(straight)
    straight.close()

    timeline = Timeline(demo_trace, checkpoint_every=EVERY)
    timeline.seek(timeline.end)
    assert timeline.checkpoints.stats.taken >= 8
    for position in (6_123_457, 1_500_000, 3_000_001, 6_123_457):
        timeline.seek(position)
        assert snapshot(timeline) == wanted[position]
    assert timeline.checkpoints.stats.restores >= 3
    timeline.close()


def test_after_going_back_the_replay_still_verifies_to_the_end(demo_trace):
    expected = replay(demo_trace)
    timeline = Timeline(demo_trace, checkpoint_every=EVERY)
    timeline.seek(timeline.end)
    timeline.seek(2_500_000)                           # back, then forward over checkpoints
    timeline.seek(7_000_000)
    timeline.seek(4_000_000)
    timeline.seek(timeline.end)
    timeline.replayer._verify_end()                    # raises Divergence on any difference
    assert bytes(timeline.replayer.console) == expected.console
    timeline.close()


def test_step_then_reverse_step_returns_identical_registers(demo_trace):
    timeline = Timeline(demo_trace, checkpoint_every=EVERY)
    timeline.seek(3_456_789)
    before = snapshot(timeline)
    assert timeline.step().reason == "step"
    after = snapshot(timeline)
    assert after[0] == before[0] + 1 and after[1] != before[1]
    assert timeline.reverse_step().reason == "step"
    assert snapshot(timeline) == before
    timeline.seek(0)
    assert timeline.reverse_step().reason == "begin"
    timeline.close()


def test_breakpoints_forward_and_reverse(demo_trace):
    race_task = symbol("race_task")
    timeline = Timeline(demo_trace, checkpoint_every=EVERY)
    timeline.breakpoints.add(race_task)
    hits = []
    while (stop := timeline.cont()).reason == "break":
        assert stop.address == race_task == timeline.registers().regs["rip"]
        hits.append(stop.position)
    assert stop.reason == "end" and len(hits) == 4       # two tasks, boot race and typed race
    for expected in reversed(hits):                   # from the end, back through every hit
        stop = timeline.reverse_continue()
        assert (stop.reason, stop.position) == ("break", expected)
    assert timeline.reverse_continue().reason == "begin"
    timeline.close()


def test_watchpoint_sees_each_write_and_reverse_stops_before_it(demo_trace):
    counter = symbol("race_counter")
    timeline = Timeline(demo_trace, checkpoint_every=EVERY)
    timeline.breakpoints.add(symbol("race_task"))
    timeline.cont()
    timeline.breakpoints.clear()
    timeline.watches.add((counter, 4, WATCH_WRITE))
    values = []
    for _ in range(3):
        stop = timeline.cont()
        assert stop.reason == "watch" and stop.address == counter
        values.append(int.from_bytes(timeline.read_memory(counter, 4), "little"))
    assert values[1] == values[0] + 1 and values[2] == values[1] + 1
    stop = timeline.reverse_continue()                  # before the write that made values[2]
    assert stop.reason == "watch"
    assert int.from_bytes(timeline.read_memory(counter, 4), "little") == values[1]
    timeline.step()
    assert int.from_bytes(timeline.read_memory(counter, 4), "little") == values[2]
    timeline.close()


def test_seek_uses_checkpoints_instead_of_replaying_from_the_start(demo_trace):
    timeline = Timeline(demo_trace, checkpoint_every=EVERY)
    timeline.seek(timeline.end)
    timeline.seek(7_000_000)
    restores = timeline.checkpoints.stats.restores
    timeline.seek(7_500_000)                             # forward inside one interval: no restore
    assert timeline.checkpoints.stats.restores == restores
    timeline.seek(4_200_000)                             # back: the checkpoint at 4,000,000
    assert timeline.checkpoints.stats.restores == restores + 1
    timeline.close()


def test_cli_seek_prints_the_cpu_state_there(demo_trace):
    result = subprocess.run([sys.executable, "-m", "replayvm.cli", "replay", str(demo_trace),
                             "--seek", "i2000000", "--quiet", "--no-keep-checkpoints"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "replay at instruction 2000000 of" in result.stdout
    assert "eip=" in result.stdout or "rip=" in result.stdout


def test_cli_seek_to_a_missing_event_is_a_one_line_error(demo_trace):
    result = subprocess.run([sys.executable, "-m", "replayvm.cli", "replay", str(demo_trace),
                             "--seek", "99999999", "--no-keep-checkpoints"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no event 99999999" in result.stderr


def test_checkpoints_kept_by_one_run_are_used_by_the_next(demo_trace, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLAYVM_CACHE", str(tmp_path / "cache"))
    first = Timeline(demo_trace, checkpoint_every=EVERY, keep_checkpoints=True)
    assert first.checkpoints_loaded == 0
    first.seek(first.end)
    first.seek(6_543_210)
    wanted = snapshot(first)
    taken = len(first.checkpoints.checkpoints) - 1
    assert taken >= 5 and first.save_checkpoints()
    first.close()

    second = Timeline(demo_trace, checkpoint_every=EVERY, keep_checkpoints=True)
    assert second.checkpoints_loaded == taken            # another process would do the same
    second.seek(6_543_210)                               # one restore and < 1 M instructions
    assert snapshot(second) == wanted
    assert second.checkpoints.stats.restores == 1
    second.seek(second.end)
    second.replayer._verify_end()                        # registers, RAM and console as recorded
    assert not second.save_checkpoints()                 # nothing new to keep
    second.close()


def test_a_damaged_checkpoint_file_is_ignored_and_replaced(demo_trace, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLAYVM_CACHE", str(tmp_path / "cache"))
    first = Timeline(demo_trace, checkpoint_every=EVERY, keep_checkpoints=True)
    first.seek(3_000_000)
    first.save_checkpoints()
    first.close()
    path = first.checkpoint_file
    data = bytearray(path.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
    path.write_bytes(bytes(data))
    again = Timeline(demo_trace, checkpoint_every=EVERY, keep_checkpoints=True)
    assert again.checkpoints_loaded == 0 and "ignored the kept checkpoints" in again.checkpoint_file_note
    again.seek(again.end)
    again.replayer._verify_end()
    assert again.save_checkpoints()
    again.close()


def test_cli_seek_keeps_checkpoints_for_the_next_run(demo_trace, tmp_path):
    env = dict(os.environ, REPLAYVM_CACHE=str(tmp_path / "cache"))
    command = [sys.executable, "-m", "replayvm.cli", "replay", str(demo_trace), "--seek", "i7000000",
               "--quiet", "--checkpoint-every", "1000000"]
    first = subprocess.run(command, capture_output=True, text=True, env=env)
    second = subprocess.run(command, capture_output=True, text=True, env=env)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "kept 7 checkpoints for the next run" in first.stderr
    assert "7 checkpoints kept from an earlier run (up to instruction 7,000,000)" in second.stderr
    assert first.stdout == second.stdout and "replay at instruction 7000000" in second.stdout


def test_many_reverse_steps_in_a_row_match_a_straight_replay(demo_trace):
    """A row of reverse steps (what gdb's reverse-next does) goes through fine checkpoints; every
    state must still be the recorded one, RAM included (page-table accessed/dirty bits too)."""
    straight = Timeline(demo_trace, checkpoint_every=EVERY)
    timeline = Timeline(demo_trace, checkpoint_every=EVERY)
    start = 3_000_050                                    # just past a checkpoint: the row crosses it
    timeline.seek(start)
    for steps in range(1, 301):
        assert timeline.reverse_step().reason == "step"
        if steps % 29 == 0 or steps in (49, 50, 51):
            straight.seek(start - steps)
            assert snapshot(timeline) == snapshot(straight), steps
    assert timeline.position == start - 300
    assert timeline._trail is not None and len(timeline._trail.fines) > 1
    timeline.seek(timeline.end)
    timeline.replayer._verify_end()
    straight.close()
    timeline.close()


def test_reading_an_unmapped_address_leaves_the_guest_alone(demo_trace):
    from replayvm.engines.base import GuestAddressFault

    timeline = Timeline(demo_trace, checkpoint_every=EVERY)
    timeline.seek(3_000_000)                             # paging on
    before = snapshot(timeline), timeline.registers().cr2
    try:
        timeline.read_memory(0x40000000, 4)              # not mapped by the demo kernel
    except GuestAddressFault:
        pass
    else:
        raise AssertionError("an unmapped address read as memory")
    assert (snapshot(timeline), timeline.registers().cr2) == before
    timeline.close()


def test_cli_seek_on_a_trace_cut_short_says_where_it_ends(demo_trace, tmp_path):
    cut = tmp_path / "cut.zst"
    cut.write_bytes(demo_trace.read_bytes()[:len(demo_trace.read_bytes()) * 2 // 3])
    result = subprocess.run([sys.executable, "-m", "replayvm.cli", "replay", str(cut), "--seek",
                             "i999999999", "--quiet", "--no-keep-checkpoints"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "was cut short" in result.stderr and "the recording ends at instruction" in result.stderr
    assert "replay at instruction" in result.stdout


def test_a_breakpoint_inside_a_block_stops_there_and_other_blocks_still_run_fast(demo_trace, monkeypatch):
    """Only a translated block holding a breakpoint counts instruction by instruction: the stops
    are those of the reference engine (every instruction hooked), on an instruction inside a
    block, while the rest of the guest runs in fast blocks (analyze --processes keeps up to 8
    breakpoints set for a whole replay)."""
    from capstone import CS_ARCH_X86, CS_MODE_32, Cs

    start = symbol("race_task")
    with open(guest_file("demo", "kernel.elf"), "rb") as f:
        elf = ELFFile(f)
        text = next(s for s in elf.iter_sections() if s["sh_addr"] <= start < s["sh_addr"] + s["sh_size"])
        code = text.data()[start - text["sh_addr"]:][:64]
    inside = [insn.address for insn in Cs(CS_ARCH_X86, CS_MODE_32).disasm(code, start)][2]

    def hits(reference: bool) -> tuple[list[int], int]:
        monkeypatch.setenv("REPLAYVM_EMU_REFERENCE", "1" if reference else "0")
        timeline = Timeline(demo_trace, checkpoint_every=EVERY)
        timeline.breakpoints.add(inside)
        found = []
        while (stop := timeline.cont()).reason == "break":
            assert stop.address == inside == timeline.registers().regs["rip"]
            found.append(stop.position)
        fast = timeline.engine.counting_statistics()["fast_blocks"]
        timeline.close()
        return found, fast

    reference, _ = hits(True)
    found, fast_blocks = hits(False)
    assert found == reference and len(found) == 4
    assert fast_blocks > 10_000
