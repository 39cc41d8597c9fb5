"""The `kvm` CPU engine: one vCPU through the KVM API (cffi), interrupt controllers in userspace.

There is no in-kernel irqchip: the machine's LAPIC decides which interrupt is pending and this
engine injects it with KVM_INTERRUPT when the guest can take it (IF=1, no interrupt shadow),
otherwise it asks KVM for an interrupt-window exit. A guest that runs without exits still gets its
timer interrupts: a kicker thread interrupts KVM_RUN at the next timer deadline (immediate_exit
plus a signal to the vCPU thread, so a kick that arrives between two KVM_RUNs is not lost).

On this project's hosts /dev/kvm is PVM, which cannot run 32-bit paged protected mode: the guest
triple-faults when it sets CR0.PG. That case is recognised and reported as UNSUPPORTED with a
message pointing at `--engine emu`, rather than as a guest crash.

Where an interrupt lands between exits (after a kick), replay must find that point again by its
registers (a landmark: a hardware breakpoint at RIP, then register matching). Two kinds of point
cannot be found that way, so the recorder does not inject there but single-steps on to the next
point that can be (`_placeable_landmark`): the middle of a `rep` string instruction (RF set: a
breakpoint only stops at the instruction's start), and native ring-3 code, which on PVM gives no
debug exits at all (a single-step there even leaks to the guest as its own #DB): the recorder
puts hardware breakpoints on the kernel's entry points for ring-3 code (the IDT gates of #UD,
which is how PVM delivers `int 0x80` from ring 3, of #GP and #PF, and of `int 0x80` itself) and
places the interrupt at the first of them the task reaches, or at the next synchronous exit,
whichever comes first. An interrupt that arrives while a
ring-3 task computes is thus delivered at the task's next entry into the kernel: exact, with a
latency bounded by how often the task enters the kernel (a task that never does is not
preempted while recording on PVM; hardware KVM has the same landmark limits but real debug exits).
Elsewhere in the kernel the breakpoint finds every landmark (measured on PVM: at a backward jump's
target, after an iretq, at a window exit; tests/test_kvm_engine.py, tests/test_long_mode.py). One
kind it cannot tell apart: a landmark is registers, not memory, so in a loop whose iterations change
memory but no register (`1: incq counter; cmpq $3, ticks; jb 1b`) every iteration has the same
landmark, replay takes the first one after the last exit, and the trace diverges (measured: 6 of 6
recordings of such a loop); without a PMU to count branches that needs a memory digest in the
landmark. Record such a guest with `--engine emu`.

Several CPUs (`--cpus N`, at most the host's KVM_CAP_NR_VCPUS): one KVM vCPU per CPU, each with
its own kvm_run page and its own initial APIC ID in CPUID, all run by the one engine thread, one at
a time (serialised), so positions stay one count of synchronous exits over all CPUs and the
interleaving is the engine's to choose and the trace's to repeat. The APs wait for their STARTUP
IPI (their vCPU is not run at all) and then start in real mode at its vector, as on the emu
engine. The machine's scheduler (replayvm.schedule; on replay the trace's SWITCH records) is asked
between KVM_RUNs; a switch is just running another vCPU's file descriptor. While recording, a CPU
changes turns at a synchronous exit once its turn of exits is over, when it halts and another CPU
can run, and -- so that a CPU spinning on a lock in memory, with no exit at all, does not starve
the one holding it -- after TURN_TIME_NS without an exit while another CPU could run: the kicker
interrupts KVM_RUN and the switch lands at a placeable point, with a landmark, exactly as an
interrupt between exits does (the SWITCH record carries it; replay runs the CPU to it by
breakpoint and registers before switching).
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import struct
import threading
from collections import Counter

from contextlib import contextmanager
from typing import Callable, Iterator

from replayvm.engines._kvm import ffi, lib
from replayvm.engines.base import (CPU_RUNNING, CPU_STARTING, CPU_WAIT_SIPI, CpuModes, CpuState, MachineView,
                                   Segment, StopReason, real_mode_state)
from replayvm.errors import EngineUnavailable, UsageError

# A CPU that runs this long (guest time) without a synchronous exit, while another CPU could run,
# is switched away between exits (see the module docstring): a spinlock's waiter wastes at most
# this much of the lock holder's time (plus a kick's latency, 35-90 us on PVM). Only exit-free
# stretches count, so a CPU that exits ends its turns by its count of exits alone: the schedule
# of such code does not depend on host timing.
TURN_TIME_NS = 2_000_000
WAITING_FOR_STARTUP = "waiting for its STARTUP IPI"

KVM_API_VERSION = 12
KICK_SIGNAL = signal.SIGUSR1
KICK_SLACK_NS = 100_000                # re-arming for a deadline this close is not worth a wakeup
TSS_ADDR = 0xFFFBD000                  # three pages KVM needs for real-mode emulation on VMX,
IDENTITY_MAP_ADDR = 0xFFFBC000         # placed just below the BIOS area at the top of 4 GiB
CR0_PE = 1 << 0
CR0_PG = 1 << 31
EFER_LMA = 1 << 10
CPUID_ECX_RDRAND = 1 << 30
CPUID_ECX_X2APIC = 1 << 21
CPUID_EBX_RDSEED = 1 << 18
EFLAGS_IF = 1 << 9
EFLAGS_RF = 1 << 16                    # resume flag: set while an instruction is half done (a rep)
KVM_INTERNAL_ERROR_EMULATION = 1
EMULATION_FLAG_INSTRUCTION_BYTES = 1
SOFTWARE_INTERRUPT_OPCODES = (0xCC, 0xCD, 0xCE)      # INT3, INT n, INTO


PLACEMENT_STEP_LIMIT = 2_000            # kernel instructions stepped at most to place one interrupt
IRETQ, IRET = b"\x48\xcf", b"\xcf"
RING3_ENTRY_VECTORS = (6, 13, 14, 0x80)     # #UD (PVM's int 0x80 from ring 3), #GP, #PF, int 0x80
SYNCHRONOUS_EXIT_REASONS = (lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO, lib.KVM_EXIT_HLT)

# The hottest fields of kvm_run, read with struct at offsets the compiler gave cffi.
EXIT_REASON = struct.Struct("<I")
EXIT_REASON_OFFSET = ffi.offsetof("struct kvm_run", "exit_reason")
EXIT_IO = struct.Struct("<BBHIQ")              # direction, size, port, count, data_offset
EXIT_IO_OFFSET = ffi.offsetof("struct kvm_run", "io")


def kvm_device_path() -> str:
    """The KVM device (REPLAYVM_KVM_DEVICE overrides /dev/kvm, e.g. to test a host without it)."""
    return os.environ.get("REPLAYVM_KVM_DEVICE", "/dev/kvm")


def open_kvm() -> int:
    path = kvm_device_path()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        raise EngineUnavailable(f"the kvm engine needs {path}: {error.strerror}") from None
    version = lib.replayvm_ioctl_int(fd, lib.KVM_GET_API_VERSION, 0)
    if version != KVM_API_VERSION:
        os.close(fd)
        raise EngineUnavailable(f"{path} speaks KVM API {version}, replayvm needs {KVM_API_VERSION}")
    return fd


def vcpu_limit(kvm_fd: int) -> int:
    """How many vCPUs this host's KVM recommends for one VM (KVM_CAP_NR_VCPUS; at least 1)."""
    return max(1, lib.replayvm_ioctl_int(kvm_fd, lib.KVM_CHECK_EXTENSION, lib.KVM_CAP_NR_VCPUS))


def too_many_cpus(cpus: int, limit: int) -> str:
    """The one-line refusal of --cpus above the host's limit."""
    return (f"--cpus {cpus} is more than this host's KVM runs ({limit} vCPUs, KVM_CAP_NR_VCPUS): "
            f"give --cpus {limit} or fewer, or --engine emu")


def _ioctl(fd: int, request: int, arg=None, what: str = "ioctl") -> int:
    if arg is None or isinstance(arg, int):
        result = lib.replayvm_ioctl_int(fd, request, arg or 0)
    else:
        result = lib.replayvm_ioctl_ptr(fd, request, arg)
    if result < 0:
        raise OSError(-result, f"{what}: {os.strerror(-result)}")
    return result


class _Kicker:
    """Interrupts KVM_RUN at a deadline in guest time (timer, run budget) or on request."""

    def __init__(self, run, thread_id: int, clock) -> None:
        self._run = run
        self._thread_id = thread_id
        self._clock = clock
        self._deadline_ns: int | None = None
        self._armed = False                # False: the deadline passes without a kick
        self._cond = threading.Condition()
        self._closed = False
        self.kicks = 0
        self._thread = threading.Thread(target=self._loop, name="kvm-kicker", daemon=True)
        self._thread.start()

    def arm(self, deadline_ns: int | None) -> None:
        """Kick when the guest clock reaches `deadline_ns`; None disarms. Cheap when unchanged,
        which is the common case: deadlines are absolute, so they stay put between exits. Only
        an earlier deadline wakes the kicker thread: it wakes at the earlier one anyway and looks
        again, and a disarmed deadline passes without a kick (so arming the same one again, as
        every run() after a debug stop does, costs no thread switch)."""
        if deadline_ns is None:
            self._armed = False
            return
        self._armed = True
        current = self._deadline_ns
        if current is not None and abs(deadline_ns - current) < KICK_SLACK_NS:
            return
        with self._cond:
            self._deadline_ns = deadline_ns
            if current is None or deadline_ns < current:
                self._cond.notify()

    def use_run(self, run) -> None:
        """Several CPUs: the vCPU whose kvm_run page a kick marks from now on (the one running)."""
        self._run = run

    def kick_now(self) -> None:
        self._run.immediate_exit = 1
        self.kicks += 1
        signal.pthread_kill(self._thread_id, KICK_SIGNAL)

    def _loop(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline_ns is None:
                    self._cond.wait()
                    continue
                delay_ns = self._deadline_ns - self._clock.now_ns()
                if delay_ns > 0:
                    self._cond.wait(delay_ns / 1e9)
                    continue
                self._deadline_ns = None
                if self._armed:
                    self.kick_now()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()


class _Vcpu:
    """One KVM vCPU: its file descriptor and its kvm_run page (mapped, and as a cffi struct)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.run_map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_buffer = ffi.from_buffer(self.run_map)
        self.run = ffi.cast("struct kvm_run *", self.run_buffer)


class KvmEngine(CpuModes):
    """The vCPUs under KVM: an `Engine` and a `HardwareDebugEngine` (replayvm.engines.base).

    Positions are exit counts (see `position`), so this engine has no checkpoints and no exact
    breakpoints: the timeline and gdb need a trace recorded on emu."""

    name = "kvm"
    exact_positions = False
    position_unit = "exits"

    def __init__(self, machine: MachineView) -> None:
        self.machine = machine
        self.cpus: int = getattr(machine, "cpus", 1)
        self.kvm_fd = open_kvm()
        limit = vcpu_limit(self.kvm_fd)
        if self.cpus > limit:
            os.close(self.kvm_fd)
            raise UsageError(too_many_cpus(self.cpus, limit))
        self.exit_counts: Counter[str] = Counter()
        self._position_base = 0
        self.last_error = ""
        self.interrupts_injected = 0
        self.on_interrupt = None
        self._stop_requested = False
        self._run_end: int | None = None  # the position the run under way ends at (an exit count)
        self._kicked = False              # the last return from KVM_RUN was a kick, not a guest exit
        # Recording: this engine chooses where interrupts land between exits (see the module's
        # docstring). A replay turns it off: there the trace says where each one lands.
        self.places_interrupts = True
        self._landmark: dict | None = None   # where the interrupt being injected lands
        self._stepping = ""                  # "step" or "entries": on the way to a placeable point
        self._steps = 0
        self.interrupts_deferred = 0         # interrupts that arrived while ring-3 code ran
        try:
            self.vm_fd = _ioctl(self.kvm_fd, lib.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
            _ioctl(self.vm_fd, lib.KVM_SET_TSS_ADDR, TSS_ADDR, "KVM_SET_TSS_ADDR")
            ident = ffi.new("uint64_t *", IDENTITY_MAP_ADDR)
            _ioctl(self.vm_fd, lib.KVM_SET_IDENTITY_MAP_ADDR, ident, "KVM_SET_IDENTITY_MAP_ADDR")
            # The address of the mmap behind machine.ram (a cffi buffer over the mmap itself:
            # one over a memoryview upsets CPython's garbage collector at exit).
            self._ram = ffi.from_buffer(getattr(machine.ram, "obj", machine.ram))
            region = ffi.new("struct kvm_userspace_memory_region *", {
                "slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": len(machine.ram),
                "userspace_addr": int(ffi.cast("uintptr_t", self._ram))})
            _ioctl(self.vm_fd, lib.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")
            size = _ioctl(self.kvm_fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
            self._vcpus: list[_Vcpu] = []
            for cpu in range(self.cpus):             # vCPU id = APIC ID = the CPU's index
                vcpu = _Vcpu(_ioctl(self.vm_fd, lib.KVM_CREATE_VCPU, cpu, "KVM_CREATE_VCPU"), size)
                self._vcpus.append(vcpu)
                self._set_cpuid(vcpu.fd, apic_id=cpu)
        except OSError as error:
            raise EngineUnavailable(f"KVM refused to set up the VM: {error}") from None
        self._regs = ffi.new("struct kvm_regs *")
        self._sregs = ffi.new("struct kvm_sregs *")
        self._irq = ffi.new("struct kvm_interrupt *")
        # The CPU running now (its vCPU's fd and kvm_run page are the engine's: _use_vcpu).
        self.cpu = 0
        vcpu = self._vcpus[0]
        self.vcpu_fd, self._run_map, self._run_buffer, self.run_struct = (
            vcpu.fd, vcpu.run_map, vcpu.run_buffer, vcpu.run)
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)   # a no-op handler: EINTR, no death
        self._kicker = _Kicker(self.run_struct, threading.get_ident(), machine.clock)
        # Several CPUs (see the module docstring): what each is doing, as on the emu engine.
        self.on_switch: Callable[[int, int, dict | None], None] | None = None  # (cpu, position, landmark)
        self._init_cpu_modes()
        self._quiet_since_ns = 0             # recording: since when the running CPU made no exit ...
        self._quiet_position = -1            # ... (the position it has been at since then) ...
        self._turn_deadline_ns: int | None = None   # ... and when time ends its turn (another CPU waits)
        self._switch_landmark: dict | None = None   # where a switch between exits lands
        self.switch_landmarks = 0            # switches made between exits (after a kick)
        # CR3 at each event (address_space): from the registers KVM copies into each run page
        self._cr3_synced = all([bool(lib.replayvm_sync_sregs(self.kvm_fd, vcpu.run)) for vcpu in self._vcpus])

    # ---------------------------------------------------------------- setup
    def _set_cpuid(self, vcpu_fd: int, apic_id: int) -> None:
        """What CPUID says on one vCPU: the host's supported leaves, without hardware randomness
        and x2APIC, with `apic_id` as the initial APIC ID (leaf 1 EBX[31:24]; leaves 0xB and 0x1F
        EDX). `cpuid_table` (for the trace header) is the BSP's."""
        count = lib.KVM_MAX_CPUID_ENTRIES
        cpuid_with_entries = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2")
                                     + count * ffi.sizeof("struct kvm_cpuid_entry2"))
        cpuid = ffi.cast("struct kvm_cpuid2 *", cpuid_with_entries)
        cpuid.nent = count
        _ioctl(self.kvm_fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID")
        table = []
        for i in range(cpuid.nent):
            entry = cpuid.entries[i]
            if entry.function == 1:
                entry.ecx &= ~(CPUID_ECX_RDRAND | CPUID_ECX_X2APIC)   # no hardware randomness
                entry.ebx = (entry.ebx & 0x00FFFFFF) | apic_id << 24  # the initial APIC id
            elif entry.function == 7 and entry.index == 0:
                entry.ebx &= ~CPUID_EBX_RDSEED
            elif entry.function in (0xB, 0x1F):
                entry.edx = apic_id                                   # the x2APIC id
            table.append((entry.function, entry.index, entry.eax, entry.ebx, entry.ecx, entry.edx))
        _ioctl(vcpu_fd, lib.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")
        if apic_id == 0:
            self.cpuid_table = table

    # ---------------------------------------------------------------- state
    def set_state(self, state: CpuState) -> None:
        regs = self._regs
        for name in CpuState.GPR_NAMES:
            setattr(regs, name, state.regs.get(name, 0))
        regs.rip = state.regs.get("rip", 0)
        regs.rflags = state.regs.get("rflags", 2)
        sregs = self._sregs
        _ioctl(self.vcpu_fd, lib.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        for name in CpuState.SEGMENT_NAMES:
            _segment_to_kvm(getattr(state, name), getattr(sregs, "ldt" if name == "ldtr" else name))
        sregs.gdt.base, sregs.gdt.limit = state.gdt
        sregs.idt.base, sregs.idt.limit = state.idt
        sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.efer = (
            state.cr0, state.cr2, state.cr3, state.cr4, state.efer)
        _ioctl(self.vcpu_fd, lib.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")
        _ioctl(self.vcpu_fd, lib.KVM_SET_REGS, regs, "KVM_SET_REGS")
        lib.replayvm_set_synced_cr3(self.run_struct, state.cr3)

    def get_state(self) -> CpuState:
        regs, sregs = self._regs, self._sregs
        _ioctl(self.vcpu_fd, lib.KVM_GET_REGS, regs, "KVM_GET_REGS")
        _ioctl(self.vcpu_fd, lib.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        state = CpuState()
        state.regs = {name: getattr(regs, name) for name in CpuState.GPR_NAMES}
        state.regs["rip"] = regs.rip
        state.regs["rflags"] = regs.rflags
        for name in CpuState.SEGMENT_NAMES:
            setattr(state, name, _segment_from_kvm(getattr(sregs, "ldt" if name == "ldtr" else name)))
        state.gdt = (sregs.gdt.base, sregs.gdt.limit)
        state.idt = (sregs.idt.base, sregs.idt.limit)
        state.cr0, state.cr2, state.cr3, state.cr4, state.efer = (
            sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.efer)
        return state

    _GPR32 = {"eax": "rax", "ebx": "rbx", "ecx": "rcx", "edx": "rdx", "esi": "rsi", "edi": "rdi",
              "esp": "rsp", "ebp": "rbp", "eip": "rip", "eflags": "rflags"}

    def reg(self, name: str) -> int:
        """A register by its 32-bit name (segment registers: the selector), as the emu engine
        offers them: what the machine's BIOS services use during a port exit."""
        if name in self._GPR32:
            _ioctl(self.vcpu_fd, lib.KVM_GET_REGS, self._regs, "KVM_GET_REGS")
            return getattr(self._regs, self._GPR32[name]) & 0xFFFFFFFF
        _ioctl(self.vcpu_fd, lib.KVM_GET_SREGS, self._sregs, "KVM_GET_SREGS")
        return getattr(self._sregs, name).selector

    def set_reg(self, name: str, value: int) -> None:
        """Write a general register (by its 32-bit name; the upper half is cleared)."""
        _ioctl(self.vcpu_fd, lib.KVM_GET_REGS, self._regs, "KVM_GET_REGS")
        setattr(self._regs, self._GPR32[name], value & 0xFFFFFFFF)
        _ioctl(self.vcpu_fd, lib.KVM_SET_REGS, self._regs, "KVM_SET_REGS")

    # ---------------------------------------------------------------- several CPUs
    def _other_runnable(self) -> bool:
        return any(self._runnable(cpu) for cpu in range(self.cpus) if cpu != self.cpu)

    def end_turn_by(self, position: int) -> None:
        """The scheduler moved the current turn's end (a woken CPU, under chaos): nothing to do
        here, the scheduler is asked at every exit anyway."""

    def _use_vcpu(self, cpu: int) -> None:
        """The engine's vCPU fd and kvm_run page are `cpu`'s from now on (no ioctl: each vCPU
        keeps its own state in the kernel)."""
        vcpu = self._vcpus[cpu]
        self.vcpu_fd, self._run_map, self._run_buffer, self.run_struct = (
            vcpu.fd, vcpu.run_map, vcpu.run_buffer, vcpu.run)
        self._kicker.use_run(vcpu.run)

    def _schedule(self, now: int) -> bool:
        """Several CPUs, between KVM_RUNs: switch if the scheduler says so (recording: also when
        the running CPU's time is up, see _end_turn_by_time). True when the CPU to run is halted
        with nothing to wake it (the machine halts)."""
        scheduler = self.machine.scheduler       # type: ignore[attr-defined]
        if scheduler is not None:
            if self.places_interrupts:
                self._end_turn_by_time(now, scheduler)
            target = scheduler.choose(self.position, self.cpu, self._runnable)
            if target is not None and target != self.cpu:
                if not 0 <= target < self.cpus:
                    raise ValueError(f"a switch to CPU {target} of a machine with {self.cpus}")
                self._switch(target, now)
            self._switch_landmark = None
        cpu = self.cpu
        if self._cpu_halted[cpu]:
            if not (self._cpu_halted_if[cpu] and self.machine.interrupts.has_pending()):
                return True
            self._cpu_halted[cpu] = False
        return False

    def _end_turn_by_time(self, now: int, scheduler) -> None:
        """Recording: the running CPU has run TURN_TIME_NS without a synchronous exit while
        another CPU could run (a spin on a lock in memory): its turn ends here, after the kick,
        at a point replay can find again (its landmark; single-stepping on to one first if need
        be, as for an interrupt). `_turn_deadline_ns` tells the kicker when to look."""
        position = self.position
        if position != self._quiet_position:
            self._quiet_position, self._quiet_since_ns = position, now
        if not self._other_runnable():
            self._quiet_since_ns = now
            self._turn_deadline_ns = None
            return
        self._turn_deadline_ns = self._quiet_since_ns + TURN_TIME_NS
        if now < self._turn_deadline_ns:
            return
        if self._kicked:
            landmark = self._placeable_landmark(for_switch=True)
            if landmark is None:
                return                          # stepping on to a placeable point
            self._switch_landmark = landmark
        scheduler.expire(self.position)

    def _switch(self, cpu: int, now: int) -> None:
        """`cpu` runs from now on (a CPU started by a STARTUP IPI begins in real mode)."""
        landmark = self._switch_landmark
        if landmark is None and self._kicked and self.places_interrupts:
            landmark = self._current_landmark()   # between exits: where this CPU stopped
        if landmark is not None:
            self.switch_landmarks += 1
        if self._stepping:                        # (its debug state is its vCPU's own)
            self._set_debug()
            self._stepping = ""
        self._use_vcpu(cpu)
        if self._cpu_mode[cpu] == CPU_STARTING:
            self.set_state(real_mode_state(self._cpu_vector[cpu] << 8, 0))
            self._cpu_mode[cpu] = CPU_RUNNING
        self.cpu = cpu
        self._kicked = False          # the CPU resumes exactly where it stopped: no landmark needed
        self._landmark = None
        self._switch_landmark = None
        self._quiet_since_ns = now
        self._turn_deadline_ns = None
        self.machine.select_cpu(cpu)              # type: ignore[attr-defined]
        if self.on_switch is not None:
            self.on_switch(cpu, self.position, landmark)

    def _halt_current(self) -> None:
        """Several CPUs: the running CPU executed HLT; it waits (the scheduler skips it) until an
        interrupt it can take (IF=1) is pending at its local APIC."""
        _ioctl(self.vcpu_fd, lib.KVM_GET_REGS, self._regs, "KVM_GET_REGS")
        self._cpu_halted[self.cpu] = True
        self._cpu_halted_if[self.cpu] = bool(self._regs.rflags & EFLAGS_IF)

    @contextmanager
    def viewing_cpu(self, cpu: int) -> Iterator[None]:
        """Between runs: get_state/set_state inside the block are `cpu`'s (its vCPU)."""
        if cpu == self.cpu:
            yield
            return
        running = self.vcpu_fd
        self.vcpu_fd = self._vcpus[cpu].fd
        try:
            yield
        finally:
            self.vcpu_fd = running

    def cpu_states(self) -> list[dict]:
        """Every CPU's state (one still waiting for its STARTUP IPI: {error: ...}), for the
        footer and its replay's check."""
        states: list[dict] = []
        for cpu in range(self.cpus):
            if cpu != self.cpu and self._cpu_mode[cpu] != CPU_RUNNING:
                states.append({"error": WAITING_FOR_STARTUP})
                continue
            with self.viewing_cpu(cpu):
                states.append(self.get_state().to_dict())
        return states

    def cpu_condition(self, cpu: int) -> str:
        """What CPU `cpu` is doing, in words: "running", "halted", "waiting for its STARTUP IPI"
        or "starting"."""
        mode = self._cpu_mode[cpu]
        if mode == CPU_WAIT_SIPI:
            return WAITING_FOR_STARTUP
        if mode == CPU_STARTING:
            return "starting"
        return "halted" if self._cpu_halted[cpu] else "running"

    def start_cpus(self) -> dict:
        """Several CPUs: what a branch trace (replay --live) starts its other CPUs from, as on
        the emu engine (EmuEngine.start_cpus)."""
        states = self.cpu_states()
        return {"current": self.cpu, **self._cpu_mode_fields(),
                "states": [state if cpu != self.cpu and "regs" in state else None
                           for cpu, state in enumerate(states)]}

    def load_start_cpus(self, start: dict) -> None:
        """A branch trace's start_cpus, after set_state gave the running vCPU (CPU 0's, until
        now) the branch's initial state: that state is the current CPU's, each other started
        CPU gets its own."""
        if len(start["modes"]) != self.cpus or not 0 <= start["current"] < self.cpus:
            raise ValueError(f"start_cpus is not of a machine with {self.cpus} CPUs")
        initial = self.get_state()
        current = start["current"]
        for cpu, state in enumerate(start["states"]):
            if cpu == current:
                with self.viewing_cpu(cpu):
                    self.set_state(initial)
            elif state is not None:
                with self.viewing_cpu(cpu):
                    self.set_state(CpuState.from_dict(state))
        self._load_cpu_modes(start)
        self.cpu = current
        self._use_vcpu(current)
        self.machine.select_cpu(current)          # type: ignore[attr-defined]

    # ---------------------------------------------------------------- positions
    SYNCHRONOUS_EXITS = ("io", "mmio", "hlt")

    @property
    def position(self) -> int:
        """Where the guest is, in the unit traces use on this engine: synchronous exits so far
        (port, MMIO, HLT). Kicks and interrupt-window exits depend on host timing, so they do not
        count; there is no PMU here to count instructions."""
        counts = self.exit_counts
        return self._position_base + counts["io"] + counts["mmio"] + counts["hlt"]

    def start_at_position(self, position: int) -> None:
        """Count positions from `position` (a branch trace starts where its parent went live)."""
        self._position_base = position - self.position + self._position_base

    def use_clock(self, clock) -> None:
        """Keep time with `clock` from now on (a replay going live)."""
        self._kicker._clock = clock

    @property
    def icount(self) -> None:
        """Not known: there is no PMU under PVM to count instructions."""
        return None

    @property
    def pure_reads(self) -> int:
        """Every read goes to the bus (the recorder tallies the unlogged LAPIC ID reads itself)."""
        return 0

    def pure_read_sites(self) -> dict[int, int]:
        """None here: the recorder counts the ID reads it saw on the bus by site itself."""
        return {}

    def interrupt_landmark(self) -> dict | None:
        """Where an interrupt lands when it was not at a synchronous exit (after a kick): RIP, the
        general registers and CR3, which replay finds with a breakpoint and register matching.
        While recording, the point `_placeable_landmark` chose."""
        if self._landmark is not None:
            return self._landmark
        if not self._kicked:
            return None
        return self._current_landmark()

    def _current_landmark(self) -> dict:
        """The running vCPU's general registers, RIP, RFLAGS and CR3 now."""
        _ioctl(self.vcpu_fd, lib.KVM_GET_REGS, self._regs, "KVM_GET_REGS")
        _ioctl(self.vcpu_fd, lib.KVM_GET_SREGS, self._sregs, "KVM_GET_SREGS")
        landmark = {name: getattr(self._regs, name) for name in CpuState.GPR_NAMES}
        landmark.update(rip=self._regs.rip, rflags=self._regs.rflags, cr3=self._sregs.cr3)
        return landmark

    def exit_context(self) -> tuple[int, int]:
        """(RIP, CPL) at the current exit; CPL is -1 (not fetched: it costs a KVM_GET_SREGS)."""
        _ioctl(self.vcpu_fd, lib.KVM_GET_REGS, self._regs, "KVM_GET_REGS")
        return self._regs.rip, -1

    def address_space(self) -> int:
        """CR3 at the current exit: KVM's copy in the run page (KVM_CAP_SYNC_REGS), else a
        KVM_GET_SREGS (~5 us on PVM)."""
        if self._cr3_synced:
            return lib.replayvm_synced_cr3(self.run_struct)
        _ioctl(self.vcpu_fd, lib.KVM_GET_SREGS, self._sregs, "KVM_GET_SREGS")
        return self._sregs.cr3

    # ---------------------------------------------------------------- running
    def request_stop(self) -> None:
        self._stop_requested = True
        self._kicker.kick_now()

    def stop_here(self) -> None:
        """From inside an exit's device access: return STOP_REQUESTED before the next KVM_RUN
        (this is the vCPU thread, outside KVM_RUN: no kick needed)."""
        self._stop_requested = True

    def move_stop(self, position: int) -> None:
        """From inside an exit's device access: the run ends (BUDGET) at the first exit boundary
        at or past `position`, unless a stop was already requested."""
        if not self._stop_requested:
            self._run_end = position

    def run(self, budget_ns: int | None = None, until_position: int | None = None) -> StopReason:
        """Run until HLT, shutdown, stop request, the budget (guest ns) is used, or the exit
        count reaches `until_position` (checked between exits, before entering the guest)."""
        self._run_end = until_position
        machine = self.machine
        run = self.run_struct
        interrupts = machine.interrupts
        clock = machine.clock
        end_ns = None if budget_ns is None else clock.now_ns() + budget_ns
        vcpu = self.vcpu_fd
        KVM_RUN = lib.KVM_RUN
        run_map = self._run_map
        several = self.cpus > 1
        while True:
            if self._stop_requested:
                self._stop_requested = False
                self._kicker.arm(None)
                return StopReason.STOP_REQUESTED
            if self._run_end is not None and self.position >= self._run_end:
                self._kicker.arm(None)
                return StopReason.BUDGET
            until_timer = machine.poll()
            now = clock.now_ns()
            if end_ns is not None and now >= end_ns:
                self._kicker.arm(None)
                return StopReason.BUDGET
            if several:
                if self._schedule(now):
                    self._kicker.arm(None)
                    return StopReason.HALT
                interrupts = machine.interrupts          # the CPU's own LAPIC (or the trace)
                run, vcpu, run_map = self.run_struct, self.vcpu_fd, self._run_map
            if interrupts.has_pending():
                if run.ready_for_interrupt_injection and run.if_flag and self._kicked and \
                        self.places_interrupts:
                    self._landmark = self._placeable_landmark()
                if self._stepping:
                    run.request_interrupt_window = 0      # on the way to a placeable point
                elif run.ready_for_interrupt_injection and run.if_flag:
                    vector = interrupts.acknowledge()
                    self._irq.irq = vector
                    _ioctl(vcpu, lib.KVM_INTERRUPT, self._irq, "KVM_INTERRUPT")
                    self.interrupts_injected += 1
                    if self.on_interrupt is not None:
                        self.on_interrupt(vector, self.position)
                    self._landmark = None
                    run.request_interrupt_window = 1 if interrupts.has_pending() else 0
                else:
                    run.request_interrupt_window = 1
            else:
                run.request_interrupt_window = 0
            wake_ns = None if until_timer is None else now + until_timer
            if end_ns is not None:
                wake_ns = end_ns if wake_ns is None else min(wake_ns, end_ns)
            if several and self._turn_deadline_ns is not None:       # another CPU waits
                wake_ns = self._turn_deadline_ns if wake_ns is None else min(wake_ns, self._turn_deadline_ns)
            if self._stop_requested:             # by a replayed switch or interrupt just taken
                self._stop_requested = False
                self._kicker.arm(None)
                return StopReason.STOP_REQUESTED
            self._kicker.arm(wake_ns)
            result = lib.replayvm_ioctl_int(vcpu, KVM_RUN, 0)
            if result < 0:
                if result == -errno.EINTR or result == -errno.EAGAIN:
                    run.immediate_exit = 0
                    self.exit_counts["intr"] += 1
                    self._kicked = True
                    continue
                self.last_error = f"KVM_RUN failed: {os.strerror(-result)}"
                return StopReason.UNSUPPORTED
            self._kicked = False
            reason = EXIT_REASON.unpack_from(run_map, EXIT_REASON_OFFSET)[0]
            if reason in SYNCHRONOUS_EXIT_REASONS and self._stepping:
                self._at_synchronous_exit()
            if reason == lib.KVM_EXIT_IO:
                self.exit_counts["io"] += 1
                self._port_io(run_map)
            elif reason == lib.KVM_EXIT_MMIO:
                self.exit_counts["mmio"] += 1
                self._mmio(run)
            elif reason == lib.KVM_EXIT_IRQ_WINDOW_OPEN:
                # Not an exact point on PVM: the window exit comes some instructions after the
                # guest set IF, as host timing has it. An interrupt placed here needs a landmark.
                self.exit_counts["irq_window"] += 1
                self._kicked = True
            elif reason == lib.KVM_EXIT_INTR:
                self.exit_counts["intr"] += 1
                run.immediate_exit = 0
                self._kicked = True
            elif reason == lib.KVM_EXIT_HLT:
                self.exit_counts["hlt"] += 1
                if several:                      # another CPU may run: the scheduler decides
                    self._halt_current()
                    continue
                return StopReason.HALT
            elif reason == lib.KVM_EXIT_SHUTDOWN:
                self.exit_counts["shutdown"] += 1
                self._kicker.arm(None)
                return self._explain_shutdown()
            elif reason == lib.KVM_EXIT_DEBUG and self._stepping:
                self.exit_counts["placement_step"] += 1     # our own stop: placeable yet?
                self._stepped()
                self._kicked = True
            elif reason == lib.KVM_EXIT_DEBUG:
                self.exit_counts["debug"] += 1
                self._kicker.arm(None)
                return StopReason.DEBUG
            else:
                self._kicker.arm(None)
                self.exit_counts["other"] += 1
                self.last_error = self._describe_failure(run, reason)
                return StopReason.UNSUPPORTED

    def _placeable_landmark(self, for_switch: bool = False) -> dict | None:
        """The landmark of the point the guest is at, if replay can find it again; otherwise
        None, with single-stepping on to the next point that may be (see the module docstring).
        For an interrupt or, `for_switch`, a change of CPUs between exits."""
        _ioctl(self.vcpu_fd, lib.KVM_GET_REGS, self._regs, "KVM_GET_REGS")
        _ioctl(self.vcpu_fd, lib.KVM_GET_SREGS, self._sregs, "KVM_GET_SREGS")
        if self._sregs.cs.selector & 3 == 3:
            if self._stepping != "entries":
                if not for_switch:
                    self.interrupts_deferred += 1
                self._set_debug(hw_breakpoints=self._kernel_entries())
                self._stepping = "entries"
            return None
        if self._regs.rflags & EFLAGS_RF:
            if self._stepping != "step":
                self._set_debug(single_step=True)
                self._stepping, self._steps = "step", 0
            return None
        if self._stepping:
            self._set_debug()
            self._stepping = ""
        landmark = {name: getattr(self._regs, name) for name in CpuState.GPR_NAMES}
        landmark.update(rip=self._regs.rip, rflags=self._regs.rflags, cr3=self._sregs.cr3)
        return landmark

    def _kernel_entries(self) -> list[int]:
        """The handler addresses of the IDT gates ring-3 code enters the kernel by (read through
        the guest's page tables: the IDT's base is a linear address); none if unreadable."""
        base, limit = self._sregs.idt.base, self._sregs.idt.limit
        entries = []
        for vector in RING3_ENTRY_VECTORS:
            if vector * 16 + 15 > limit:
                continue
            gate = self._read_linear(base + vector * 16, 16)
            if gate is None or not gate[5] & 0x80:            # unreadable or not present
                continue
            low, _, _, mid, high = struct.unpack_from("<HHHHI", gate)
            entries.append(low | mid << 16 | high << 32)
        return entries

    def _read_linear(self, address: int, size: int) -> bytes | None:
        """`size` bytes at a long-mode linear address (4-level paging from CR3), within a page."""
        ram = self.machine.ram
        table = self._sregs.cr3 & 0x000F_FFFF_FFFF_F000
        for level, shift in enumerate((39, 30, 21, 12)):
            slot = table + ((address >> shift) & 0x1FF) * 8
            if slot + 8 > len(ram):
                return None
            entry = int.from_bytes(ram[slot:slot + 8], "little")
            if not entry & 1:
                return None
            frame = entry & 0x000F_FFFF_FFFF_F000
            if shift in (30, 21) and entry & 0x80:             # a 1 GiB or 2 MiB page
                physical = (frame & ~((1 << shift) - 1)) + (address & ((1 << shift) - 1))
                break
            table = frame
        else:
            physical = table + (address & 0xFFF)
        if physical + size > len(ram):
            return None
        return bytes(ram[physical:physical + size])

    def _stepped(self) -> None:
        """Our own debug stop on the way to a placeable point. From a kernel entry (the task came
        from ring 3) or the middle of an instruction, single-step the kernel (exact, emulated on
        PVM) until it has interrupts on at an instruction's start: the interrupt lands there. A
        kernel that returns to ring 3 without turning interrupts on (an `iretq` next), or takes
        too many steps, gets the interrupt where it turns them on again (a window exit, placed by
        its own landmark, or the next entry from ring 3 if that window opens in ring 3)."""
        regs, sregs = self._regs, self._sregs
        _ioctl(self.vcpu_fd, lib.KVM_GET_REGS, regs, "KVM_GET_REGS")
        _ioctl(self.vcpu_fd, lib.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        if sregs.cs.selector & 3 == 3:
            return                                        # not in the kernel yet
        if self._stepping == "entries":
            self._set_debug(single_step=True)
            self._stepping, self._steps = "step", 0
        run = self.run_struct
        if regs.rflags & EFLAGS_RF == 0 and run.if_flag and run.ready_for_interrupt_injection:
            done = True                                   # (not in the shadow of an `sti`)
        else:
            self._steps += 1
            code = self._read_linear(regs.rip, 2) or b""
            done = self._steps > PLACEMENT_STEP_LIMIT or code == IRETQ or code[:1] == IRET
        if done:
            self._set_debug()
            self._stepping = ""

    def _at_synchronous_exit(self) -> None:
        """A port, MMIO or HLT exit on the way to a placeable point: an exact position, where
        the pending interrupt lands without a landmark."""
        self._set_debug()
        self._stepping = ""

    def _port_io(self, run_map: mmap.mmap) -> None:
        direction, size, port, count, offset = EXIT_IO.unpack_from(run_map, EXIT_IO_OFFSET)
        length = size * count
        pio = self.machine.pio
        if direction == lib.KVM_EXIT_IO_OUT:
            data = self._run_map[offset:offset + length]
            if count == 1:
                pio.write(port, size, int.from_bytes(data, "little"))
            else:
                pio.write_string(port, size, data)
        else:
            if count == 1:
                self._run_map[offset:offset + size] = pio.read(port, size).to_bytes(size, "little")
            else:
                self._run_map[offset:offset + length] = pio.read_string(port, size, count)

    def _mmio(self, run) -> None:
        mmio = run.mmio
        length = mmio.len
        if mmio.is_write:
            value = int.from_bytes(bytes(ffi.buffer(mmio.data, length)), "little")
            self.machine.mmio.write(mmio.phys_addr, length, value)
        else:
            value = self.machine.mmio.read(mmio.phys_addr, length)
            ffi.memmove(mmio.data, value.to_bytes(length, "little"), length)

    def _explain_shutdown(self) -> StopReason:
        """Tell PVM's refusal of 32-bit paging apart from a guest's own triple fault."""
        try:
            state = self.get_state()
        except OSError:
            self.last_error = "triple fault (CPU state unavailable)"
            return StopReason.SHUTDOWN
        if state.cr0 & CR0_PE and not state.efer & EFER_LMA and self._enabling_paging(state):
            self.last_error = ("this KVM cannot run 32-bit paged protected mode (the guest "
                               "triple-faulted as it enabled paging at "
                               f"rip={state.regs['rip']:#x}; /dev/kvm here is a software "
                               "hypervisor such as PVM); run this guest with --engine emu")
            return StopReason.UNSUPPORTED
        self.last_error = "triple fault"
        return StopReason.SHUTDOWN

    def _enabling_paging(self, state: CpuState) -> bool:
        """Is the instruction at (or just before) RIP a `mov reg, %cr0` setting CR0.PG?"""
        if state.cr0 & CR0_PG:
            return True
        linear = state.cs.base + state.regs["rip"]
        ram = self.machine.ram
        for start in (linear, linear - 3):
            if 0 <= start and start + 3 <= len(ram):
                op = bytes(ram[start:start + 3])
                if op[:2] == b"\x0f\x22" and (op[2] >> 3) & 7 == 0 and op[2] >= 0xC0:
                    source = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")[op[2] & 7]
                    if state.regs.get(source, 0) & CR0_PG:
                        return True
        return False

    def _describe_failure(self, run, reason: int) -> str:
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            detail = f"internal error, suberror {run.internal.suberror}"
            code = _emulation_failure_bytes(run.internal)
            if code:
                detail += f" (it could not emulate the instruction {code[:4].hex(' ')}"
                if code[0] in SOFTWARE_INTERRUPT_OPCODES:
                    detail += ": a software interrupt, which PVM cannot emulate; try --engine emu"
                detail += ")"
        elif reason == lib.KVM_EXIT_FAIL_ENTRY:
            detail = f"entry failed, reason {run.fail_entry.hardware_entry_failure_reason:#x}"
        else:
            detail = f"unhandled exit reason {reason}"
        try:
            state = self.get_state()
            where = f" at rip={state.regs['rip']:#x} cr0={state.cr0:#x}"
        except OSError:
            where = ""
        return f"KVM cannot continue: {detail}{where}"

    def place_interrupts(self, on: bool) -> None:
        self.places_interrupts = on

    def deferred_interrupts(self) -> int:
        return self.interrupts_deferred

    def set_guest_debug(self, single_step: bool = False, hw_breakpoints: list[int] = ()) -> None:
        """Single-step and/or up to four execution breakpoints (KVM_EXIT_DEBUG ends run())."""
        self._stepping = ""
        self._set_debug(single_step, hw_breakpoints)

    def _set_debug(self, single_step: bool = False, hw_breakpoints: list[int] = ()) -> None:
        debug = ffi.new("struct kvm_guest_debug *")
        control = 0
        if single_step or hw_breakpoints:
            control = lib.KVM_GUESTDBG_ENABLE
            if single_step:
                control |= lib.KVM_GUESTDBG_SINGLESTEP
            if hw_breakpoints:
                control |= lib.KVM_GUESTDBG_USE_HW_BP
                dr7 = 0
                for i, addr in enumerate(list(hw_breakpoints)[:4]):
                    debug.arch.debugreg[i] = addr
                    dr7 |= 1 << (2 * i)
                debug.arch.debugreg[7] = dr7 | 0x400
        debug.control = control
        _ioctl(self.vcpu_fd, lib.KVM_SET_GUEST_DEBUG, debug, "KVM_SET_GUEST_DEBUG")

    def close(self) -> None:
        self._kicker.close()
        for vcpu in getattr(self, "_vcpus", ()):
            try:
                os.close(vcpu.fd)
            except OSError:
                pass
        self.vcpu_fd = None
        for fd in ("vm_fd", "kvm_fd"):
            value = getattr(self, fd, None)
            if value is not None:
                try:
                    os.close(value)
                except OSError:
                    pass
                setattr(self, fd, None)


def _emulation_failure_bytes(internal) -> bytes:
    """The instruction bytes KVM reports with an emulation failure (KVM_INTERNAL_ERROR_EMULATION
    with the instruction-bytes flag: data[0] flags, then a length byte and up to 15 bytes)."""
    if internal.suberror != KVM_INTERNAL_ERROR_EMULATION or internal.ndata < 3 or \
            not internal.data[0] & EMULATION_FLAG_INSTRUCTION_BYTES:
        return b""
    packed = internal.data[1].to_bytes(8, "little") + internal.data[2].to_bytes(8, "little")
    return packed[1:1 + min(packed[0], 15)]


def _segment_to_kvm(seg: Segment, out) -> None:
    out.base, out.limit, out.selector = seg.base, seg.limit, seg.selector
    out.type, out.present, out.dpl, out.db = seg.type, seg.present, seg.dpl, seg.db
    out.s, out.l, out.g, out.avl, out.unusable = seg.s, seg.l, seg.g, seg.avl, seg.unusable


def _segment_from_kvm(seg) -> Segment:
    return Segment(selector=seg.selector, base=seg.base, limit=seg.limit, type=seg.type, s=seg.s,
                   dpl=seg.dpl, present=seg.present, db=seg.db, l=seg.l, g=seg.g, avl=seg.avl,
                   unusable=seg.unusable)
