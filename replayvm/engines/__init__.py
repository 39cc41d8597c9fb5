"""CPU engines: `kvm` (the KVM API through cffi) and `emu` (Unicorn), behind one interface
(`replayvm.engines.base.Engine`)."""

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
