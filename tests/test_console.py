"""The console: escapes, prompt-paced scripted input, and stop conditions."""

from __future__ import annotations

import io

import pytest

from replayvm.console import Console, decode_escapes
from replayvm.errors import UsageError


def type_out(console: Console, text: bytes) -> None:
    for byte in text:
        console.write(byte)


def test_c_escapes_are_decoded():
    assert decode_escapes(r"ls\n") == b"ls\n"
    assert decode_escapes(r"a\tb\\c\x41\x7f") == b"a\tb\\cA\x7f"
    with pytest.raises(UsageError, match=r"unknown escape '\\xZZ'"):    # typed literally, it
        decode_escapes(r"\xZZ")                                       # was a silent surprise


def test_script_lines_are_typed_one_per_prompt_and_the_session_ends_after_the_last():
    console = Console(io.BytesIO(), script=b"ls\necho hi\n")
    assert console.take_input() == b""                    # no prompt yet: nothing typed
    type_out(console, b"booting...\n$ ")
    assert console.take_input() == b"ls\n"
    assert console.take_input() == b""                    # the same prompt is not reused
    type_out(console, b"ls\nREADME\n$ ")
    assert console.take_input() == b"echo hi\n"
    assert not console.finished
    type_out(console, b"echo hi\nhi\n$ ")
    assert console.take_input() == b""
    assert console.finished and console.script_done


def test_until_matches_text_split_across_writes():
    console = Console(io.BytesIO(), until=b"ALL TESTS PASSED")
    type_out(console, b"... ALL TESTS ")
    console.take_input()
    assert not console.finished
    type_out(console, b"PASSED\n")
    console.take_input()
    assert console.until_matched and console.finished


def test_output_reaches_the_terminal_stream_and_the_transcript():
    sink = io.BytesIO()
    console = Console(sink)
    type_out(console, b"hello")
    console.flush()
    assert sink.getvalue() == b"hello" and console.text() == "hello"
