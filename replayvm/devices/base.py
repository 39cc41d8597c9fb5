"""Small pieces shared by device models."""

from __future__ import annotations

from typing import Protocol


class InterruptSource(Protocol):
    """What the CPU engine asks of the interrupt controllers (in practice: the LAPIC)."""

    def has_pending(self) -> bool:
        """An external interrupt is ready to be taken once the CPU allows it (EFLAGS.IF=1)."""
        ...

    def acknowledge(self) -> int:
        """Take the highest-priority pending interrupt (IRR -> ISR) and return its vector."""
        ...


def size_mask(size: int) -> int:
    return (1 << (8 * size)) - 1
