"""One reader of positions (replay.positions) behind `replay --until`, `replay --seek` and gdb's
`monitor seek`: the same forms everywhere, and the same one-line refusal of anything else."""

from __future__ import annotations

import pytest

from replayvm.errors import UsageError
from replayvm.replay.gdbstub import GdbStub
from replayvm.replay.positions import EVENT, INSTRUCTION, Position, parse_count, parse_position
from tests.test_cli import assert_one_line_error, replayvm
from tests.test_command_lines import small_trace  # noqa: F401  (a fixture)


@pytest.mark.parametrize("text, count, unit", [
    ("100", 100, EVENT), ("0", 0, EVENT), (" 7 ", 7, EVENT), ("+7", 7, EVENT), ("1_000", 1000, EVENT),
    ("1__0", 10, EVENT), ("_5", 5, EVENT),                     # underscores anywhere, as before
    ("i200000", 200_000, INSTRUCTION), ("I200000", 200_000, INSTRUCTION),
    ("i5_000_000", 5_000_000, INSTRUCTION), ("i_5", 5, INSTRUCTION), ("i 5", 5, INSTRUCTION),
    ("i5,000,000", 5_000_000, INSTRUCTION), ("2,000", 2000, EVENT),   # as replayvm prints counts
])
def test_every_accepted_form(text, count, unit):
    assert parse_position(text) == Position(count, unit)


@pytest.mark.parametrize("text", ["", "i", "soon", "-5", "i-5", "0x10", "i0x10", "5e6", "1.5", "ii5",
                                  "_", ",", "5 5"])
def test_anything_else_is_a_usage_error_naming_the_option(text):
    with pytest.raises(UsageError, match=r"^--seek takes an event number or i<instruction count>, not "):
        parse_position(text, "--seek")
    with pytest.raises(UsageError, match=r"^a position is an event number or i<instruction count>"):
        parse_position(text)


def test_a_position_resolves_against_its_trace():
    events = [10, 25, 40]

    def event_position(index: int) -> int:
        if not 0 <= index < len(events):
            raise UsageError(f"no event {index}")
        return events[index]

    assert parse_position("1").instruction(event_position) == 25
    assert parse_position("i1").instruction(event_position) == 1
    with pytest.raises(UsageError, match="no event 3"):
        parse_position("3").instruction(event_position)
    assert str(parse_position("i5000000")) == "instruction 5,000,000"


def test_counts_take_the_same_digit_groups():
    assert parse_count("5,000,000") == parse_count("5_000_000") == 5_000_000
    with pytest.raises(ValueError):
        parse_count("-1")


class _Timeline:
    """What `monitor seek` reads of a timeline."""

    x86_64 = False                      # a 32-bit guest: gdb's i386 registers

    def __init__(self) -> None:
        self.position = 0
        self.sought: list[int] = []
        self.progress = None

    def event_position(self, index: int) -> int:
        if index > 2:
            raise UsageError(f"no event {index}: the trace has 3")
        return 1000 * (index + 1)

    def seek(self, position: int) -> None:
        self.sought.append(position)
        self.position = position

    def when(self) -> str:
        return f"instruction {self.position}"

    def registers(self):
        return type("Registers", (), {"regs": {"rip": 0x7C00}})()


@pytest.mark.parametrize("argument, wanted", [("i5,000", 5000), ("i5_000", 5000), ("2", 3000)])
def test_monitor_seek_reads_positions_as_the_command_line_does(argument, wanted):
    timeline = _Timeline()
    reply = bytes.fromhex(GdbStub(timeline)._monitor(f"seek {argument}").decode()).decode()
    assert timeline.sought == [wanted] and reply.startswith(f"now at instruction {wanted}")


def test_monitor_seek_refuses_a_bad_position_in_one_line():
    timeline = _Timeline()
    for argument, said in (("soon", "a position is an event number"), ("i-5", "a position is"),
                           ("7", "no event 7")):
        reply = bytes.fromhex(GdbStub(timeline)._monitor(f"seek {argument}").decode()).decode()
        assert said in reply and reply.count("\n") == 1, reply
    assert timeline.sought == []


# ------------------------------------------------------------------------------- the command line
def test_replay_until_takes_commas_and_underscores(small_trace):  # noqa: F811
    plain = replayvm("replay", "--quiet", "--until", "i100000", str(small_trace))
    assert plain.returncode == 0, plain.stderr
    for spelled in ("i100_000", "i100,000", "I100000"):
        again = replayvm("replay", "--quiet", "--until", spelled, str(small_trace))
        assert again.returncode == 0 and again.stdout == plain.stdout, (spelled, again.stderr)


@pytest.mark.parametrize("option", ["--until", "--seek"])
@pytest.mark.parametrize("value", ["soon", "-5", "i-5"])
def test_replay_refuses_a_bad_position_in_one_line(small_trace, option, value):  # noqa: F811
    assert_one_line_error(replayvm("replay", str(small_trace), option, value, "--no-keep-checkpoints"),
                          f"{option} takes an event number or i<instruction count>")
