"""replayvm: record an x86 guest's session, replay it exactly, and query it in SQLite."""

__version__ = "0.7.0"
