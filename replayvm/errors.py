"""Exceptions that reach the user as one clear line (never a traceback)."""


class ReplayVMError(Exception):
    """Base for errors shown to the user as a single line; `exit_status` is the process status."""

    exit_status = 2


class UsageError(ReplayVMError):
    """Bad command line or input files (missing image, unknown option, ...)."""

    exit_status = 2


class EngineUnavailable(ReplayVMError):
    """The requested CPU engine cannot run here (no /dev/kvm, KVM refuses the guest...)."""

    exit_status = 2


class GuestFault(ReplayVMError):
    """The guest stopped in a way only it can be blamed for (triple fault, shutdown)."""

    exit_status = 1


class TraceWriteError(ReplayVMError):
    """The trace file could not be written (disk full, read-only, I/O error) while recording."""

    exit_status = 1
