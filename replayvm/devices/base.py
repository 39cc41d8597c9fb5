"""Small pieces shared by device models."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol


class InterruptSource(Protocol):
    """What the CPU engine asks of the interrupt controllers (in practice: the LAPIC)."""

    def has_pending(self) -> bool:
        """An external interrupt is ready to be taken once the CPU allows it (EFLAGS.IF=1)."""
        ...

    def acknowledge(self) -> int:
        """Take the highest-priority pending interrupt (IRR -> ISR) and return its vector."""
        ...


class StatefulDevice(Protocol):
    """A device whose state can be saved and restored (checkpoints, going live after a seek).

    `state()` returns a frozen dataclass of plain values (its `state_type`), complete enough for
    a fresh device restored from it to go on exactly as this one would; it is immutable, so a
    checkpoint kept in memory may hold it as it is. `restore()` puts the device back, setting
    its interrupt line's level without telling the controllers (they have state of their own).
    See replayvm.devices.state for the plain (msgpack) form."""

    state_type: ClassVar[type]

    def state(self) -> Any: ...

    def restore(self, state: Any) -> None: ...


def size_mask(size: int) -> int:
    return (1 << (8 * size)) - 1
