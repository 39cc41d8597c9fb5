"""Bad command lines (issue 10, item 9): every one is a one-line error, never a traceback, and no
path the user named is deleted or left with stray files unless this run created it."""

from __future__ import annotations

import io
import os
import stat
import subprocess
from pathlib import Path

import pytest

from replayvm.record.session import SessionOptions, run_session
from tests.test_cli import assert_one_line_error, replayvm

ECHO = ("--engine", "emu", "--virtual-clock", "--input", r"echo hi\n")


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory) -> Path:
    trace = tmp_path_factory.mktemp("trace") / "t.zst"
    outcome, _ = run_session(SessionOptions(engine="emu", script=b"echo hi\n", trace=trace, timeout_s=60,
                                            virtual_clock=True), output=io.BytesIO())
    assert outcome.reason == "script-done"
    return trace


@pytest.fixture(scope="module")
def broken_trace(small_trace, tmp_path_factory) -> Path:
    """A trace whose header reads fine but whose last frame is corrupt: analyze fails mid-load."""
    data = bytearray(small_trace.read_bytes())
    data[-20] ^= 0xFF
    broken = tmp_path_factory.mktemp("broken") / "broken.zst"
    broken.write_bytes(bytes(data))
    return broken


def assert_one_line_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Like assert_one_line_error, for failures that are not usage errors (exit status 1)."""
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("replayvm: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def mount_tmpfs(where: Path, options: str) -> Path:
    """A real tmpfs (read-only or tiny) at `where`, or a skip where mounting is not permitted
    (root's permission bits mean nothing to root: only a read-only mount really refuses it)."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    return where


@pytest.fixture
def read_only_dir(tmp_path):
    where = mount_tmpfs(tmp_path / "ro", "ro,size=64k")
    yield where
    subprocess.run(["umount", str(where)], check=False)


@pytest.fixture
def tiny_dir(tmp_path):
    where = mount_tmpfs(tmp_path / "tiny", "size=8k")
    yield where
    subprocess.run(["umount", str(where)], check=False)


# ------------------------------------------------------------------------------- analyze -o
def test_failed_analyze_keeps_an_empty_file_it_did_not_create(broken_trace, tmp_path):
    existing = tmp_path / "mine.db"
    existing.write_bytes(b"")
    assert_one_line_error(replayvm("analyze", str(broken_trace), "-o", str(existing)), "corrupt")
    assert existing.is_file() and existing.stat().st_size == 0


def test_failed_analyze_deletes_the_database_it_created(broken_trace, tmp_path):
    fresh = tmp_path / "fresh.db"
    assert_one_line_error(replayvm("analyze", str(broken_trace), "-o", str(fresh)), "corrupt")
    assert sorted(os.listdir(tmp_path)) == []


def test_analyze_never_touches_a_device_file(broken_trace, tmp_path):
    # A character device like /dev/null (1, 3), made here so the real one is never at stake.
    device = tmp_path / "null"
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod needs root")
    link = tmp_path / "link.db"
    link.symlink_to(device)
    for path in (device, link):
        assert_one_line_error(replayvm("analyze", str(broken_trace), "-o", str(path)), "not a regular file")
        assert stat.S_ISCHR(os.stat(path).st_mode)


def test_analyze_refuses_a_fifo_without_opening_it(broken_trace, tmp_path):
    fifo = tmp_path / "pipe.db"
    os.mkfifo(fifo)
    assert_one_line_error(replayvm("analyze", str(broken_trace), "-o", str(fifo), timeout=30),
                          "not a regular file")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_analyze_into_a_folder_a_missing_folder_or_a_read_only_one(small_trace, tmp_path, read_only_dir):
    assert_one_line_error(replayvm("analyze", str(small_trace), "-o", str(tmp_path)), "is a folder")
    assert_one_line_error(replayvm("analyze", str(small_trace), "-o", str(tmp_path / "no" / "t.db")),
                          "does not exist")
    assert_one_line_error(replayvm("analyze", str(small_trace), "-o", str(read_only_dir / "t.db")),
                          "Read-only file system")


# ------------------------------------------------------------------------------- sql
def test_sql_on_a_folder_is_one_line(tmp_path):
    assert_one_line_error(replayvm("sql", str(tmp_path), "SELECT 1"), "is a folder")


def test_sql_on_a_fifo_is_one_line_not_a_wait(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert_one_line_error(replayvm("sql", str(fifo), "SELECT 1", timeout=30), "not a regular file")


@pytest.fixture(scope="module")
def analysed(small_trace, tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("db") / "t.db"
    result = replayvm("analyze", str(small_trace), "-o", str(db))
    assert result.returncode == 0, result.stderr
    return db


@pytest.mark.parametrize("statement", ["VACUUM INTO '{out}'", "ATTACH '{out}' AS other",
                                       "PRAGMA page_size = 1024", "DELETE FROM exits"])
def test_sql_refuses_statements_that_write_files(analysed, tmp_path, statement):
    out = tmp_path / "copy.db"
    result = replayvm("sql", str(analysed), statement.format(out=out))
    assert_one_line_error(result, "readonly")
    assert not out.exists()


def test_sql_leaves_no_files_next_to_the_database(small_trace, tmp_path):
    from replayvm.analyze.loader import load_trace

    db = tmp_path / "t.db"
    load_trace(small_trace, db)                  # a WAL-mode database, as analyze leaves it
    assert os.listdir(tmp_path) == ["t.db"]
    result = replayvm("sql", str(db), "SELECT count(*) AS n FROM exits", "--csv")
    assert result.returncode == 0 and int(result.stdout.splitlines()[1]) > 0, result.stderr
    schema = replayvm("sql", str(db), "PRAGMA table_info(exits)", "--csv")
    assert schema.returncode == 0 and "position" in schema.stdout, schema.stderr
    assert os.listdir(tmp_path) == ["t.db"]


def test_query_api_reads_a_trace_or_a_database(small_trace, analysed):
    from replayvm.analyze import query

    direct, stored = (query(source, "SELECT count(*) AS n FROM exits") for source in (small_trace, analysed))
    assert direct.columns == ["n"] and direct.rows == stored.rows and direct.rows[0][0] > 0


# ------------------------------------------------------------------------------- record -o
def test_record_into_a_missing_folder(tmp_path):
    assert_one_line_error(replayvm("record", *ECHO, "-o", str(tmp_path / "no" / "t.zst")), "does not exist")


def test_record_onto_dev_full_is_one_line():
    assert_one_line_error(replayvm("record", *ECHO, "-o", "/dev/full"), "No space left")


def test_record_into_a_read_only_file_system(read_only_dir):
    assert_one_line_error(replayvm("record", *ECHO, "-o", str(read_only_dir / "t.zst")),
                          "Read-only file system")


def test_record_into_proc_is_one_line():
    result = replayvm("record", *ECHO, "-o", "/proc/replayvm-test.zst")
    assert_one_line_error(result, "cannot write trace")


def test_disk_filling_up_while_recording_keeps_what_was_written(tiny_dir):
    # 8 KiB hold the header frame and a little more: the rest of the session does not fit.
    trace = tiny_dir / "t.zst"
    result = replayvm("record", "--engine", "emu", "--virtual-clock", "--input", r"echo hello\nrace\n",
                      "-o", str(trace))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0], result.stderr
    info = replayvm("info", str(trace))
    assert info.returncode == 0 and "TRUNCATED" in info.stdout, info


# ------------------------------------------------------------------------------- numbers and escapes
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "soon"])
def test_timeout_must_be_a_finite_positive_number(value):
    assert_one_line_error(replayvm("record", *ECHO, f"--timeout={value}"), "--timeout")


@pytest.mark.parametrize("value", ["0", "-5", "x"])
def test_checkpoint_every_must_be_positive(small_trace, value):
    assert_one_line_error(replayvm("replay", str(small_trace), "--seek", "1", f"--checkpoint-every={value}"),
                          "--checkpoint-every")


@pytest.mark.parametrize("text, named", [(r"echo \q\n", r"'\q'"), (r"echo \x4g\n", r"'\x4g'"),
                                         (r"ls\n\x", r"'\x'")])
def test_unknown_input_escape_is_named(text, named):
    assert_one_line_error(replayvm("record", "--engine", "emu", "--virtual-clock", "--timeout", "5",
                                   "--input", text), "unknown escape", named)


def test_trailing_backslash_is_an_error_not_a_session_to_its_timeout():
    assert_one_line_error(replayvm("record", "--engine", "emu", "--virtual-clock", "--timeout", "5",
                                   "--input", "echo hi\\"), "lone backslash")


def test_bad_escape_in_prompt_or_until_names_the_option():
    assert_one_line_error(replayvm("record", *ECHO, "--until", r"done\z"), "--until", r"'\z'")
    assert_one_line_error(replayvm("record", *ECHO, "--prompt", "$\\"), "--prompt")


# ------------------------------------------------------------------------------- disks
def test_a_huge_unbootable_disk_is_refused_from_its_first_sector(tmp_path, monkeypatch):
    from replayvm import machine as machine_module
    from replayvm.console import Console
    from replayvm.errors import UsageError

    huge = tmp_path / "huge.img"
    with huge.open("wb") as f:
        f.truncate(3 << 30)                  # 3 GiB, sparse: no boot signature

    class NotToBeRead:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the whole image was read before the boot sector was checked")

    monkeypatch.setattr(machine_module, "Disk", NotToBeRead)
    config = machine_module.MachineConfig(disks=[huge], engine="emu")
    with pytest.raises(UsageError, match="boot signature"):
        machine_module.Machine(config, Console(io.BytesIO()))


def test_a_huge_unbootable_disk_is_one_line_on_the_command_line(tmp_path):
    huge = tmp_path / "huge.img"
    with huge.open("wb") as f:
        f.truncate(3 << 30)
    assert_one_line_error(replayvm("record", "--engine", "emu", "--disk", str(huge), timeout=60),
                          "boot signature")


# ------------------------------------------------------------------------------- --until-fail
def test_until_fail_with_no_matching_run_keeps_no_trace_and_tells_each_run(tmp_path):
    trace = tmp_path / "bug.zst"
    result = replayvm("record", *ECHO, "--chaos", "--seed", "11", "--repeat", "2",
                      "--until-fail", "NEVER PRINTED", "-o", str(trace))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    runs = [line for line in result.stderr.splitlines() if line.startswith("replayvm: run ")]
    assert runs == [f"replayvm: run {k} of 2 (chaos seed {10 + k}): script-done, no match" for k in (1, 2)]
    assert result.stderr.strip().splitlines()[-1] == \
        "replayvm: no run of 2 matched 'NEVER PRINTED'; no trace kept"
    assert os.listdir(tmp_path) == []                 # neither the last run's trace nor a scratch file


def test_until_fail_never_replaces_a_trace_with_a_run_that_did_not_match(tmp_path):
    trace = tmp_path / "earlier.zst"
    trace.write_bytes(b"an earlier recording")
    result = replayvm("record", *ECHO, "--repeat", "2", "--until-fail", "NEVER PRINTED", "-o", str(trace))
    assert result.returncode == 1
    assert trace.read_bytes() == b"an earlier recording" and os.listdir(tmp_path) == ["earlier.zst"]


def test_repeat_without_until_fail_is_refused():
    assert_one_line_error(replayvm("record", *ECHO, "--repeat", "3"), "--repeat needs --until-fail")


def test_until_fail_keeps_the_matching_run_and_says_so(tmp_path):
    from replayvm.replay.replayer import replay

    trace = tmp_path / "hi.zst"
    result = replayvm("record", *ECHO, "--repeat", "3", "--until-fail", "hi", "-o", str(trace))
    assert result.returncode == 0, result.stderr
    assert "replayvm: run 1 of 3: script-done, matched" in result.stderr
    assert f"run 1 of 3 matched 'hi'; trace kept in {trace}" in result.stderr
    assert os.listdir(tmp_path) == ["hi.zst"] and replay(trace).verified


def test_sql_reads_a_database_whose_path_looks_like_a_uri(analysed, tmp_path):
    # The read-only open is a file: URI; '?', '#' and '%' in the path must not end or bend it.
    odd = tmp_path / "what?#100%" / "a b.db"
    odd.parent.mkdir()
    odd.write_bytes(analysed.read_bytes())
    result = replayvm("sql", str(odd), "SELECT count(*) AS n FROM exits", "--csv")
    assert result.returncode == 0 and int(result.stdout.splitlines()[1]) > 0, result.stderr
    assert os.listdir(odd.parent) == ["a b.db"]


def test_a_bad_escape_is_refused_before_the_engine_is_chosen():
    """With --engine auto the choice is announced on stderr: a refused command line says only
    what is wrong, in one line, before anything is probed."""
    result = replayvm("record", "--input", r"echo \q\n")
    assert_one_line_error(result, "unknown escape")
    assert "engine" not in result.stderr
