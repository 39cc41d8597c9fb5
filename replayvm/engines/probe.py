"""Which engine can run a guest here: `choose_engine('auto'|'kvm'|'emu')`.

`auto` picks kvm only when KVM can run 32-bit paged protected mode, which the guests replayvm
boots (the demo guest, xv6) need. A tiny self-test answers that once per host boot: it enters
protected mode, enables paging with one 4 MiB page and writes a port. PVM, the software
hypervisor behind /dev/kvm on this project's machines, triple-faults instead.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

from replayvm.errors import EngineUnavailable

PROBE_PORT = 0x80
PROBE_VALUE = 0x42
PROBE_CODE_ADDR = 0x1000
PROBE_PAGE_DIRECTORY = 0x2000
# 32-bit code, entered in flat protected mode with paging off:
PROBE_CODE = bytes.fromhex(
    "b800200000"      # mov $0x2000, %eax          page directory
    "0f22d8"          # mov %eax, %cr3
    "0f20e0"          # mov %cr4, %eax
    "83c810"          # or  $0x10, %eax            CR4.PSE
    "0f22e0"          # mov %eax, %cr4
    "0f20c0"          # mov %cr0, %eax
    "0d00000080"      # or  $0x80000000, %eax      CR0.PG
    "0f22c0"          # mov %eax, %cr0
    "b042"            # mov $0x42, %al
    "e680"            # out %al, $0x80             only reached with paging on
    "f4"              # hlt
)


def _cache_file() -> Path:
    root = Path(os.environ.get("REPLAYVM_CACHE", Path.home() / ".cache" / "replayvm"))
    return root / "kvm-probe.json"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def kvm_usable() -> tuple[bool, str]:
    from replayvm.engines.kvm import kvm_device_path, open_kvm

    try:
        os.close(open_kvm())
    except EngineUnavailable as error:
        return False, str(error)
    return True, kvm_device_path()


class _ProbeMachine:
    """Just enough machine for the self-test: 4 MiB of RAM and a port that remembers."""

    def __init__(self) -> None:
        from replayvm.bus import Bus, PioBus
        from replayvm.clock import GuestClock

        self._map = mmap.mmap(-1, 4 << 20)
        self.ram = memoryview(self._map)
        self.pio = PioBus()
        self.mmio = Bus("mmio")
        self.clock = GuestClock()
        self.seen: list[int] = []
        probe = self

        class Port:
            def read(self, offset: int, size: int) -> int:
                return 0xFF

            def write(self, offset: int, size: int, value: int) -> None:
                probe.seen.append(value)

        self.pio.register(PROBE_PORT, 1, Port(), "probe")

        class NoInterrupts:
            def has_pending(self) -> bool:
                return False

            def acknowledge(self) -> int:
                raise AssertionError("no interrupts in the probe")

        self.interrupts = NoInterrupts()

    def poll(self) -> None:
        return None

    def read_tsc(self) -> int:
        return 0


def run_paging_probe() -> bool:
    """Run the self-test guest on KVM now (no cache)."""
    from replayvm.engines.base import CpuState, Segment
    from replayvm.engines.kvm import KvmEngine

    machine = _ProbeMachine()
    machine.ram[PROBE_CODE_ADDR:PROBE_CODE_ADDR + len(PROBE_CODE)] = PROBE_CODE
    machine.ram[PROBE_PAGE_DIRECTORY:PROBE_PAGE_DIRECTORY + 4] = struct.pack("<I", 0x83)
    engine = KvmEngine(machine)
    try:
        state = CpuState()
        state.regs = {name: 0 for name in CpuState.GPR_NAMES}
        state.regs.update(rip=PROBE_CODE_ADDR, rflags=2, rsp=0x8000)
        state.cr0 = 0x11
        state.cs = Segment(selector=0x08, limit=0xFFFFFFFF, type=0xB, db=1, g=1)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(state, name, Segment(selector=0x10, limit=0xFFFFFFFF, type=3, db=1, g=1))
        engine.set_state(state)
        engine.run(budget_ns=2_000_000_000)
    finally:
        engine.close()
    return machine.seen == [PROBE_VALUE]


def kvm_runs_paged32() -> bool:
    """The self-test's answer, cached per host boot."""
    cache = _cache_file()
    boot = _boot_id()
    try:
        cached = json.loads(cache.read_text())
        if cached.get("boot_id") == boot and cached.get("device") == os.environ.get("REPLAYVM_KVM_DEVICE", "/dev/kvm"):
            return bool(cached["paged32"])
    except (OSError, ValueError, KeyError):
        pass
    answer = run_paging_probe()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"boot_id": boot, "paged32": answer,
                                     "device": os.environ.get("REPLAYVM_KVM_DEVICE", "/dev/kvm")}))
    except OSError:
        pass
    return answer


def kvm_vcpu_limit() -> int:
    """How many vCPUs the host's KVM runs in one VM (KVM_CAP_NR_VCPUS)."""
    from replayvm.engines.kvm import open_kvm, vcpu_limit

    fd = open_kvm()
    try:
        return vcpu_limit(fd)
    finally:
        os.close(fd)


def choose_engine(requested: str, long_mode: bool = False, cpus: int = 1) -> tuple[str, str]:
    """(engine, reason) for 'auto', 'kvm' or 'emu'; raises EngineUnavailable for an impossible kvm.
    A `long_mode` guest (64-bit, paged only in long mode) runs on any usable KVM, PVM included;
    `cpus` above the host's vCPU limit need emu (an explicit kvm is refused by the engine)."""
    if requested == "emu":
        return "emu", "requested"
    usable, detail = kvm_usable()
    if requested == "kvm":
        if not usable:
            raise EngineUnavailable(detail)
        return "kvm", "requested"
    if requested != "auto":
        raise EngineUnavailable(f"unknown engine {requested!r} (choose auto, kvm or emu)")
    if not usable:
        return "emu", f"no usable KVM ({detail})"
    if cpus > 1 and cpus > (limit := kvm_vcpu_limit()):
        return "emu", f"KVM here runs at most {limit} vCPUs, the guest gets {cpus} CPUs"
    if long_mode:
        return "kvm", "KVM runs 64-bit long-mode guests here"
    if not kvm_runs_paged32():
        return "emu", ("KVM here cannot run 32-bit paged protected mode (a software hypervisor "
                       "such as PVM), which the guest needs")
    return "kvm", "KVM runs 32-bit paged guests here"
