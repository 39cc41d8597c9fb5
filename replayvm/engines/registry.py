"""Which engine class a name means, for questions asked before any engine exists."""

from __future__ import annotations

from typing import TYPE_CHECKING

from replayvm.errors import UsageError

if TYPE_CHECKING:
    from replayvm.engines.base import Engine

ENGINE_NAMES = ("emu", "kvm")


def engine_class(name: str) -> "type[Engine]":
    """The class of the engine called `name`, imported on first use (each loads a C extension):
    its class attributes (`exact_positions`, `position_unit`) answer questions asked before
    there is a machine to build it on."""
    if name == "emu":
        from replayvm.engines.emu import EmuEngine

        return EmuEngine
    if name == "kvm":
        from replayvm.engines.kvm import KvmEngine

        return KvmEngine
    raise UsageError(f"unknown engine {name!r} (choose auto, kvm or emu)")
