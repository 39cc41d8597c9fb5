"""`replayvm.analyze.query`, the Python API under `replayvm sql`: what the verb prints is what the
API returns, formatted, and a program can ask the same questions with parameters."""

from __future__ import annotations

import json

import pytest

from replayvm.analyze import QueryResult, query
from replayvm.errors import UsageError
from tests.test_cli import replayvm
from tests.test_command_lines import analysed, small_trace  # noqa: F401  (fixtures)


def test_parameters_fill_placeholders(analysed):  # noqa: F811
    everything = query(analysed, "SELECT count(*) FROM exits").rows[0][0]
    assert everything > 0
    by_position = query(analysed, "SELECT count(*) FROM exits WHERE seq >= ?", [0])
    by_name = query(analysed, "SELECT count(*) AS n FROM exits WHERE seq >= :first", {"first": 0})
    assert by_position.rows == by_name.rows == [(everything,)]
    assert query(analysed, "SELECT count(*) FROM exits WHERE seq < ?", (0,)).rows == [(0,)]


def test_parameters_that_do_not_fit_are_a_usage_error(analysed):  # noqa: F811
    with pytest.raises(UsageError, match="SQL error"):
        query(analysed, "SELECT * FROM exits WHERE seq = ?")
    with pytest.raises(UsageError, match="SQL error"):
        query(analysed, "SELECT 1", [1, 2])


def test_rows_as_dicts_are_what_sql_json_prints(analysed):  # noqa: F811
    statement = "SELECT source, count(*) AS n FROM interrupts GROUP BY source ORDER BY source"
    result = query(analysed, statement)
    assert isinstance(result, QueryResult) and result.columns == ["source", "n"]
    assert result.dicts() == [{"source": source, "n": n} for source, n in result.rows]
    printed = replayvm("sql", str(analysed), statement, "--json")
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == result.dicts()


def test_a_trace_is_queried_as_its_database_is(small_trace, analysed):  # noqa: F811
    statement = "SELECT kind, count(*) FROM exits GROUP BY kind ORDER BY kind"
    assert query(str(small_trace), statement).rows == query(analysed, statement).rows
