"""Points in a recording as a person writes them: `replay --until`, `replay --seek` and gdb's
`monitor seek` all read them here, so that each takes the same forms.

- `N` is event N, numbered from 0 as `replay --until` stops after it and `analyze` numbers its
  rows (`exits.event`);
- `iN` is instruction count N (on emu; on kvm positions count exits);
- digits may be grouped with `_` or `,` (`i5_000_000`, `i5,000,000`: replayvm prints counts with
  commas, and a count copied from its output should be read back), case and the spaces around
  are ignored (`I200000`, ` i 200000 `).

Which instruction an event number means depends on the trace, so parsing gives a `Position` and
the caller resolves it against its trace (`Position.instruction(timeline.event_position)`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from replayvm.errors import UsageError

EVENT = "event"
INSTRUCTION = "instruction"
INSTRUCTION_PREFIX = "i"
FORMS = f"an event number or {INSTRUCTION_PREFIX}<instruction count>"
_COUNT = re.compile(r"\+?[0-9_,]*[0-9][0-9_,]*")


@dataclass(frozen=True)
class Position:
    """An event number (`unit` EVENT) or an instruction count (`unit` INSTRUCTION)."""

    count: int
    unit: str = INSTRUCTION

    @property
    def is_event(self) -> bool:
        return self.unit == EVENT

    def instruction(self, event_position: Callable[[int], int]) -> int:
        """The instruction count this names; `event_position(n)` gives event n's (and says, as a
        UsageError, when the trace has no event n)."""
        return event_position(self.count) if self.is_event else self.count

    def __str__(self) -> str:
        return f"event {self.count:,}" if self.is_event else f"instruction {self.count:,}"


def parse_count(text: str) -> int:
    """A whole number of 0 or more, digits grouped with `_` or `,` allowed. ValueError if not."""
    spec = text.strip()
    if not _COUNT.fullmatch(spec):
        raise ValueError(f"not a count: {text!r}")
    return int(spec.lstrip("+").replace("_", "").replace(",", ""))


def parse_position(text: str, option: str | None = None) -> Position:
    """`N` (event N) or `iN` (instruction N). Anything else is a UsageError naming `option`
    (`--until`, `--seek`) when given, so that the CLI's refusal is one line saying what it takes."""
    spec = text.strip().lower()
    unit = EVENT
    if spec.startswith(INSTRUCTION_PREFIX):
        unit, spec = INSTRUCTION, spec[len(INSTRUCTION_PREFIX):]
    try:
        return Position(parse_count(spec), unit)
    except ValueError:
        lead = f"{option} takes" if option else "a position is"
        raise UsageError(f"{lead} {FORMS}, not {text!r}") from None
