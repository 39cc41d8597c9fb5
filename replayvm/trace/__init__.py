"""The trace file: a versioned header, then independent zstd frames of msgpack records.

See docs/trace-format.md for the schema. `TraceWriter` appends records cheaply and flushes a
complete frame at least every 100 ms from a background thread, so a recorder that dies leaves a
file readable up to its last frame; `TraceReader` streams a trace, treating it as untrusted input.
"""

from replayvm.trace.format import Kind, TraceFormatError
from replayvm.trace.reader import TraceReader
from replayvm.trace.writer import TraceWriter

__all__ = ["Kind", "TraceFormatError", "TraceReader", "TraceWriter"]
