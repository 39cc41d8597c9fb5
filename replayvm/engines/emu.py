"""The `emu` CPU engine: Unicorn (QEMU's TCG as a library) driven through cffi.

Used where KVM cannot run the guest (on this project's PVM hosts: any 32-bit paged guest, xv6).
Position in the guest's execution is exact: a C hook counts every instruction begun (each
iteration of a `rep` instruction counts, as Unicorn executes them one by one; a faulting
instruction counts each time it is attempted), and a run can be stopped before any given count.
That count, `icount`, is what the recorder logs as the position of asynchronous events.

Several CPUs (`--cpus N`): the vCPUs share one Unicorn instance and its translated code; each has
its own saved context (the same save and restore checkpoints use), and the engine runs one at a
time, switching when the machine's scheduler says so (replayvm.schedule while recording, the
trace's SWITCH records while replaying), always between runs, so the count stays exact. `icount`
stays one count over all CPUs (each CPU's own is the sum of its turns). An AP waits, not running,
for its STARTUP IPI; a halted CPU is skipped until an interrupt can wake it.

Interrupts and exceptions are delivered by `x86_delivery` (Unicorn never runs QEMU's delivery).
An external interrupt is taken at the first instruction boundary where EFLAGS.IF=1 once the
interrupt controller reports it pending; the one-instruction STI shadow is honoured.
"""

from __future__ import annotations

import ctypes
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from replayvm import hw
from replayvm.clock import VirtualClock
from replayvm.engines.base import (CPU_RUNNING, CPU_STARTING, CPU_WAIT_SIPI, CpuModes, CpuState, DebugHit,
                                   DebugStop, EngineSnapshot, GuestAddressFault, MachineView, Segment, StopReason,
                                   real_mode_state)
from replayvm.engines import x86_delivery
from replayvm.errors import EngineUnavailable


def _load_unicorn() -> None:
    """Make libunicorn's symbols global so our extension (not linked against it) resolves them."""
    import unicorn  # noqa: F401  (locates and loads the library the wheel ships)

    lib_dir = os.path.join(os.path.dirname(unicorn.__file__), "lib")
    for name in ("libunicorn.so.2", "libunicorn.so"):
        path = os.path.join(lib_dir, name)
        if os.path.exists(path):
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
            return
    raise EngineUnavailable(f"libunicorn not found in {lib_dir}")


_load_unicorn()
from replayvm.engines._uc import ffi, lib  # noqa: E402
import unicorn.x86_const as ucx  # noqa: E402

UC_ARCH_X86 = 4
UC_MODE_32 = 4
UC_MODE_64 = 8
UC_PROT_ALL = 7
UC_PROT_READ = 1
UC_PROT_WRITE = 2
UC_ERR_EXCEPTION = 21


def reference_mode() -> bool:
    """REPLAYVM_EMU_REFERENCE=1: QEMU's own page walk and no fast path, the behaviour every
    optimisation of this engine is tested against (tests/test_emu_exactness.py)."""
    return os.environ.get("REPLAYVM_EMU_REFERENCE", "") not in ("", "0")

REG = {
    "eax": ucx.UC_X86_REG_EAX, "ebx": ucx.UC_X86_REG_EBX, "ecx": ucx.UC_X86_REG_ECX,
    "edx": ucx.UC_X86_REG_EDX, "esi": ucx.UC_X86_REG_ESI, "edi": ucx.UC_X86_REG_EDI,
    "esp": ucx.UC_X86_REG_ESP, "ebp": ucx.UC_X86_REG_EBP, "eip": ucx.UC_X86_REG_EIP,
    "eflags": ucx.UC_X86_REG_EFLAGS, "cs": ucx.UC_X86_REG_CS, "ds": ucx.UC_X86_REG_DS,
    "es": ucx.UC_X86_REG_ES, "fs": ucx.UC_X86_REG_FS, "gs": ucx.UC_X86_REG_GS,
    "ss": ucx.UC_X86_REG_SS, "cr0": ucx.UC_X86_REG_CR0, "cr2": ucx.UC_X86_REG_CR2,
    "cr3": ucx.UC_X86_REG_CR3, "cr4": ucx.UC_X86_REG_CR4,
}
# 64-bit names, read and written whole: only an engine opened in UC_MODE_64 has them (Unicorn
# answers them by the mode given at uc_open, not by the guest's mode).
REG64 = {
    "rax": ucx.UC_X86_REG_RAX, "rbx": ucx.UC_X86_REG_RBX, "rcx": ucx.UC_X86_REG_RCX,
    "rdx": ucx.UC_X86_REG_RDX, "rsi": ucx.UC_X86_REG_RSI, "rdi": ucx.UC_X86_REG_RDI,
    "rsp": ucx.UC_X86_REG_RSP, "rbp": ucx.UC_X86_REG_RBP, "r8": ucx.UC_X86_REG_R8,
    "r9": ucx.UC_X86_REG_R9, "r10": ucx.UC_X86_REG_R10, "r11": ucx.UC_X86_REG_R11,
    "r12": ucx.UC_X86_REG_R12, "r13": ucx.UC_X86_REG_R13, "r14": ucx.UC_X86_REG_R14,
    "r15": ucx.UC_X86_REG_R15, "rip": ucx.UC_X86_REG_RIP, "rflags": ucx.UC_X86_REG_RFLAGS,
    "fs_base": ucx.UC_X86_REG_FS_BASE, "gs_base": ucx.UC_X86_REG_GS_BASE,
}
# The segment registers a UC_MODE_64 engine writes the selector of and nothing else (FS and GS
# it loads fully): the engine loads them itself (EmuEngine._load_selector).
LOADED_SEGMENTS = ("cs", "ss", "ds", "es")
REAL_MODE_SEGMENT_FLAGS = (1 << 15) | (1 << 12) | (1 << 9) | (1 << 8)    # present, data, writable, accessed
CONTROL_REGISTERS = ("cr0", "cr2", "cr3", "cr4")
CR3_REG = ucx.UC_X86_REG_CR3
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081              # SYSCALL/SYSRET selectors (bits 32-47 / 48-63)
MSR_LSTAR = 0xC0000082             # SYSCALL's 64-bit entry point
MSR_FMASK = 0xC0000084             # RFLAGS bits SYSCALL clears
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFLAGS_RF = 1 << 16
# The hidden flags SYSCALL gives CS and SS (Intel SDM: flat, DPL 0; CS 64-bit, SS 32-bit writable).
SYSCALL_CS_FLAGS = (1 << 23) | (1 << 21) | (1 << 15) | (1 << 12) | (1 << 11) | (1 << 9) | (1 << 8)
SYSCALL_SS_FLAGS = (1 << 23) | (1 << 22) | (1 << 15) | (1 << 12) | (1 << 9) | (1 << 8)
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
TABLE_REG = {"gdtr": ucx.UC_X86_REG_GDTR, "idtr": ucx.UC_X86_REG_IDTR,
             "tr": ucx.UC_X86_REG_TR, "ldtr": ucx.UC_X86_REG_LDTR}
GPR32 = ("eax", "ebx", "ecx", "edx", "esi", "edi", "esp", "ebp")

# The i386-class "qemu32" model: what xv6 targets, and it offers no RDRAND/RDSEED (Unicorn's
# default model advertises RDRAND, whose values a trace could not reproduce).
CPU_MODEL = ucx.UC_CPU_X86_QEMU32
# A 64-bit guest needs a model with long mode in CPUID: QEMU's WRMSR ignores EFER.LME otherwise
# (measured: under "qemu32" the far jump to a 64-bit segment then faults). "qemu64" has LM, NX
# and SYSCALL, and no RDRAND/RDSEED either.
CPU_MODEL_64 = ucx.UC_CPU_X86_QEMU64
SLICE_INSTRUCTIONS = 200_000        # how long a run goes before the machine polls time again
MIN_WALL_SLICE = 2_000              # shortest slice towards a wall-clock timer deadline
EFLAGS_IF = 1 << 9
OPCODE_STI = 0xFB
NO_SKIP = (1 << 64) - 1             # skip_icount when no instruction is exempt from breakpoints
HF_INHIBIT_IRQ = 0x8                # QEMU's hflags: the instruction just done was STI (its shadow)


class UnicornError(Exception):
    pass


OPEN_BUS_END = 1 << 32              # the 32-bit physical address space: beyond it an access faults


def _open_bus_holes(ram_bytes: int, mappings) -> list[tuple[int, int]]:
    """(base, size) of the page-aligned physical ranges between the end of RAM and 4 GiB that no
    device claims. They go to the machine's MMIO bus like a device's, which reads all-ones and
    drops writes there (the open bus of a PC, and what the kvm engine does: KVM exits to the same
    bus for any address no memory slot holds), so a guest that reads or writes a wild physical
    address goes on as on hardware, on either engine, instead of ending the run."""
    holes, start = [], (ram_bytes + 0xFFF) & ~0xFFF
    claimed = sorted((m.base & ~0xFFF, (m.base + m.length + 0xFFF) & ~0xFFF) for m in mappings)
    for base, end in claimed + [(OPEN_BUS_END, OPEN_BUS_END)]:
        base = min(base, OPEN_BUS_END)
        if base > start:
            holes.append((start, base - start))
        start = max(start, end)
    return holes


def _check(err: int, what: str) -> None:
    if err:
        raise UnicornError(f"{what}: {ffi.string(lib.uc_strerror(err)).decode()}")


class EmuEngine(CpuModes):
    """One x86 vCPU emulated by Unicorn over the machine's RAM (see module docstring).

    An `Engine`, a `SnapshotEngine` and a `DebugEngine` (replayvm.engines.base)."""

    name = "emu"
    exact_positions = True
    position_unit = "instructions"

    def __init__(self, machine: MachineView) -> None:
        self.machine = machine
        # How Unicorn's mode at uc_open meets a guest that switches to long mode (measured with
        # Unicorn 2.1.4, a 32-bit multiboot-style entry that sets PAE, EFER.LME, CR0.PG and far
        # jumps to an L=1 code segment):
        # - UC_MODE_32 with "qemu32": WRMSR drops EFER.LME (no LM in CPUID); the far jump faults.
        # - UC_MODE_32 with "qemu64": long mode runs, but uc_reg_read answers only 32-bit names
        #   (RAX, R15, RIP read as 0 with a deprecation warning): the VMM cannot see the guest.
        # - UC_MODE_64: the vCPU starts *in* long mode (EFER.LMA set, CR0.PG clear, CS 64-bit);
        #   32-bit entry code runs as 64-bit code and its `ljmp ptr16:32` is #UD. Writing EFER=0
        #   keeps LMA (WRMSR never writes LMA); writing CR0 with PG and then without it leaves
        #   long mode (QEMU's CR0 update clears LMA and the 64-bit CS flag), after which the same
        #   entry runs in 32-bit protected mode, switches to long mode and reads back whole.
        # So: a guest declared 64-bit (a kernel ELF64; a trace naming the "x86-64" feature) gets
        # UC_MODE_64 + "qemu64" with the reset below; every other guest keeps UC_MODE_32 +
        # "qemu32", exactly as before.
        self.long_mode_capable = bool(getattr(machine, "x86_64", False))
        self._cpu_model = CPU_MODEL_64 if self.long_mode_capable else CPU_MODEL
        handle = ffi.new("uc_engine **")
        _check(lib.uc_open(UC_ARCH_X86, UC_MODE_64 if self.long_mode_capable else UC_MODE_32, handle),
               "uc_open")
        self.uc = handle[0]
        self.state = ffi.new("struct emu_state *")
        self.state.stop_at = 0
        self._owner = ffi.new_handle(self)
        self._u64 = ffi.new("uint64_t *")
        self._cr_mask = 0xFFFFFFFFFFFFFFFF if self.long_mode_capable else 0xFFFFFFFF
        self._msr = ffi.new("uint64_t[2]")          # struct uc_x86_msr {uint32_t rid; uint64_t value}
        _check(lib.replayvm_uc_setup(self.uc, self.state, self._owner, self._cpu_model), "hook setup")
        # Take the pointer from the mmap itself, not the memoryview: a cffi buffer over a
        # memoryview crashes CPython's garbage collector at interpreter exit.
        self._ram = ffi.from_buffer(getattr(machine.ram, "obj", machine.ram))
        _check(lib.uc_mem_map_ptr(self.uc, 0, len(machine.ram), UC_PROT_ALL, self._ram), "map RAM")
        for mapping in machine.mmio.mappings():
            size = (mapping.length + 0xFFF) & ~0xFFF
            _check(lib.replayvm_uc_map_mmio(self.uc, self.state, mapping.base, size, self._owner),
                   f"map MMIO {mapping.name}")
        for base, size in _open_bus_holes(len(machine.ram), machine.mmio.mappings()):
            _check(lib.replayvm_uc_map_mmio(self.uc, self.state, base, size, self._owner),
                   f"map the open bus at {base:#x}")
        self.state.ram = ffi.cast("uint8_t *", self._ram)
        self.state.ram_size = len(machine.ram)
        self.page_walk = "qemu" if reference_mode() else "engine"
        if reference_mode():
            self.state.env_state = lib.ENV_WRONG      # IF through uc_reg_read, as before
        if self.page_walk == "engine" and lib.replayvm_uc_use_page_walk(self.uc, self.state, 1) != 0:
            self.page_walk = "qemu"            # this Unicorn hides the fault address: QEMU walks
        # A 64-bit vCPU: PAE and 4-level tables are walked in C too (a 32-bit one hands them to
        # QEMU's walk, counting every instruction).
        self.state.pae_walk = int(self.long_mode_capable)
        # "blocks": translated blocks without the per-instruction hook wherever nothing can stop
        # or observe the guest inside them (emu_build.py); "instructions": the hook everywhere.
        if not reference_mode():
            lib.replayvm_uc_use_blocks(self.uc, self.state)      # stays off if the probe fails
        lapic = getattr(machine, "lapic", None)
        self.state.lapic_base = hw.LAPIC_ADDR if lapic is not None else 0xFFFFFFFF_FFFFF000
        self._refresh_lapic_id()
        if lib.replayvm_uc_probe_env_layout(self.uc, self.state) != 0:
            raise EngineUnavailable("unicorn: cannot locate the exception state in the CPU context "
                                    "(unsupported unicorn version; replayvm needs 2.1.4)")
        self._u32 = ffi.new("uint32_t *")
        self._mmr = ffi.new("uc_x86_mmr *")
        self._err = ffi.new("int *")
        self._is_int = ffi.new("int *")
        if self.long_mode_capable:
            self._leave_long_mode()
        self._stop_requested = False
        self._run_end: int | None = None          # the position the run under way ends at
        self._cpuid_table: list | None = None
        self._python_error: BaseException | None = None
        self._pending_fault: tuple[int, int | None, int] | None = None   # (vector, error, eip)
        self._context = None                      # uc_context for checkpoints, made on first use
        self._watch_hook = None
        self._context_size = 0
        self._shutdown_in_hook = False
        self.halted = False
        self.last_error = ""
        self.exceptions_delivered = 0
        self.interrupts_delivered = 0
        self.on_interrupt: Callable[[int, int], None] | None = None   # (vector, icount) observer
        self._instructions_per_ns = 0.05          # a first guess (50 MIPS), learned while running
        self._instruction_clock = isinstance(machine.clock, VirtualClock)
        if self._instruction_clock:
            machine.clock.source = lambda: self.state.icount
        self.cpus = getattr(machine, "cpus", 1)
        self.cpu = 0                              # the CPU whose context Unicorn holds now
        self.on_switch: Callable[[int, int], None] | None = None     # (cpu, icount) observer
        if self.cpus > 1:
            self._cpu_contexts = [self._new_context() for _ in range(self.cpus)]
            self._reset_context = self._new_context()      # the power-on CPU an AP starts from
            _check(lib.replayvm_uc_context_save(self.uc, self._reset_context), "save the reset CPU")
            self._init_cpu_modes()
            # CPUID leaf 1's APIC ID is the running CPU's (Unicorn's single vCPU says 0).
            leaf1 = next(entry for entry in self.cpuid_table if entry[:2] == (1, 0))
            self.state.cpuid1 = list(leaf1[2:6])
            self.state.cpuid_long = 1 if self.long_mode_capable else 0
            _check(lib.replayvm_uc_hook_cpuid(self.uc, self.state, self._owner), "hook CPUID")

    # ----------------------------------------------------------------- several CPUs
    def _new_context(self):
        holder = ffi.new("uc_context **")
        _check(lib.uc_context_alloc(self.uc, holder), "allocate context")
        return ffi.gc(holder[0], lib.uc_context_free)

    def _switch(self, cpu: int) -> None:
        """Unicorn holds `cpu`'s context from now on. Between runs only: the count, the blocks'
        kind (PRECISE_HFLAG, set by the restore) and the fast paths' state stay exact."""
        state = self.state
        _check(lib.replayvm_uc_context_save(self.uc, self._cpu_contexts[self.cpu]), "save a CPU")
        if self._cpu_mode[cpu] == CPU_STARTING:
            _check(lib.replayvm_uc_context_restore(self.uc, state, self._reset_context), "reset a CPU")
            self.set_state(real_mode_state(self._cpu_vector[cpu] << 8, 0))
            self._cpu_mode[cpu] = CPU_RUNNING
            shadow = False
        else:
            context = self._cpu_contexts[cpu]
            shadow = bool(lib.replayvm_uc_context_hflags(self.uc, context) & HF_INHIBIT_IRQ)
            _check(lib.replayvm_uc_context_restore(self.uc, state, context), "restore a CPU")
        # The TLB (and QEMU's jump cache) hold the other CPU's translations of its addresses.
        _check(lib.replayvm_uc_flush_tlb(self.uc), "flush TLB")
        state.fast_tb = ffi.NULL
        state.want_window = 0
        state.prev_if = 0
        state.prev_size = 0
        state.window_shadow = 1 if shadow else 0
        self.cpu = cpu
        self.machine.select_cpu(cpu)
        self._refresh_lapic_id()
        if self.on_switch is not None:
            self.on_switch(cpu, state.icount)

    def _schedule(self) -> bool:
        """Several CPUs, between runs: switch if the scheduler says so. True when the CPU to run
        is halted with nothing to wake it (the machine halts)."""
        scheduler = self.machine.scheduler
        if scheduler is not None:
            target = scheduler.choose(self.state.icount, self.cpu, self._runnable)
            if target is not None and target != self.cpu:
                if not 0 <= target < self.cpus:
                    raise ValueError(f"a switch to CPU {target} of a machine with {self.cpus}")
                self._switch(target)
        cpu = self.cpu
        if self._cpu_halted[cpu]:
            if not (self._cpu_halted_if[cpu] and self.machine.interrupts.has_pending()):
                return True
            self._cpu_halted[cpu] = False
        return False

    def end_turn_by(self, position: int) -> None:
        """From a device access: the run under way ends at `position` at the latest (the
        scheduler moved the current CPU's turn; recording only)."""
        state = self.state
        state.stop_at = min(state.stop_at, max(position, state.icount + 1))

    def cpu_states(self) -> list[dict]:
        """Every CPU's state (a CPU still waiting for its STARTUP IPI: {error: ...}), for the
        footer and its replay's check."""
        states: list[dict] = []
        for cpu in range(self.cpus):
            if cpu != self.cpu and self._cpu_mode[cpu] != CPU_RUNNING:
                states.append({"error": "waiting for its STARTUP IPI"})
                continue
            with self.viewing_cpu(cpu):
                states.append(self.get_state().to_dict())
        return states

    @contextmanager
    def viewing_cpu(self, cpu: int) -> Iterator[None]:
        """Between runs (a debugger, the footer): Unicorn holds `cpu`'s context inside the block,
        so that registers and guest-virtual memory (its page tables) are that CPU's; the running
        CPU's is back after it. Nothing runs inside; `cpu` must have run (cpu_condition)."""
        if cpu == self.cpu:
            yield
            return
        if self._cpu_mode[cpu] != CPU_RUNNING:
            raise ValueError(f"CPU {cpu} has not started")
        running = self._cpu_contexts[self.cpu]
        _check(lib.replayvm_uc_context_save(self.uc, running), "save a CPU")
        _check(lib.replayvm_uc_context_restore(self.uc, self.state, self._cpu_contexts[cpu]), "restore a CPU")
        _check(lib.replayvm_uc_flush_tlb(self.uc), "flush TLB")
        try:
            yield
        finally:
            _check(lib.replayvm_uc_context_restore(self.uc, self.state, running), "restore a CPU")
            _check(lib.replayvm_uc_flush_tlb(self.uc), "flush TLB")

    def cpu_condition(self, cpu: int) -> str:
        """What CPU `cpu` is doing, in words (a debugger's thread list): "running", "halted",
        "waiting for its STARTUP IPI" or "starting" (its STARTUP IPI came, it has not run yet)."""
        mode = self._cpu_mode[cpu] if self.cpus > 1 else CPU_RUNNING
        if mode == CPU_WAIT_SIPI:
            return "waiting for its STARTUP IPI"
        if mode == CPU_STARTING:
            return "starting"
        halted = self._cpu_halted[cpu] if self.cpus > 1 else self.halted
        return "halted" if halted else "running"

    def start_cpus(self) -> dict:
        """Several CPUs: what a branch trace (replay --live) starts its other CPUs from: which CPU
        runs, each CPU's mode, STARTUP vector and halt, and each started CPU's CpuState (as for
        the running CPU's `initial_state`: no x87/SSE registers or MSRs)."""
        states = self.cpu_states()
        return {"current": self.cpu, **self._cpu_mode_fields(),
                "states": [state if cpu != self.cpu and "regs" in state else None
                           for cpu, state in enumerate(states)]}

    def load_start_cpus(self, start: dict) -> None:
        """A branch trace's start_cpus (after set_state gave the running CPU its initial state):
        each other started CPU's context is the power-on CPU with its CpuState loaded."""
        if len(start["modes"]) != self.cpus or not 0 <= start["current"] < self.cpus:
            raise ValueError(f"start_cpus is not of a machine with {self.cpus} CPUs")
        current = self._cpu_contexts[start["current"]]
        _check(lib.replayvm_uc_context_save(self.uc, current), "save a CPU")
        for cpu, state in enumerate(start["states"]):
            if state is None or cpu == start["current"]:
                continue
            _check(lib.replayvm_uc_context_restore(self.uc, self.state, self._reset_context), "reset a CPU")
            self.set_state(CpuState.from_dict(state))
            _check(lib.replayvm_uc_context_save(self.uc, self._cpu_contexts[cpu]), "save a CPU")
        _check(lib.replayvm_uc_context_restore(self.uc, self.state, current), "restore a CPU")
        _check(lib.replayvm_uc_flush_tlb(self.uc), "flush TLB")
        self._load_cpu_modes(start)
        self.cpu = start["current"]
        self.machine.select_cpu(self.cpu)
        self._refresh_lapic_id()

    @property
    def counting(self) -> str:
        """How instructions are counted now: "blocks" (translated blocks without the
        per-instruction hook wherever nothing can stop or observe the guest inside them; see
        emu_build.py) or "instructions" (the hook on every instruction: the reference mode, a
        Unicorn whose internals were not as probed, or a 32-bit guest that turned PAE on)."""
        st = self.state
        return "blocks" if st.counting_blocks and not st.always_precise else "instructions"

    def counting_statistics(self) -> dict[str, int]:
        """Fast blocks begun, switches between the two kinds of block, and device accesses that
        sent a fast block back to re-run an instruction precisely."""
        st = self.state
        return {"fast_blocks": st.fast_blocks, "mode_switches": st.mode_switches,
                "fast_leaves": st.fast_leaves, "bulk_runs": st.bulk_runs, "bulk_elements": st.bulk_elements,
                "stos_runs": st.stos_runs, "stos_elements": st.stos_elements,
                "precise_blocks": st.precise_blocks}

    @property
    def cpuid_table(self) -> list[tuple[int, int, int, int, int, int]]:
        """(leaf, subleaf, eax, ebx, ecx, edx) the guest sees: executed once on a scratch CPU of
        the same model, for the trace header."""
        if self._cpuid_table is None:
            from unicorn import Uc

            scratch = Uc(UC_ARCH_X86, UC_MODE_32)
            scratch.ctl_set_cpu_model(self._cpu_model)
            scratch.mem_map(0x1000, 0x1000)
            scratch.mem_write(0x1000, b"\x0f\xa2")                # cpuid
            table = []

            def leaf(number: int, sub: int = 0) -> tuple[int, ...]:
                scratch.reg_write(ucx.UC_X86_REG_EAX, number)
                scratch.reg_write(ucx.UC_X86_REG_ECX, sub)
                scratch.emu_start(0x1000, 0x1002)
                values = tuple(scratch.reg_read(r) for r in (ucx.UC_X86_REG_EAX, ucx.UC_X86_REG_EBX,
                                                              ucx.UC_X86_REG_ECX, ucx.UC_X86_REG_EDX))
                table.append((number, sub, *values))
                return values

            for base in (0, 0x80000000):
                highest = leaf(base)[0]
                for number in range(base + 1, min(highest, base + 0x20) + 1):
                    leaf(number)
            self._cpuid_table = table
        return self._cpuid_table

    # ----------------------------------------------------------------- registers and memory
    def reg(self, name: str) -> int:
        number = REG.get(name)
        if number is None:
            return self._reg64(name)
        # One 8-byte buffer for every register: a UC_MODE_64 engine answers CR0-CR4 as 8 bytes
        # (CR2 and CR3 may be wider than 32 bits there), a UC_MODE_32 one as 4, segment registers
        # as 2 (into the zeroed low bytes).
        self._u64[0] = 0
        _check(lib.uc_reg_read(self.uc, number, self._u64), f"read {name}")
        return self._u64[0] & (self._cr_mask if name in CONTROL_REGISTERS else 0xFFFFFFFF)

    def set_reg(self, name: str, value: int) -> None:
        number = REG.get(name)
        if number is None:
            self._set_reg64(name, value)
            return
        if self.long_mode_capable and name in LOADED_SEGMENTS:
            self._load_selector(name, value & 0xFFFF)
            return
        self._u64[0] = value & (self._cr_mask if name in CONTROL_REGISTERS else 0xFFFFFFFF)
        _check(lib.uc_reg_write(self.uc, number, self._u64), f"write {name}")

    def _reg64(self, name: str) -> int:
        """A 64-bit register, or EFER (0 on a 32-bit engine, which cannot enter long mode)."""
        if name == "efer":
            return self.msr(MSR_EFER) if self.long_mode_capable else 0
        if not self.long_mode_capable:
            raise UnicornError(f"{name}: a 64-bit register of a 32-bit engine")
        self._u64[0] = 0
        _check(lib.uc_reg_read(self.uc, REG64[name], self._u64), f"read {name}")
        return self._u64[0]

    def msr(self, number: int) -> int:
        self._msr[0], self._msr[1] = number, 0
        _check(lib.uc_reg_read(self.uc, ucx.UC_X86_REG_MSR, self._msr), f"read MSR {number:#x}")
        return self._msr[1]

    def _set_reg64(self, name: str, value: int) -> None:
        if name == "efer":
            self._msr[0], self._msr[1] = MSR_EFER, value
            _check(lib.uc_reg_write(self.uc, ucx.UC_X86_REG_MSR, self._msr), "write EFER")
            return
        if not self.long_mode_capable:
            raise UnicornError(f"{name}: a 64-bit register of a 32-bit engine")
        self._u64[0] = value & 0xFFFFFFFFFFFFFFFF
        _check(lib.uc_reg_write(self.uc, REG64[name], self._u64), f"write {name}")

    def _pc(self) -> int:
        """RIP (EIP on a 32-bit engine): where the guest executes next, as emu_start takes it."""
        return self.reg("rip") if self.long_mode_capable else self.reg("eip")

    def _leave_long_mode(self) -> None:
        """A UC_MODE_64 vCPU starts in long mode; put it in real mode with EFER clear, as a PC
        starts (see __init__: CR0.PG set then cleared is what clears EFER.LMA)."""
        self.set_reg("cr0", self.reg("cr0") | CR0_PG | 1)
        self.set_reg("cr0", 0x10)
        self.set_reg("efer", 0)

    def table_register(self, name: str) -> tuple[int, int]:
        _check(lib.uc_reg_read(self.uc, TABLE_REG[name], self._mmr), f"read {name}")
        return self._mmr.base, self._mmr.limit

    def set_table_register(self, name: str, base: int, limit: int, selector: int = 0,
                           flags: int = 0) -> None:
        mmr = ffi.new("uc_x86_mmr *", {"selector": selector, "base": base, "limit": limit, "flags": flags})
        _check(lib.uc_reg_write(self.uc, TABLE_REG[name], mmr), f"write {name}")

    def read_linear(self, addr: int, size: int) -> bytes:
        start = self.translate(addr)
        if self.translate(addr + size - 1) - start == size - 1:
            return bytes(self.machine.ram[start:start + size])
        return bytes(self.machine.ram[self.translate(addr + i)] for i in range(size))

    def write_linear(self, addr: int, data: bytes) -> None:
        start = self.translate(addr, write=True)
        if self.translate(addr + len(data) - 1, write=True) - start == len(data) - 1:
            self.machine.ram[start:start + len(data)] = data
        else:                                              # the write straddles two pages
            for i, byte in enumerate(data):
                self.machine.ram[self.translate(addr + i, write=True)] = byte

    def translate(self, linear: int, write: bool = False) -> int:
        """Linear to physical through the guest's page tables: 32-bit (4 KiB and 4 MiB pages),
        PAE and 4-level (4 KiB and 2 MiB pages; 1 GiB pages in long mode too)."""
        ram = self.machine.ram
        if not self.reg("cr0") & 0x80000000:
            physical = linear & 0xFFFFFFFF
        elif self.reg("cr4") & CR4_PAE:
            physical = self._translate_pae(linear, write)
        else:
            linear &= 0xFFFFFFFF
            cr3 = self.reg("cr3") & 0xFFFFF000
            pde = int.from_bytes(ram[cr3 + ((linear >> 22) << 2):][:4], "little")
            if not pde & 1:
                self._page_fault(linear, write)
            if pde & 0x80 and self.reg("cr4") & 0x10:
                physical = (pde & 0xFFC00000) | (linear & 0x3FFFFF)
            else:
                table = pde & 0xFFFFF000
                if table + 4096 > len(ram):
                    self._page_fault(linear, write)
                pte = int.from_bytes(ram[table + (((linear >> 12) & 0x3FF) << 2):][:4], "little")
                if not pte & 1:
                    self._page_fault(linear, write)
                physical = (pte & 0xFFFFF000) | (linear & 0xFFF)
        if physical >= len(ram):
            raise x86_delivery.DeliveryFault(x86_delivery.VECTOR_GENERAL_PROTECTION, 0,
                                             f"address {linear:#x} is not RAM")
        return physical

    def _translate_pae(self, linear: int, write: bool) -> int:
        """PAE (3 levels from a 4-entry PDPT) or, with EFER.LMA, 4 levels from the PML4. Only
        presence is checked: delivery and the debugger read with supervisor rights."""
        ram = self.machine.ram
        long_mode = bool(self.reg("efer") & x86_delivery.EFER_LMA)
        if long_mode:
            linear &= 0xFFFFFFFFFFFFFFFF
            table, shifts = self.reg("cr3") & 0x000FFFFFFFFFF000, (39, 30, 21, 12)
        else:
            linear &= 0xFFFFFFFF
            table, shifts = self.reg("cr3") & 0xFFFFFFE0, (30, 21, 12)
        address_bits = 0x000FFFFFFFFFF000
        for shift in shifts:
            # PAE's PDPT has 4 entries and no large pages; a PS bit maps 2 MiB in a PD, 1 GiB in
            # a long-mode PDPT.
            pae_pdpt = not long_mode and shift == 30
            at = table + ((linear >> shift) & (3 if pae_pdpt else 0x1FF)) * 8
            if at + 8 > len(ram):
                self._page_fault(linear, write)
            entry = int.from_bytes(ram[at:at + 8], "little")
            if not entry & 1:
                self._page_fault(linear, write)
            if shift == 12 or (entry & 0x80 and shift in (21, 30) and not pae_pdpt):
                size = 1 << shift
                return (entry & address_bits & ~(size - 1)) | (linear & (size - 1))
            table = entry & address_bits
        raise AssertionError("a page walk ends at its last level")

    @staticmethod
    def _page_fault(linear: int, write: bool) -> None:
        """No side effect: CR2 is loaded by x86_delivery if the fault reaches the guest (a
        debugger reading an unmapped page must not change the guest)."""
        raise x86_delivery.DeliveryFault(x86_delivery.VECTOR_PAGE_FAULT, 2 if write else 0,
                                         f"page fault at {linear:#x} during delivery", address=linear)

    def _load_segment(self, name: str, selector: int, base: int, limit: int, flags: int) -> None:
        """Selector and hidden part together (a UC_MODE_64 engine: Unicorn writes only the
        selector of CS/DS/ES/SS there; see replayvm_uc_load_segment)."""
        index = ("es", "cs", "ss", "ds", "fs", "gs").index(name)
        _check(lib.replayvm_uc_load_segment(self.uc, index, selector, base, limit, flags), f"load {name}")

    def _load_from_gdt(self, name: str, selector: int) -> None:
        base, limit, access = x86_delivery._descriptor(self, selector)
        self._load_segment(name, selector, base, limit, access)

    def _load_selector(self, name: str, selector: int) -> None:
        """What a segment register write does on a UC_MODE_32 engine (QEMU's cpu_x86_load_seg,
        without its privilege checks), done here on a UC_MODE_64 one, where Unicorn would write
        the selector alone: real-mode style in real mode, else the GDT descriptor; a null
        selector keeps its RPL as the DPL (SS: the CPL, as a 64-bit ring change leaves it)."""
        if not self.reg("cr0") & 1:
            self._load_segment(name, selector, selector << 4, 0xFFFF, REAL_MODE_SEGMENT_FLAGS)
        elif not selector & ~3:
            self._load_segment(name, selector, 0, 0, (selector & 3) << 13)
        else:
            self._load_from_gdt(name, selector)

    def load_segments_from_user_mode(self, cs: int, ss: int) -> None:
        if self.long_mode_capable:               # the loads check no privilege here
            self.set_reg("ss", ss)
            self.set_reg("cs", cs)
            return
        # Unicorn checks a selector write against the current privilege level like a MOV to a
        # segment register would, and refuses ring-0 selectors at CPL 3. Its CPL follows SS, and
        # with CR0.PE clear a segment load is real-mode style (DPL 0): so clear PE for one SS load
        # to reach CPL 0, restore PE, then load the real selectors.
        cr0 = self.reg("cr0")
        self.set_reg("cr0", cr0 & ~1)
        self.set_reg("ss", 0)
        self.set_reg("cr0", cr0)
        self.set_reg("ss", ss)
        self.set_reg("cs", cs)

    # ----------------------------------------------------------------- state transfer
    def set_state(self, state: CpuState) -> None:
        regs = state.regs
        if self.long_mode_capable:
            self._leave_long_mode()               # CR0.PG with EFER.LME below enters it again
            for name in CpuState.GPR_NAMES:
                self.set_reg(name, regs.get(name, 0))
            self.set_reg("rflags", regs.get("rflags", 2))
        else:
            for name in GPR32:
                self.set_reg(name, regs.get("r" + name[1:], 0))
            self.set_reg("eflags", regs.get("rflags", 2))
        self.set_table_register("gdtr", state.gdt[0], state.gdt[1])
        self.set_table_register("idtr", state.idt[0], state.idt[1])
        self.set_reg("cr4", state.cr4)
        self.set_reg("cr3", state.cr3)
        if self.long_mode_capable:
            self.set_reg("efer", state.efer)
            self.set_reg("cr0", state.cr0)
            for name in ("ds", "es", "fs", "gs", "ss", "cs"):
                seg = getattr(state, name)
                self._load_segment(name, seg.selector, seg.base, seg.limit, _segment_flags(seg))
            self._finish_state(state)
            return
        self.set_reg("cr0", state.cr0)
        protected = bool(state.cr0 & 1)
        untouched = self._descriptor_access_bytes(state) if protected else {}
        if protected:
            self.set_reg("cr0", state.cr0 & ~1)        # load SS/CS as CPL 0 first (see above)
            self.set_reg("ss", 0)
            self.set_reg("cr0", state.cr0)
        for name in ("ss", "ds", "es", "fs", "gs", "cs"):
            self.set_reg(name, getattr(state, name).selector)
        for physical, access in untouched.items():     # loading set their accessed bits: undo
            self.machine.ram[physical] = access
        self._finish_state(state)

    def _descriptor_access_bytes(self, state: CpuState) -> dict[int, int]:
        """The access bytes (physical address: value) of the GDT descriptors `state`'s segment
        selectors name. Loading a selector in protected mode sets its descriptor's accessed bit
        in guest RAM, as a CPU does; restoring a saved state is not the guest loading a segment,
        and must leave RAM as it was (a replay that starts from a saved state would otherwise
        end with RAM the recording never had)."""
        gdt_base, gdt_limit = state.gdt
        found: dict[int, int] = {}
        for name in ("ss", "ds", "es", "fs", "gs", "cs"):
            selector = getattr(state, name).selector
            if selector & ~3 == 0 or selector & 4 or (selector & ~7) + 7 > gdt_limit:
                continue                                # null, LDT or outside the GDT: no load
            try:
                physical = self.translate(gdt_base + (selector & ~7) + 5)
            except x86_delivery.DeliveryFault:
                continue
            found[physical] = self.machine.ram[physical]
        return found

    def _finish_state(self, state: CpuState) -> None:
        regs = state.regs
        tr = state.tr
        self.set_table_register("tr", tr.base, tr.limit, tr.selector, _segment_flags(tr))
        if self.long_mode_capable:
            if state.efer & x86_delivery.EFER_LMA:    # FS/GS bases are MSRs in long mode
                self.set_reg("fs_base", state.fs.base)
                self.set_reg("gs_base", state.gs.base)
            self.set_reg("rip", regs.get("rip", 0))
        else:
            self.set_reg("eip", regs.get("rip", 0))

    def get_state(self) -> CpuState:
        state = CpuState()
        state.regs = {name: 0 for name in CpuState.GPR_NAMES}
        if self.long_mode_capable:
            for name in CpuState.GPR_NAMES:
                state.regs[name] = self.reg(name)
            state.regs["rip"] = self.reg("rip")
            state.regs["rflags"] = self.reg("rflags")
            state.efer = self.reg("efer")
        else:
            for name in GPR32:
                state.regs["r" + name[1:]] = self.reg(name)
            state.regs["rip"] = self.reg("eip")
            state.regs["rflags"] = self.reg("eflags")
        state.cr0, state.cr2, state.cr3, state.cr4 = (self.reg(n) for n in ("cr0", "cr2", "cr3", "cr4"))
        state.gdt = self.table_register("gdtr")
        state.idt = self.table_register("idtr")
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            setattr(state, name, self._segment(name, state))
        _check(lib.uc_reg_read(self.uc, TABLE_REG["tr"], self._mmr), "read tr")
        state.tr = Segment(selector=self._mmr.selector, base=self._mmr.base, limit=self._mmr.limit,
                           type=0xB, s=0)
        if state.efer & x86_delivery.EFER_LMA:
            state.fs.base = self.reg("fs_base")
            state.gs.base = self.reg("gs_base")
        return state

    def _segment(self, name: str, state: CpuState) -> Segment:
        """Unicorn exposes only selectors; rebuild the hidden part as the CPU loaded it."""
        selector = self.reg(name)
        if not state.cr0 & 1:
            return Segment(selector=selector, base=selector << 4, type=0xB if name == "cs" else 3)
        try:
            base, limit, access = x86_delivery._descriptor(self, selector)
        except x86_delivery.DeliveryFault:
            return Segment(selector=selector, unusable=1, present=0)
        return Segment(selector=selector, base=base, limit=limit, type=(access >> 8) & 0xF,
                       s=(access >> 12) & 1, dpl=(access >> 13) & 3, present=1,
                       db=(access >> 22) & 1, g=(access >> 23) & 1, avl=(access >> 20) & 1,
                       l=(access >> 21) & 1)

    # ----------------------------------------------------------------- running
    @property
    def icount(self) -> int:
        return self.state.icount

    def use_clock(self, clock) -> None:
        """Keep time with `clock` from now on (a replay going live): an instruction clock counts
        this engine's instructions; any other is the host's, towards which slices are estimated."""
        self._instruction_clock = isinstance(clock, VirtualClock)
        if self._instruction_clock:
            clock.source = lambda: self.state.icount

    def start_at_position(self, position: int) -> None:
        """Count positions from `position` (a branch trace starts where its parent went live)."""
        self.state.icount = position
        self.state.stop_at = position

    @property
    def position(self) -> int:
        """Where the guest is, in the unit traces use on this engine: instructions begun."""
        return self.state.icount

    @property
    def pure_reads(self) -> int:
        """LAPIC ID reads served in C (not logged)."""
        return self.state.lapic_id_reads

    def pure_read_sites(self) -> dict[int, int]:
        """LAPIC ID reads (served in C, not logged) counted by the EIP that made them."""
        st = self.state
        return {st.id_read_rip[i]: st.id_read_count[i] for i in range(1024) if st.id_read_count[i]}

    def interrupt_landmark(self) -> None:
        """Never needed: an interrupt's instruction count places it exactly."""
        return None

    def exit_context(self) -> tuple[int, int]:
        """(EIP, CPL) of the instruction being executed, for trace records."""
        return self._pc(), self.reg("cs") & 3

    def address_space(self) -> int:
        """CR3 of the CPU Unicorn holds (one register read: the recorder asks at every event)."""
        u64 = self._u64
        u64[0] = 0
        _check(lib.uc_reg_read(self.uc, CR3_REG, u64), "read cr3")
        return u64[0] & self._cr_mask

    def request_stop(self) -> None:
        self._stop_requested = True
        lib.uc_emu_stop(self.uc)

    def stop_here(self) -> None:
        """From inside a hook: make run() return STOP_REQUESTED before the next instruction."""
        self._stop_requested = True
        self._stop_now()

    def _stop_now(self) -> None:
        """From inside a hook: end the run before the next instruction begins (count exact).

        Only the count target moves; the per-instruction hook does the stopping. Calling
        uc_emu_stop inside an MMIO callback would make Unicorn restart the instruction, which
        then performs its access a second time."""
        self.state.stop_at = self.state.icount

    def move_stop(self, position: int) -> None:
        """Replay, from inside a hook or between runs: the current run is to end at `position`
        (the next recorded event), earlier or later than asked before -- unless something has
        already asked it to stop here (a fault, a watchpoint, a stop request, an error)."""
        state = self.state
        if self._stop_requested or self._pending_fault is not None or self._python_error is not None \
                or self._shutdown_in_hook or state.debug_hit:
            return
        target = position if position > state.icount else state.icount
        state.stop_at = target
        self._run_end = target

    def run(self, budget_ns: int | None = None, until_position: int | None = None,
            max_instructions: int | None = None) -> StopReason:
        """Run until halt, shutdown, stop request, the time budget is used, or the guest is at
        instruction `until_position` (or `max_instructions` from here; the nearer one)."""
        machine = self.machine
        state = self.state
        interrupts = machine.interrupts
        clock = machine.clock
        end = until_position
        if max_instructions is not None:
            relative = state.icount + max_instructions
            end = relative if end is None else min(end, relative)
        self._run_end = end
        time_end = None if budget_ns is None else clock.now_ns() + budget_ns
        self.halted = False
        scheduler = machine.scheduler if self.cpus > 1 else None
        # Everything due at the current count (a fault, an interrupt) is delivered before the
        # loop returns for the count budget or a debugger stop: a run always ends "settled",
        # with EIP at the next instruction to execute, so a position names one CPU state.
        while True:
            if self._stop_requested:
                self._stop_requested = False
                return StopReason.STOP_REQUESTED
            if self._pending_fault is not None:   # before the time budget: a run ends settled
                vector, error, eip = self._pending_fault
                self._pending_fault = None
                if not self._deliver(vector, software=False, error_code=error, return_eip=eip):
                    return StopReason.SHUTDOWN
                continue
            until_timer = machine.poll()
            if time_end is not None and clock.now_ns() >= time_end:
                return StopReason.BUDGET
            if self.cpus > 1:
                halted = self._schedule()
                interrupts = machine.interrupts          # the CPU's own LAPIC (or the trace)
                if halted:
                    self.halted = True
                    return StopReason.HALT
            single_step = False
            if interrupts.has_pending():
                if self.reg("eflags") & EFLAGS_IF:
                    if self._in_sti_shadow():
                        single_step = True            # STI's shadow: one more instruction first
                    else:
                        vector = interrupts.acknowledge()
                        self.interrupts_delivered += 1
                        if self.on_interrupt is not None:
                            self.on_interrupt(vector, state.icount)
                        if not self._deliver(vector, software=False, error_code=None,
                                             return_eip=self._pc()):
                            return StopReason.SHUTDOWN
                        continue
                state.prev_if = 0
                state.prev_size = 0
                state.want_window = 0 if single_step else 1
            else:
                state.want_window = 0
            if state.debug_hit:
                return StopReason.DEBUG
            end = self._run_end
            if end is not None and state.icount >= end:
                return StopReason.BUDGET
            slice_end = state.icount + SLICE_INSTRUCTIONS
            if end is not None:
                slice_end = min(slice_end, end)
            if until_timer is not None:
                if self._instruction_clock:             # 1 ns per instruction: exact
                    slice_end = min(slice_end, state.icount + max(1, until_timer))
                else:                                   # wall clock: estimate from the speed
                    ahead = int(until_timer * self._instructions_per_ns)
                    slice_end = min(slice_end, state.icount + max(MIN_WALL_SLICE, ahead))
            if scheduler is not None:
                turn_end = scheduler.next_switch_position()
                if turn_end is not None:
                    slice_end = min(slice_end, max(turn_end, state.icount + 1))
            if single_step:
                slice_end = state.icount + 1
            state.stop_at = slice_end
            started_at, started_ns = state.icount, time.perf_counter_ns()
            err = self._emu_start()
            self._learn_speed(state.icount - started_at, time.perf_counter_ns() - started_ns)
            if self._python_error is not None:
                error, self._python_error = self._python_error, None
                raise error
            if state.fast_error:
                raise UnicornError(f"exact instruction counting lost: "
                                   f"{ffi.string(lib.replayvm_fast_error_text(state.fast_error)).decode()} "
                                   f"(eip={self.reg('eip'):#x}, instruction {state.icount})")
            if self._shutdown_in_hook:
                self._shutdown_in_hook = False
                return StopReason.SHUTDOWN
            if err == UC_ERR_EXCEPTION and state.fault_pending:
                if not state.fault_fetch:
                    lib.replayvm_uc_settle_fault(state)
                self._take_walk_fault()
                continue
            if err and self._pending_fault is None:
                self.last_error = (f"emulation stopped: {ffi.string(lib.uc_strerror(err)).decode()} "
                                   f"at eip={self.reg('eip'):#x} (instruction {state.icount})")
                return StopReason.SHUTDOWN
            if state.stop_reason == lib.STOP_NONE and not self._stop_requested \
                    and self._pending_fault is None:
                if self.cpus > 1:                     # another CPU may run: the loop decides
                    self._cpu_halted[self.cpu] = True
                    self._cpu_halted_if[self.cpu] = bool(self.reg("eflags") & EFLAGS_IF)
                    continue
                self.halted = True
                return StopReason.HALT

    def _emu_start(self) -> int:
        """One uc_emu_start from EIP, started again at once as long as the C hooks ended it only
        to reset Unicorn's state after an exception's delivery (STOP_RESUME)."""
        state = self.state
        while True:
            state.stop_reason = lib.STOP_NONE
            state.fast_tb = ffi.NULL
            state.window_shadow = 0
            err = lib.uc_emu_start(self.uc, self._pc(), 0, 0, 0)
            if err or state.stop_reason != lib.STOP_RESUME or self._python_error is not None \
                    or self._shutdown_in_hook or state.fast_error:
                return err

    # ----------------------------------------------------------------- debugging and checkpoints
    def set_breakpoints(self, addresses: list[int]) -> None:
        """Stop before executing an instruction at any of these linear addresses (at most 64)."""
        if len(addresses) > len(self.state.breaks):
            raise ValueError(f"at most {len(self.state.breaks)} breakpoints")
        for i, address in enumerate(addresses):
            self.state.breaks[i] = address & (0xFFFFFFFFFFFFFFFF if self.long_mode_capable else 0xFFFFFFFF)
        self.state.nbreak = len(addresses)

    def set_watchpoints(self, watches: list[tuple[int, int, int]]) -> None:
        """Stop after an instruction reads (access & 1) or writes (access & 2) one of these
        (linear address, length, access) ranges, mapped through the page tables at each access.

        At most 4. The VMM's own writes (interrupt frames it pushes) are not seen: they do not
        go through the emulated CPU. While any is set, every memory access calls a C hook."""
        st = self.state
        if len(watches) > len(st.watch_va):
            raise ValueError(f"at most {len(st.watch_va)} watchpoints")
        for i, (address, length, access) in enumerate(watches):
            st.watch_va[i], st.watch_len[i], st.watch_access[i] = address, max(1, length), access
        st.nwatch = len(watches)
        if watches and self._watch_hook is None:
            handle = ffi.new("uc_hook *")
            _check(lib.replayvm_uc_add_watch_hook(self.uc, st, handle), "add watchpoint hook")
            self._watch_hook = handle[0]
            self._forget_translations()
        elif not watches and self._watch_hook is not None:
            _check(lib.uc_hook_del(self.uc, self._watch_hook), "remove watchpoint hook")
            self._watch_hook = None
            self._forget_translations()

    def _forget_translations(self) -> None:
        """Memory hooks are decided when code is translated and when a TLB entry is filled (an
        entry made before the hook lets accesses bypass it): drop both."""
        _check(lib.replayvm_uc_flush_tb(self.uc), "flush translated code")
        lib.replayvm_uc_forget_code_pages(self.state)
        _check(lib.replayvm_uc_flush_tlb(self.uc), "flush TLB")

    def take_debug_hit(self) -> DebugHit:
        """Why the last debugger stop happened (the C hook's DEBUG_* kind, the watched address
        accessed), and clear it."""
        hit = DebugHit(DebugStop(self.state.debug_hit), self.state.watch_addr)
        self.state.debug_hit = lib.DEBUG_NONE
        return hit

    def linear_pc(self) -> int:
        """CS base + EIP: the address breakpoints compare with (RIP itself in long mode)."""
        if self.long_mode_capable and self.reg("efer") & x86_delivery.EFER_LMA:
            return self.reg("rip")
        eip = self.reg("eip")
        cs = self.reg("cs")
        if not self.reg("cr0") & 1:
            return (cs << 4) + eip
        try:
            base = x86_delivery._descriptor(self, cs)[0]
        except x86_delivery.DeliveryFault:
            base = 0
        return (base + eip) & 0xFFFFFFFF

    def resume_here(self) -> None:
        """The next run must not stop at a breakpoint on the instruction it starts with."""
        self.state.skip_icount = self.state.icount
        self.state.skip_addr = self.linear_pc()

    def resume_anywhere(self) -> None:
        """Undo resume_here(): no instruction is exempt from the breakpoints."""
        self.state.skip_icount = NO_SKIP

    def read_memory(self, address: int, length: int) -> bytes:
        """For a debugger: read_linear, with an untranslatable address as GuestAddressFault."""
        try:
            return self.read_linear(address, length)
        except x86_delivery.DeliveryFault as fault:
            raise GuestAddressFault(str(fault)) from None

    _KEPT_ON_RESTORE = ("nbreak", "breaks", "skip_icount", "skip_addr", "debug_hit", "watch_addr",
                        "nwatch", "watch_va", "watch_len", "watch_access", "ram", "ram_size",
                        "code_pages", "fault_pending", "fault_error", "fault_fetch", "fault_page", "pae_seen",
                        "uc_invalid_addr_offset", "tlb_fills", "code_page_flushes", "env_state",
                        "counting_blocks", "always_precise", "env", "cpu", "code_hook", "icount_decr_offset",
                        "mem_io_pc_offset", "fast_blocks", "mode_switches", "fast_leaves", "precise_mode",
                        "fast_error", "bulk_io", "bulk_runs", "bulk_elements", "stos_in_bulk", "uc",
                        "stos_runs", "stos_elements", "pae_walk", "precise_blocks")

    def save_cpu(self) -> EngineSnapshot:
        """The whole vCPU (QEMU's CPU state, our counters, faults in flight): for checkpoints."""
        self._allocate_context()
        _check(lib.replayvm_uc_context_save(self.uc, self._context), "save context")
        return EngineSnapshot(engine=self.name,
                              context=bytes(ffi.buffer(self._context, self._context_size)),
                              counters=bytes(ffi.buffer(self.state)), pending_fault=self._pending_fault,
                              halted=self.halted, interrupts_delivered=self.interrupts_delivered,
                              exceptions_delivered=self.exceptions_delivered,
                              cpus=self._save_other_cpus() if self.cpus > 1 else None)

    def _save_other_cpus(self) -> dict:
        """Several CPUs: which runs, and every other one's context and state (EngineSnapshot.cpus).
        A CPU's saved context is only meaningful once it runs; the running CPU's is `context`."""
        contexts: list[bytes | None] = [
            bytes(ffi.buffer(self._cpu_contexts[cpu], self._context_size))
            if cpu != self.cpu and self._cpu_mode[cpu] == CPU_RUNNING else None
            for cpu in range(self.cpus)]
        return {"current": self.cpu, "contexts": contexts, **self._cpu_mode_fields()}

    def _restore_other_cpus(self, saved: dict | None) -> None:
        """The inverse of _save_other_cpus (before the running CPU's context is restored)."""
        if (saved is None) != (self.cpus == 1) or \
                (saved is not None and len(saved["modes"]) != self.cpus):
            raise ValueError(f"not a snapshot of a machine with {self.cpus} CPU(s)")
        if saved is None:
            return
        for cpu, context in enumerate(saved["contexts"]):
            if context is not None:
                if len(context) != self._context_size:
                    raise ValueError("a vCPU context of another size")
                ffi.memmove(self._cpu_contexts[cpu], context, self._context_size)
        self._load_cpu_modes(saved)
        self.cpu = saved["current"]
        self.machine.select_cpu(self.cpu)

    def restore_cpu(self, snapshot: EngineSnapshot) -> None:
        """Undo to a save_cpu() point; RAM is the caller's. Translated code and the TLB are
        dropped, since RAM (code included) may have been put back too."""
        if snapshot.engine != self.name or len(snapshot.counters) != ffi.sizeof("struct emu_state"):
            raise ValueError(f"not a snapshot of this {self.name} engine")
        self._allocate_context()
        if len(snapshot.context) != self._context_size:
            raise ValueError("a vCPU context of another size")
        self._restore_other_cpus(snapshot.cpus)
        counters = snapshot.counters
        self._pending_fault = snapshot.pending_fault
        self.halted = snapshot.halted
        self.interrupts_delivered = snapshot.interrupts_delivered
        self.exceptions_delivered = snapshot.exceptions_delivered
        ffi.memmove(self._context, snapshot.context, self._context_size)
        _check(lib.replayvm_uc_context_restore(self.uc, self.state, self._context), "restore context")
        kept = {name: ffi.buffer(ffi.addressof(self.state, name))[:] for name in self._KEPT_ON_RESTORE}
        ffi.buffer(self.state)[:] = counters
        for name, value in kept.items():
            ffi.buffer(ffi.addressof(self.state, name))[:] = value
        self.state.fast_tb = ffi.NULL
        self.state.precise_until = 0
        self._stop_requested = False
        self._forget_translations()

    def _allocate_context(self) -> None:
        """The uc_context snapshots go through, made on first use (and its size learnt)."""
        if self._context is None:
            holder = ffi.new("uc_context **")
            _check(lib.uc_context_alloc(self.uc, holder), "allocate context")
            self._context = holder[0]
            self._context_size = lib.uc_context_size(self.uc)

    def _take_walk_fault(self) -> None:
        """The page walk refused an access: a page fault to deliver, exactly as QEMU's walk would
        have raised it (CR2, error code, EIP at the faulting instruction, that instruction counted
        once), or PAE, which this walk does not do: then QEMU walks from here on and the access
        is retried (uncounting the instruction the per-instruction hook counted when it began)."""
        state = self.state
        state.fault_pending = 0
        if state.pae_seen:
            _check(lib.replayvm_uc_use_page_walk(self.uc, state, 0), "switch to QEMU's page walk")
            self.page_walk = "qemu"
            # A 32-bit engine: fast blocks rely on this walk to place faults, so with QEMU's
            # every instruction is hooked again. A 64-bit one keeps counting per block: a fault
            # QEMU's walk raises inside a fast block is settled as any exception there is, and a
            # refused fetch of the next block by its CR2 (settle_fast_block_for in emu_build.py).
            if not self.long_mode_capable:
                state.always_precise = 1
            if not state.fault_fetch:               # a data access: the instruction had begun
                state.icount -= 1
            return
        address = ffi.new("uint64_t *")
        lib.replayvm_uc_fault_address(self.uc, state, address)
        linear = address[0] & (0xFFFFFFFFFFFFFFFF if self.long_mode_capable else 0xFFFFFFFF)
        if linear >> 12 != state.fault_page >> 12:     # cannot happen; refuse to guess
            raise UnicornError(f"page walk: fault at {linear:#x}, refused page {state.fault_page:#x}")
        self.set_reg("cr2", linear)
        self.exceptions_delivered += 1
        self._pending_fault = (x86_delivery.VECTOR_PAGE_FAULT, state.fault_error, self._pc())

    def _learn_speed(self, instructions: int, elapsed_ns: int) -> None:
        """Keep a smoothed instructions-per-ns figure, to end slices near a wall-clock timer."""
        if instructions >= 10_000 and elapsed_ns > 0:
            self._instructions_per_ns = 0.8 * self._instructions_per_ns + 0.2 * (instructions / elapsed_ns)

    def _in_sti_shadow(self) -> bool:
        """True when the instruction just executed was the STI that enabled interrupts."""
        st = self.state
        if st.window_shadow:            # a fast block's start: QEMU's own STI-shadow flag said so
            return True
        if not st.want_window or st.prev_if or st.prev_size != 1:
            return False
        try:
            return self.read_linear(st.prev_addr, 1)[0] == OPCODE_STI
        except x86_delivery.DeliveryFault:
            return False

    def _deliver(self, vector: int, *, software: bool, error_code: int | None, return_eip: int) -> bool:
        try:
            x86_delivery.deliver_with_escalation(self, vector, software=software,
                                                 error_code=error_code, return_eip=return_eip)
            return True
        except x86_delivery.TripleFault as fault:
            self.last_error = str(fault)
            return False

    # ----------------------------------------------------------------- hooks (called from C)
    def _on_intr(self, intno: int) -> None:
        lib.replayvm_uc_take_exception(self.uc, self.state, self._err, self._is_int)
        software = bool(self._is_int[0])
        error_code = None
        if not software and intno in x86_delivery.VECTORS_WITH_ERROR_CODE:
            error_code = self._err[0] & 0xFFFFFFFF
        self.exceptions_delivered += 1
        if not self._deliver(intno, software=software, error_code=error_code,
                             return_eip=self._pc()):
            self._shutdown_in_hook = True
            self._stop_now()

    def _on_io_refused(self) -> None:
        """Port I/O from user mode with CPL > IOPL (no I/O bitmap support; checked in C)."""
        self._fault_in_hook(x86_delivery.VECTOR_GENERAL_PROTECTION, 0)

    def _on_in(self, port: int, size: int) -> int:
        value = self.machine.pio.read(port, size)
        self._watch_for_interrupt()
        return value

    def _on_out(self, port: int, size: int, value: int) -> None:
        self.machine.pio.write(port, size, value)
        self._watch_for_interrupt()

    def _out_budget(self, port: int, size: int, count: int) -> int:
        """How many of `count` iterations of a `rep outs` (this one first) the port's device
        takes at once (see emu_build.py)."""
        return min(count, self.machine.pio.string_budget(port, size, write=True))

    def _in_budget(self, port: int, size: int, count: int) -> int:
        """As _out_budget, for a `rep ins`."""
        return min(count, self.machine.pio.string_budget(port, size, write=False))

    def _on_in_run(self, port: int, size: int, count: int) -> bytes:
        """The elements read by that many consecutive iterations, the first at this position."""
        data = self.machine.pio.read_run(port, size, count)
        self._watch_for_interrupt()
        return data

    def _on_out_run(self, port: int, size: int, data: bytes) -> None:
        """The elements of that many consecutive iterations, the first at this position."""
        self.machine.pio.write_run(port, size, data)
        self._watch_for_interrupt()

    def _watch_for_interrupt(self) -> None:
        """A device access may have raised an interrupt: take it at the next instruction with IF=1
        rather than at the end of the slice."""
        if not self.state.want_window and self.machine.interrupts.has_pending():
            self.state.want_window = 1
            self.state.prev_if = 0
            self.state.prev_size = 0

    def _fault_in_hook(self, vector: int, error_code: int) -> None:
        """An instruction must fault, but the hook cannot abort it: stop and deliver afterwards."""
        self._pending_fault = (vector, error_code, self._pc())
        self._stop_now()

    def _on_mmio_read(self, addr: int, size: int) -> int:
        value = self.machine.mmio.read(addr, size)
        self._watch_for_interrupt()
        return value

    def _on_mmio_write(self, addr: int, size: int, value: int) -> None:
        self.machine.mmio.write(addr, size, value)
        if hw.LAPIC_ADDR <= addr < hw.LAPIC_ADDR + hw.LAPIC_SIZE:
            self._refresh_lapic_id()
        self._watch_for_interrupt()

    def _refresh_lapic_id(self) -> None:
        """The ID register the C MMIO path serves: the running CPU's (it differs per CPU)."""
        lapic = getattr(self.machine, "cpu_lapic", None) or getattr(self.machine, "lapic", None)
        if lapic is not None:
            self.state.lapic_id_value = lapic.id_register_value

    def _on_invalid(self) -> bool:
        """An undefined opcode: stop here (returning False) and deliver #UD after the run."""
        self._pending_fault = (6, None, self._pc())   # #UD, no error code
        self._stop_now()
        return False

    def _on_syscall(self) -> None:
        """SYSCALL in 64-bit code (Intel SDM vol. 2B): RCX = the next RIP, R11 = RFLAGS, CS and
        SS from STAR at ring 0, RFLAGS masked by FMASK, RIP = LSTAR. #UD unless EFER.SCE is set
        and the CPU is in long mode. Unicorn adds the instruction's length to RIP after this
        hook, so RIP is written that much short. (SYSRET is QEMU's own.)"""
        if not self.long_mode_capable or not self.msr(MSR_EFER) & EFER_SCE \
                or not self.reg("efer") & x86_delivery.EFER_LMA:
            self._fault_in_hook(6, None)
            return
        rip, rflags = self.reg("rip"), self.reg("rflags")
        self.set_reg("rcx", rip + 2)
        self.set_reg("r11", rflags & ~EFLAGS_RF)
        selector = (self.msr(MSR_STAR) >> 32) & 0xFFFC
        self._load_segment("ss", (selector + 8) & 0xFFFC, 0, 0xFFFFFFFF, SYSCALL_SS_FLAGS)
        self._load_segment("cs", selector, 0, 0xFFFFFFFF, SYSCALL_CS_FLAGS)
        self.set_reg("rflags", rflags & ~self.msr(MSR_FMASK) & ~EFLAGS_RF)
        self.set_reg("rip", self.msr(MSR_LSTAR) - 2)

    def _on_rdtsc(self) -> int:
        tsc = self.machine.read_tsc()
        self.set_reg("eax", tsc & 0xFFFFFFFF)
        self.set_reg("edx", (tsc >> 32) & 0xFFFFFFFF)
        return 1

    def close(self) -> None:
        if self.uc is not None:
            lib.uc_close(self.uc)
            self.uc = None
            ffi.release(self._ram)          # its export of the RAM: the owner may unmap it now


def _segment_flags(seg: Segment) -> int:
    """QEMU's descriptor-cache flags word (the high dword of a descriptor) for a Segment."""
    return ((seg.type & 0xF) << 8 | (seg.s & 1) << 12 | (seg.dpl & 3) << 13 | (seg.present & 1) << 15
            | (seg.avl & 1) << 20 | (seg.l & 1) << 21 | (seg.db & 1) << 22 | (seg.g & 1) << 23)


def _engine(owner) -> EmuEngine:
    return ffi.from_handle(owner)


def _on_error(exc_type, exc_value, traceback) -> None:
    # A Python error inside a hook must not be swallowed: keep it, stop, re-raise after the run.
    engine = _current_error_target[0]
    if engine is not None and engine._python_error is None:
        engine._python_error = exc_value
        engine._stop_now()


_current_error_target: list[EmuEngine | None] = [None]


@ffi.def_extern(onerror=_on_error)
def replayvm_py_in(uc, port, size, owner):
    engine = _engine(owner)
    _current_error_target[0] = engine
    return engine._on_in(port, size)


@ffi.def_extern(onerror=_on_error)
def replayvm_py_out(uc, port, size, value, owner):
    engine = _engine(owner)
    _current_error_target[0] = engine
    engine._on_out(port, size, value)


@ffi.def_extern(onerror=_on_error)
def replayvm_py_mmio_read(addr, size, owner):
    engine = _engine(owner)
    _current_error_target[0] = engine
    return engine._on_mmio_read(addr, size)


@ffi.def_extern(onerror=_on_error)
def replayvm_py_mmio_write(addr, size, value, owner):
    engine = _engine(owner)
    _current_error_target[0] = engine
    engine._on_mmio_write(addr, size, value)


@ffi.def_extern(onerror=_on_error)
def replayvm_py_intr(uc, intno, owner):
    engine = _engine(owner)
    _current_error_target[0] = engine
    engine._on_intr(intno)


@ffi.def_extern(onerror=_on_error)
def replayvm_py_invalid(uc, owner):
    engine = _engine(owner)
    _current_error_target[0] = engine
    return engine._on_invalid()


@ffi.def_extern(onerror=_on_error)
def replayvm_py_io_refused(uc, owner):
    engine = _engine(owner)
    _current_error_target[0] = engine
    engine._on_io_refused()


@ffi.def_extern(onerror=_on_error)
def replayvm_py_out_budget(uc, port, size, count, owner):
    engine = _engine(owner)
    _current_error_target[0] = engine
    return engine._out_budget(port, size, count)


@ffi.def_extern(onerror=_on_error)
def replayvm_py_out_run(uc, port, size, data, count, owner):
    engine = _engine(owner)
    _current_error_target[0] = engine
    engine._on_out_run(port, size, ffi.unpack(ffi.cast("char *", data), count * size))


@ffi.def_extern(onerror=_on_error)
def replayvm_py_in_budget(uc, port, size, count, owner):
    engine = _engine(owner)
    _current_error_target[0] = engine
    return engine._in_budget(port, size, count)


@ffi.def_extern(onerror=_on_error)
def replayvm_py_in_run(uc, port, size, data, count, owner):
    engine = _engine(owner)
    _current_error_target[0] = engine
    values = engine._on_in_run(port, size, count)
    if len(values) != count * size:
        raise ValueError(f"a run of {count} reads of port {port:#x} came back {len(values)} bytes long")
    ffi.memmove(data, values, len(values))
    return 1


@ffi.def_extern(onerror=_on_error)
def replayvm_py_syscall(uc, owner):
    engine = _engine(owner)
    _current_error_target[0] = engine
    engine._on_syscall()


@ffi.def_extern(onerror=_on_error)
def replayvm_py_rdtsc(uc, owner):
    engine = _engine(owner)
    _current_error_target[0] = engine
    return engine._on_rdtsc()
