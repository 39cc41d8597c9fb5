"""The PC: guest RAM, the buses with their devices, one vCPU engine, and the loop that runs them.

Construction (`Machine.create`) wires the devices xv6 needs onto the PIO and MMIO buses and the
interrupt lines into the IOAPIC and PIC; boot setup lives in `replayvm.boot`; the CPU engines in
`replayvm.engines`. `run()` only alternates between the engine and the machine's own duties:
handing console input to the UART, sleeping while the guest halts, and checking stop conditions.
"""

from __future__ import annotations

import mmap
import time
from dataclasses import dataclass, field
from pathlib import Path

from replayvm import hw
from replayvm.boot import firmware
from replayvm.bus import Bus, PioBus
from replayvm.clock import GuestClock, VirtualClock
from replayvm.console import Console
from replayvm.devices.cga import CgaCrt
from replayvm.devices.cmos import Cmos
from replayvm.devices.debugport import DebugConsolePort, DebugExitPort, PostPort
from replayvm.devices.disk import Disk
from replayvm.devices.i8042 import I8042
from replayvm.devices.ide import IdeChannel
from replayvm.devices.imcr import Imcr
from replayvm.devices.ioapic import Ioapic
from replayvm.devices.irq import IrqLine
from replayvm.devices.lapic import LVT_TIMER as LAPIC_LVT_TIMER, ApicBus, Lapic, LapicWindow
from replayvm.devices.pic import Pic8259Pair
from replayvm.devices.pit import Pit8254
from replayvm.devices.poweroff import PowerOff
from replayvm.devices.state import restore_plain, save_plain
from replayvm.devices.uart import Uart16550
from replayvm.engines.base import CpuState, Engine, HardwareDebugEngine, StopReason
from replayvm.errors import GuestFault, UsageError

IRQ_NAMES = {hw.IRQ_KEYBOARD: "keyboard", hw.IRQ_COM1: "com1", hw.IRQ_IDE0: "ide0"}
PC_IRQ_NAMES = {hw.IRQ_TIMER: "timer", **IRQ_NAMES, hw.IRQ_IDE1: "ide1"}
MIN_RAM_MIB, MAX_RAM_MIB = hw.MIN_RAM_MIB, hw.MAX_RAM_MIB
HALT_POLL_NS = 50_000_000                 # how long a halted guest with no timer may sleep at once
RUN_SLICE_NS = 20_000_000                 # how often the loop looks at console input and limits
SHUTDOWN_PREFIX = "guest shut down: "


def guest_ram(size: int) -> mmap.mmap:
    """Private anonymous memory, in transparent huge pages where the host offers them (as QEMU
    does). Python's default anonymous mmap is shared memory, which the kernel zero-fills one
    4 KiB page per fault: xv6 touches 220 MiB while booting, and on this project's hosts (PVM)
    those 56k faults took 38% of the boot."""
    ram = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            ram.madvise(mmap.MADV_HUGEPAGE)
        except OSError:                     # a kernel without THP: 4 KiB pages, as before
            pass
    return ram


def engine_stop_end(reason: StopReason, engine: Engine) -> tuple[str, str]:
    """How a session ends when the engine cannot go on: the footer's (`end`, `detail`). Replay
    expects the same pair from the same stop at the same position (replay.replayer)."""
    why = engine.last_error
    if reason is StopReason.SHUTDOWN:
        return "fault", SHUTDOWN_PREFIX + (why or "triple fault")
    return "unsupported", why or "the engine cannot continue with this guest"


def is_engine_stop_end(end: object, detail: object) -> bool:
    """Did a recording end with an engine stop (rather than, say, a halt with nothing to wake)?"""
    return end == "unsupported" or (end == "fault" and str(detail or "").startswith(SHUTDOWN_PREFIX))


@dataclass
class MachineConfig:
    """What the user asked for: disks in IDE order, or a multiboot kernel, RAM and engine."""

    disks: list[Path] = field(default_factory=list)
    kernel: Path | None = None
    ram_mib: int = hw.DEFAULT_RAM_MIB
    engine: str = "emu"
    virtual_clock: bool = False
    chaos_seed: int | None = None             # seeded CPU stalls and device latencies (chaos.py)
    ram_bytes: int | None = None              # replay: the recorded size exactly (else ram_mib MiB)
    cpus: int = 1                             # CPUs in the MP table, each with its own LAPIC
    machine: str = "mp"                       # hw.MACHINE_KINDS: "pc" adds the BIOS, the 8254, no MP table
    x86_64: bool = False                      # a 64-bit guest (replay: the trace's "x86-64" feature)


@dataclass
class RunOutcome:
    """How a run ended: 'script-done', 'until', 'quit', 'timeout', 'shutdown', 'poweroff',
    'unsupported'. A power-off is the guest's own clean end, with its exit status."""

    reason: str
    guest_ns: int
    instructions: int | None
    detail: str = ""
    exit_status: int = 0


class Machine:
    """One PC with one or several vCPUs (`cpus`; the engine runs them in turns). See the module
    docstring.

    Recording and replay build the same Machine. What differs is where its inputs come from:
    while recording from the world (the console, the clock, disk images, the LAPIC's own timer),
    while replaying from the trace (`use_trace_inputs`: replay.replayer gives the engine its
    interrupts, timer deadlines and TSC, and stands in front of the buses to check every device
    access against the recording). `disks` and `boot_state` build a machine for a recorded
    session: disks fed from the trace, and the CPU state the trace starts from (which the
    caller gives the engine once RAM is loaded)."""

    def __init__(self, config: MachineConfig, console: Console, disks: list[Disk] | None = None,
                 boot_state: CpuState | None = None) -> None:
        if config.ram_bytes is None and not MIN_RAM_MIB <= config.ram_mib <= MAX_RAM_MIB:
            raise UsageError(f"--mem must be between {MIN_RAM_MIB} and {MAX_RAM_MIB} MiB")
        if not 1 <= config.cpus <= hw.MAX_CPUS:
            raise UsageError(f"--cpus must be between 1 and {hw.MAX_CPUS}")
        if config.machine not in hw.MACHINE_KINDS:
            raise UsageError(f"--machine must be one of {', '.join(hw.MACHINE_KINDS)}")
        if config.machine == "pc" and config.cpus > 1:
            raise UsageError("--machine pc has one CPU (no MP table tells a guest of others): drop --cpus")
        self.config = config
        self.cpus = config.cpus
        self.console = console
        self.clock: GuestClock = VirtualClock() if config.virtual_clock else GuestClock()
        self._ram_map = guest_ram(config.ram_bytes if config.ram_bytes is not None else config.ram_mib << 20)
        self.ram = memoryview(self._ram_map)
        self.pio = PioBus()
        self.mmio = Bus("mmio")
        self.shutdown_reason: str | None = None
        self.power_off: tuple[str, int] | None = None      # (why, exit status): the guest switched off
        self._started = False
        self.input_observers: list = []           # f(source, data) for every byte typed
        self.halt_observers: list = []            # f() whenever the guest halts (all its CPUs)
        # Several CPUs: who says when the engine switches CPUs (schedule.QuantumScheduler while
        # recording, the replayer from the trace's SWITCH records while replaying).
        self.scheduler = None
        if disks is None:
            if len(config.disks) > 2:
                raise UsageError("at most two disks (the primary IDE channel's master and slave)")
            for path in config.disks:
                _check_disk_image(path)
            if config.kernel is None and config.disks:     # before reading (and hashing) whole images
                firmware.check_boot_sector(_first_sector(config.disks[0]))
            disks = [Disk(path, name=f"disk{index}") for index, path in enumerate(config.disks)]
        self.disks = disks
        self.chaos_times = None
        if config.chaos_seed is not None:
            from replayvm.chaos import ChaosTimes

            self.chaos_times = ChaosTimes.for_clock(config.virtual_clock)
        self._wire_devices()
        if self.cpus > 1:                         # the world's side of the schedule (replay: the trace's)
            self.scheduler = self._new_scheduler(0)
        self.chaos = None
        if self.chaos_times is not None:
            from replayvm.chaos import LapicTimerSource, PitTimerSource, TimerChaos

            timers = [LapicTimerSource(self.lapic)]
            if self.pit is not None:
                timers.append(PitTimerSource(self.pit, self.pic.master))
            self.chaos = TimerChaos(timers, self.clock, config.chaos_seed, self.chaos_times.stall_gap_ns)
        # A 64-bit guest: the emu engine opens a vCPU that can enter long mode (engines/emu.py).
        self.x86_64 = config.x86_64 or (config.kernel is not None and firmware.kernel_is_64bit(config.kernel))
        self.engine = _create_engine(config.engine, self)
        if boot_state is None:
            self.boot_state = self._boot()
            self.engine.set_state(self.boot_state)
        else:                         # the caller loads it once RAM holds what it refers to (the GDT)
            self.boot_state = boot_state

    # ---------------------------------------------------------------- construction
    def _wire_devices(self) -> None:
        self.pic = Pic8259Pair()
        self.lapic = Lapic(self.clock, self.pic, apic_id=hw.BSP_APIC_ID)
        # The APs' local APICs (APIC IDs 1..cpus-1); the 8259's virtual wire goes to the BSP only.
        self.lapics = [self.lapic] + [Lapic(self.clock, None, apic_id=cpu) for cpu in range(1, self.cpus)]
        self.cpu_lapic = self.lapic               # the LAPIC of the CPU running now
        self.running_cpu = 0                      # the CPU the engine runs now (select_cpu)
        self.ioapic = Ioapic(self.lapic, ioapic_id=hw.IOAPIC_ID, others=self.lapics[1:])
        self.interrupts = self.lapic
        self.lapic_window = None
        if self.cpus > 1:
            self.lapic_window = LapicWindow(self.lapics)
            ApicBus(self.lapics, self._on_init_ipi, self._on_startup_ipi, self._on_wake_ipi)
        lines = {pin: IrqLine(pin, [self.ioapic, self.pic]) for pin in range(16)}
        self.irq_lines = lines

        ide_latency = uart_latency = now_ns = None
        seed = self.config.chaos_seed
        if seed is not None and self.chaos_times is not None:   # chaos: seeded completion latencies
            from replayvm.chaos import DeviceLatency

            ide_latency = DeviceLatency(seed, "ide0", self.chaos_times.ide_latency_ns)
            uart_latency = DeviceLatency(seed, "com1", self.chaos_times.uart_latency_ns)
            now_ns = self.clock.now_ns
        self.uart = Uart16550(lines[hw.IRQ_COM1], self.console.write, uart_latency, now_ns)
        self.i8042 = I8042(lines[hw.IRQ_KEYBOARD], self._on_reset)
        master = self.disks[0] if self.disks else None
        slave = self.disks[1] if len(self.disks) > 1 else None
        self.ide = IdeChannel(lines[hw.IRQ_IDE0], master, slave, ide_latency, now_ns)
        self.cmos = Cmos(self.clock, len(self.ram))
        self.cga = CgaCrt()
        self.imcr = Imcr()

        pio = self.pio
        pio.register(hw.PIC_MASTER_PORT, 2, self.pic.master, "pic.master")
        pio.register(hw.PIC_SLAVE_PORT, 2, self.pic.slave, "pic.slave")
        pio.register(hw.IMCR_PORT, 2, self.imcr, "imcr")
        pio.register(hw.I8042_DATA_PORT, 5, self.i8042, "i8042")
        pio.register(hw.CMOS_PORT, 2, self.cmos, "cmos")
        pio.register(hw.POST_PORT, 1, PostPort(), "post")
        pio.register(hw.IDE0_CMD_PORT, 8, self.ide.command_block, "ide0")
        pio.register(hw.IDE0_CTRL_PORT, 1, self.ide.control_block, "ide0.control")
        pio.register(hw.COM1_PORT, hw.COM1_PORTS, self.uart, "com1")
        pio.register(hw.CGA_CRT_PORT, 2, self.cga, "cga.crt")
        pio.register(hw.DEBUG_EXIT_PORT, 2, DebugExitPort(self._on_debug_exit), "debug.exit")
        self.debug_console = DebugConsolePort(self.console.write)
        pio.register(hw.DEBUG_CON_PORT, 1, self.debug_console, "debug.console")
        self.mmio.register(hw.IOAPIC_ADDR, hw.IOAPIC_SIZE, self.ioapic, "ioapic")
        self.mmio.register(hw.LAPIC_ADDR, hw.LAPIC_SIZE, self.lapic_window or self.lapic, "lapic")
        # The devices whose state a checkpoint or a branch trace keeps, by name.
        self.devices = {"pic": self.pic, "lapic": self.lapic, "ioapic": self.ioapic, "uart": self.uart,
                        "i8042": self.i8042, "ide": self.ide, "cmos": self.cmos, "cga": self.cga,
                        "imcr": self.imcr}
        for cpu in range(1, self.cpus):
            self.devices[f"lapic{cpu}"] = self.lapics[cpu]

        self.pit: Pit8254 | None = None
        self.bios = None
        if self.config.machine == "pc":
            self._wire_plain_pc()

    def _wire_plain_pc(self) -> None:
        """The plain PC's extra devices: the BIOS's call port, the 8254 and port 0x61, the
        secondary IDE channel (no drives), the power-off ports."""
        from replayvm.boot.bios import BiosServices

        pio, lines = self.pio, self.irq_lines
        self.pit = Pit8254(self.clock, lines[hw.IRQ_TIMER])
        pio.register(hw.PIT_PORT, hw.PIT_PORTS, self.pit, "pit")
        self.i8042.port_b = self.pit.port_b           # 0x61 lies inside the 8042's range
        self.ide1 = IdeChannel(lines[hw.IRQ_IDE1], None, None)
        pio.register(hw.IDE1_CMD_PORT, 8, self.ide1.command_block, "ide1")
        pio.register(hw.IDE1_CTRL_PORT, 1, self.ide1.control_block, "ide1.control")
        self.poweroff = PowerOff(self._on_power_off)
        pio.register(hw.POWER_OFF_PORT, 1, self.poweroff.acpi, "poweroff.acpi")
        pio.register(hw.BOCHS_SHUTDOWN_PORT, 1, self.poweroff.bochs, "poweroff.bochs")
        pio.register(hw.ISA_DEBUG_EXIT_PORT, 1, self.poweroff.debug_exit, "poweroff.debug_exit")
        self.bios = BiosServices(self.ram, lambda: self.engine, self.disks,
                                 lambda byte: self.uart.on_output(byte), self._on_boot_failure)
        pio.register(hw.BIOS_CALL_PORT, 1, self.bios, "bios")
        self.devices.update(pit=self.pit, ide1=self.ide1, poweroff=self.poweroff)
        self.pic.trace_timers[hw.IRQ_TIMER] = self.pit.fire_recorded

    # ---------------------------------------------------------------- several CPUs
    def select_cpu(self, cpu: int) -> None:
        """The engine switched to `cpu`: the LAPIC window, the interrupt source (unless the trace
        gives the interrupts) and the LAPIC the trace's interrupts are taken from are its own."""
        lapic = self.lapics[cpu]
        self.running_cpu = cpu
        if self.interrupts is self.cpu_lapic:
            self.interrupts = lapic
        self.cpu_lapic = lapic
        if self.lapic_window is not None:
            self.lapic_window.select(cpu)

    def _new_scheduler(self, start_position: int):
        """The recording's turns (schedule.py): in instructions on emu, in exits on kvm."""
        from replayvm.schedule import DEFAULT_QUANTUM, KVM_QUANTUM, QuantumScheduler

        quantum = KVM_QUANTUM if self.config.engine == "kvm" else DEFAULT_QUANTUM
        return QuantumScheduler(self.cpus, quantum=quantum, chaos_seed=self.config.chaos_seed,
                                start_position=start_position)

    def _on_init_ipi(self, cpu: int) -> None:
        self.engine.cpu_init(cpu)            # type: ignore[attr-defined]  (both engines have it)

    def _on_startup_ipi(self, cpu: int, vector: int) -> None:
        self.engine.cpu_startup(cpu, vector)  # type: ignore[attr-defined]

    def _on_wake_ipi(self, cpu: int) -> None:
        """An IPI reached another CPU: under chaos the running CPU's turn is drawn again from here
        (else a CPU alone for a while is nearly always in a long turn when another wakes)."""
        woken = getattr(self.scheduler, "woken", None)
        if woken is not None:
            self.engine.end_turn_by(woken(self.engine.position))  # type: ignore[attr-defined]

    # ---------------------------------------------------------------- device state
    def save_devices(self) -> dict[str, dict]:
        """Every device's state() (each holds its interrupt line's level) and what the guest
        wrote to the disks: where a replay can go on from (plain values: checkpoint files and
        branch trace headers carry it)."""
        states: dict[str, dict] = {name: save_plain(device) for name, device in self.devices.items()}
        states["disks"] = {"written": [sorted([lba, data] for lba, data in disk.overlay().items())
                                       for disk in self.disks]}
        return states

    def restore_devices(self, states: dict[str, dict]) -> None:
        """The inverse of save_devices (states from a file are untrusted: a bad one raises)."""
        for name, device in self.devices.items():
            restore_plain(device, states[name])
        written = states["disks"]["written"]
        if len(written) != len(self.disks):
            raise ValueError(f"written sectors for {len(written)} disks, the machine has {len(self.disks)}")
        for disk, sectors in zip(self.disks, written):
            overlay = {int(lba): bytes(data) for lba, data in sectors}
            if any(not 0 <= lba < disk.sector_count or len(data) != 512 for lba, data in overlay.items()):
                raise ValueError(f"a written sector of {disk.name} is out of range or not 512 bytes")
            disk.restore_overlay(overlay)

    # ---------------------------------------------------------------- the input side
    def use_trace_inputs(self, inputs) -> None:
        """Replay: interrupts, timer deadlines and the TSC come from `inputs` (the trace), and the
        LAPIC timer fires when the trace says it did, not by the clock."""
        self.interrupts = inputs
        self.poll = inputs.poll                  # type: ignore[method-assign]
        self.read_tsc = inputs.read_tsc          # type: ignore[method-assign]
        if self.cpus > 1:
            self.scheduler = inputs
        for lapic in self.lapics:
            lapic.timer_follows_trace = True
        if self.pit is not None:
            self.pit.follows_trace = True
        self._engine_places_interrupts(False)

    def use_world_inputs(self) -> None:
        """Going live: the machine's own interrupt controllers, timers and clock take over."""
        for name in ("interrupts", "poll", "read_tsc"):
            self.__dict__.pop(name, None)
        self.interrupts = self.cpu_lapic
        for lapic in self.lapics:
            lapic.timer_follows_trace = False
        if self.pit is not None:
            self.pit.follows_trace = False
        if self.cpus > 1:                         # turns from here on, as a recording's
            self.scheduler = self._new_scheduler(self.engine.position)
        self._engine_places_interrupts(True)

    def _engine_places_interrupts(self, on: bool) -> None:
        """kvm chooses where interrupts land between exits while recording; in a replay the
        trace says where (see engines/kvm.py)."""
        if isinstance(self.engine, HardwareDebugEngine):
            self.engine.place_interrupts(on)

    def set_console(self, console: Console) -> None:
        """Another console takes over (going live): the guest's output goes there from now on."""
        self.console = console
        self.uart.on_output = console.write
        self.debug_console.on_output = console.write

    def set_clock(self, clock: GuestClock) -> None:
        """Give the machine another clock (going live from a replay): every device that keeps
        time and the engine now ask it."""
        self.clock = clock
        for lapic in self.lapics:
            lapic.clock = clock
        self.cmos.clock = clock
        if self.pit is not None:
            self.pit.clock = clock
        self.engine.use_clock(clock)
        self._started = True                     # the new clock already runs where the old one was

    def _boot(self) -> CpuState:
        if self.config.kernel is not None:
            if self.config.machine == "pc":
                raise UsageError("--machine pc boots from a disk through its BIOS: give --disk, not --kernel")
            return firmware.boot_multiboot(self.ram, self.config.kernel, self.cpus)
        if not self.disks:
            raise UsageError("nothing to boot: give --disk IMAGE or --kernel ELF")
        if self.config.machine == "pc":
            from replayvm.boot import bios

            state = firmware.boot_from_disk(self.ram, self.disks[0].read_sector(0), mp_tables=False)
            bios.install(self.ram)
            return state
        return firmware.boot_from_disk(self.ram, self.disks[0].read_sector(0), self.cpus)

    def _on_reset(self) -> None:
        self.shutdown_reason = "the guest reset the machine through the keyboard controller"
        self.engine.request_stop()

    def _on_debug_exit(self, why: str) -> None:
        self.shutdown_reason = f"the guest asked to shut down ({why})"
        self.engine.request_stop()

    def _on_power_off(self, why: str, status: int) -> None:
        if self.power_off is None:
            self.power_off = (why, status)
        self.engine.request_stop()

    def _on_boot_failure(self, why: str) -> None:
        self.shutdown_reason = why
        self.engine.request_stop()

    # ---------------------------------------------------------------- engine services
    def poll(self, stall: bool = True) -> int | None:
        """Advance timers to now; return guest ns until the next timed event (None: no timer).
        Under chaos, the CPU may be stalled here unless `stall` is False (it is halted)."""
        stall_in = None
        if self.chaos is not None and stall:     # a stall may move the clock to the next tick
            stall_in = self.chaos.poll(self.clock.now_ns())
        now = self.clock.now_ns()
        until = None
        for lapic in self.lapics:
            lapic.poll(now)
            deadline = lapic.next_deadline_ns()
            if deadline is not None and (until is None or deadline - now < until):
                until = max(0, deadline - now)
        if self.pit is not None:
            self.pit.poll(now)
            deadline = self.pit.next_deadline_ns()
            if deadline is not None and (until is None or deadline - now < until):
                until = max(0, deadline - now)
        if self.chaos is not None:
            if stall_in is not None and (until is None or stall_in < until):
                until = stall_in
            for device in (self.ide, self.uart):     # completion latencies
                device.poll(now)
                due = device.next_deadline_ns()
                if due is not None and (until is None or due - now < until):
                    until = max(0, due - now)
        return until

    def interrupt_source(self, vector: int) -> str:
        """Which device an interrupt vector belongs to, from how the guest programmed the chips."""
        if self.config.machine == "pc":
            irq = self.pic.irq_of_vector(vector)
            if irq is not None:
                return PC_IRQ_NAMES.get(irq, f"irq{irq}")
        if vector == self.cpu_lapic.lvt[LAPIC_LVT_TIMER] & 0xFF:
            return "timer"
        for pin, entry in enumerate(self.ioapic.low):
            if entry & 0xFF == vector:
                return IRQ_NAMES.get(pin, f"irq{pin}")
        return f"vector{vector}"

    def read_tsc(self) -> int:
        """The guest's time-stamp counter: guest nanoseconds at a 1 GHz TSC."""
        return self.clock.now_ns()

    # ---------------------------------------------------------------- the loop
    def run(self, timeout_s: float | None = None) -> RunOutcome:
        """Run until the console says the session is over, the guest dies, or the timeout."""
        timeout_ns = None if timeout_s is None else int(timeout_s * 1e9)
        engine = self.engine
        if not self._started:
            self._started = True
            self.clock.start()
        try:
            while True:
                data = self.console.take_input()
                if data:
                    for observer in self.input_observers:
                        observer("com1", data)
                    self.uart.feed_input(data)
                self.console.flush()
                if self.console.finished:
                    return self._outcome(self._finish_reason())
                if self.shutdown_reason is not None:
                    return self._outcome("shutdown", self.shutdown_reason)
                if self.power_off is not None:
                    return RunOutcome("poweroff", self.clock.now_ns(), self.engine.icount,
                                      self.power_off[0], exit_status=self.power_off[1])
                if timeout_ns is not None and self.running_ns() >= timeout_ns:
                    return self._outcome("timeout", f"no end after {timeout_s:g} s of guest time")
                reason = engine.run(RUN_SLICE_NS)
                if reason is StopReason.HALT:
                    for observer in self.halt_observers:
                        observer()
                    self._wait_while_halted(timeout_ns)
                elif reason is StopReason.SHUTDOWN:
                    raise GuestFault(self._fault_report(engine_stop_end(reason, engine)[1]))
                elif reason is StopReason.UNSUPPORTED:
                    return self._outcome(*engine_stop_end(reason, engine))
        finally:
            self.console.flush()

    def running_ns(self) -> int:
        """Guest time the session has run, less the time chaos stalled it (what --timeout counts:
        a chaos run is given as long to do its work as a plain one)."""
        stalled = self.chaos.stalled_ns if self.chaos is not None else 0
        return self.clock.now_ns() - stalled

    def _finish_reason(self) -> str:
        if self.console.quit_requested:
            return "quit"
        if self.console.until_matched:
            return "until"
        return "script-done"

    def _wait_while_halted(self, timeout_ns: int | None) -> None:
        """The guest executed HLT: nothing happens until a timer fires or input arrives.

        Chaos does not stall an idle CPU (it would only make idle time fly), and the time spent
        halted does not count towards its next stall: stalls come every so much guest *work*."""
        until = self.poll(stall=False)
        now = self.clock.now_ns()
        if self.interrupts.has_pending() if self.cpus == 1 else self.engine.any_cpu_runnable():  # type: ignore[attr-defined]
            return
        deadline = None if until is None else now + until
        if isinstance(self.clock, VirtualClock):
            if deadline is None:
                raise GuestFault(self._fault_report("guest halted with no timer and no input to wake it"))
            self.clock.advance(max(0, deadline - now))
        else:
            wait_ns = HALT_POLL_NS if deadline is None else min(HALT_POLL_NS, max(0, deadline - now))
            if timeout_ns is not None:
                wait_ns = min(wait_ns, max(0, timeout_ns - self.running_ns()))
            if wait_ns > 0:
                self.console.input_ready.wait(wait_ns / 1e9)
        if self.chaos is not None:
            self.chaos.idle(self.clock.now_ns() - now)

    def _outcome(self, reason: str, detail: str = "") -> RunOutcome:
        return RunOutcome(reason, self.clock.now_ns(), self.engine.icount, detail)

    def _fault_report(self, what: str) -> str:
        """`what` (the footer's detail: the first line), then the CPU state."""
        try:
            state = self.engine.get_state().describe()
        except Exception as error:               # the report must not hide the fault
            state = f"(CPU state unavailable: {error})"
        return f"{what}\n{state}"

    def close(self) -> None:
        self.engine.close()
        self.console.close()

    def release_ram(self) -> None:
        """Give the guest's RAM back now, not when a garbage collection finds the machine's
        reference cycles (one replay after another would otherwise hold 256 MiB each)."""
        try:
            self.ram.release()
            self._ram_map.close()
        except (BufferError, ValueError):         # still exported (an engine kept a view): leave it to GC
            pass


def _check_disk_image(path: Path) -> None:
    if not path.is_file():
        raise UsageError(f"disk image not found: {path}")
    if path.stat().st_size < firmware.SECTOR_SIZE:
        raise UsageError(f"disk image {path} is smaller than one 512-byte sector")


def _first_sector(path: Path) -> bytes:
    """The boot sector alone: a disk that cannot boot is refused without reading the rest."""
    try:
        with path.open("rb") as image:
            return image.read(firmware.SECTOR_SIZE)
    except OSError as error:
        raise UsageError(f"cannot read disk image {path}: {error.strerror or error}") from None


def _create_engine(name: str, machine: Machine) -> Engine:
    from replayvm.engines.registry import engine_class

    return engine_class(name)(machine)


def wall_seconds(start: float) -> float:
    return time.monotonic() - start
