"""Interrupt lines from devices to the interrupt controllers.

A device holds an IrqLine and raises or lowers it; the line forwards the level to every controller
attached to its pin (the IOAPIC and the legacy PIC both see ISA IRQs, as on a real PC).
"""

from __future__ import annotations

from typing import Protocol


class IrqSink(Protocol):
    def set_irq(self, pin: int, level: bool) -> None: ...


class IrqLine:
    """One interrupt pin. Edge-triggered users call pulse(); level users raise_()/lower()."""

    __slots__ = ("pin", "_sinks", "level")

    def __init__(self, pin: int, sinks: list[IrqSink] | None = None) -> None:
        self.pin = pin
        self._sinks: list[IrqSink] = sinks if sinks is not None else []
        self.level = False

    def connect(self, sink: IrqSink) -> None:
        self._sinks.append(sink)

    def set_level(self, level: bool) -> None:
        self.level = level
        for sink in self._sinks:
            sink.set_irq(self.pin, level)

    def restore_level(self, level: bool) -> None:
        """Put the line back at `level` without telling the controllers: restoring a snapshot,
        whose controllers' own state already holds the levels they saw."""
        self.level = level

    def raise_(self) -> None:
        self.set_level(True)

    def lower(self) -> None:
        self.set_level(False)

    def pulse(self) -> None:
        self.set_level(True)
        self.set_level(False)
