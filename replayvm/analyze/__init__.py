"""Traces in SQLite: `loader.load_trace` builds a database (`replayvm analyze`), `query` asks it
read-only questions (`replayvm sql`)."""

from replayvm.analyze.sql import QueryResult, query

__all__ = ["QueryResult", "query"]
