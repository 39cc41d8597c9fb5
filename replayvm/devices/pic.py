"""The legacy 8259A programmable interrupt controllers: a master and a cascaded slave.

Why model them at all when xv6 masks both and never looks back? Because the PC has them: the
LAPIC passes their INTR output through while it is software-disabled (the reset state) or while
LINT0 is set to ExtINT, and other guests (and xv6's own boot path before `picinit`) may program
them. The model is the chip as a driver sees it, in fixed-priority mode:

- Each chip has an 8-bit IRR (requests seen), ISR (requests being serviced) and IMR (mask).
- IRQ0 has the highest priority, IRQ7 the lowest. A request is delivered when it is unmasked and
  no request of equal or higher priority is in service.
- Inputs are edge-triggered (a rising edge latches IRR; the request stays latched after the line
  falls, which `IrqLine.pulse()` relies on) unless ICW1 selected level mode (LTIM).
- The slave's INT output drives the master's IRQ2. That one input is modelled level-sensitive
  (master IRR2 simply mirrors the slave's output) so that no slave request can be lost because
  the cascade line never dropped between two slave interrupts.

Not modelled (documented so nobody has to guess): priority rotation (the rotate-on-EOI commands
act as the plain EOIs, "set priority" is ignored), special fully nested mode, buffered mode, and
8080-style call addresses. None of them changes what an x86 guest running one CPU observes.

The pair is one object so the CPU side has a single INTR/INTA interface (`has_pending`,
`acknowledge`); its two chips are the devices registered on the port bus:

    pio.register(hw.PIC_MASTER_PORT, 2, pic.master, pic.master.name)
    pio.register(hw.PIC_SLAVE_PORT, 2, pic.slave, pic.slave.name)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from replayvm import hw
from replayvm.devices.state import U8, Choice

# Register offsets inside one chip.
COMMAND = 0            # ICW1, OCW2, OCW3 on write; IRR/ISR (or a poll result) on read
DATA = 1               # ICW2-ICW4 during initialisation, OCW1 (the IMR) otherwise

# ICW1 bits (a write to COMMAND with bit 4 set starts initialisation).
ICW1_INIT = 0x10
ICW1_IC4 = 0x01        # ICW4 follows
ICW1_SINGLE = 0x02     # no cascade, so no ICW3
ICW1_LTIM = 0x08       # level-triggered inputs
ICW4_AEOI = 0x02       # automatic end of interrupt

# OCW2 / OCW3 (a write to COMMAND with bit 4 clear; bit 3 tells them apart).
OCW3_SELECT = 0x08
OCW2_EOI = 0x20
OCW2_SPECIFIC = 0x40
OCW3_POLL = 0x04
OCW3_READ_REGISTER = 0x02   # with bit 0 choosing ISR (1) or IRR (0)
OCW3_READ_ISR = 0x01
OCW3_SET_SMM = 0x40         # with bit 5: set (1) or reset (0) special mask mode
OCW3_SMM_VALUE = 0x20

MASTER_VECTOR_BASE = 0x08   # what a PC BIOS leaves programmed (real-mode IRQ0-7 -> INT 08h-0Fh)
SLAVE_VECTOR_BASE = 0x70    # IRQ8-15 -> INT 70h-77h
SPURIOUS_IRQ = 7            # an INTA with nothing left to deliver returns the IRQ7 vector

# Register names by offset inside one chip, as the `devices` table of analyze shows them
# (`pic.master.command`).
REGISTERS = {COMMAND: "command", DATA: "data"}


@dataclass(frozen=True)
class PicState:
    """One chip: IRR, ISR, IMR and the input levels, what initialisation programmed (vector
    base, ICW3, trigger mode, single, AEOI), the OCW3 modes, and how far an initialisation
    sequence has got (which ICW the data port expects next; 0: none)."""
    irr: U8
    isr: U8
    imr: U8
    lines: U8
    vector_base: U8
    icw3: U8
    level_mode: bool
    single: bool
    auto_eoi: bool
    special_mask: bool
    read_isr: bool
    poll_pending: bool
    init_step: Choice(0, 2, 3, 4)
    expect_icw4: bool


@dataclass(frozen=True)
class PicPairState:
    """The master and the slave (the cascade line follows from the slave's state)."""
    master: PicState
    slave: PicState


def _lowest_bit(bits: int) -> int:
    """Index of the lowest set bit: with fixed priority, the most urgent IRQ in `bits`."""
    return (bits & -bits).bit_length() - 1


class Pic8259:
    """One 8259A chip, a Device at two ports (offset 0 = command, 1 = data)."""

    state_type = PicState

    def __init__(self, name: str, vector_base: int,
                 on_output_change: Callable[[], None] | None = None) -> None:
        self.name = name
        self._reset_vector_base = vector_base
        # Called after anything that may change the INT output: how the slave drives master IRQ2.
        self._on_output_change = on_output_change
        # Inputs whose IRR bit follows the line level, whatever ICW1 says (the master's cascade pin).
        self.level_pins_always = 0
        self.reset()

    def reset(self) -> None:
        """Power-on state as the BIOS leaves it: vector base programmed, every input masked."""
        self.irr = 0
        self.isr = 0
        self.imr = 0xFF
        self.lines = 0                 # current input levels, for edge detection
        self.vector_base = self._reset_vector_base
        self.icw3 = 0
        self.level_mode = False
        self.single = False
        self.auto_eoi = False
        self.special_mask = False
        self.read_isr = False          # OCW3: COMMAND reads ISR (True) or IRR (False)
        self.poll_pending = False      # OCW3 poll: the next read returns the poll byte
        self._init_step = 0            # 0: not initialising; 2, 3, 4: which ICW the DATA port expects
        self._expect_icw4 = False

    # --- the device registers ------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size != 1 or offset not in (COMMAND, DATA):
            return 0
        if self.poll_pending:
            # Poll mode: the read itself acknowledges, returning 0x80 | level if a request is up.
            self.poll_pending = False
            irq = self.take()
            return 0 if irq is None else 0x80 | irq
        if offset == DATA:
            return self.imr
        return self.isr if self.read_isr else self.irr

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1 or offset not in (COMMAND, DATA):
            return
        value &= 0xFF
        if offset == COMMAND:
            if value & ICW1_INIT:
                self._icw1(value)
            elif value & OCW3_SELECT:
                self._ocw3(value)
            else:
                self._ocw2(value)
        elif self._init_step:
            self._icw(value)
        else:
            self.imr = value           # OCW1
        self._output_may_have_changed()

    def _icw1(self, value: int) -> None:
        """Start initialisation. Per the datasheet this also clears the IMR and the edge latches."""
        self.isr = 0
        self.imr = 0
        self.level_mode = bool(value & ICW1_LTIM)
        self.single = bool(value & ICW1_SINGLE)
        self._expect_icw4 = bool(value & ICW1_IC4)
        self.auto_eoi = False          # ICW4 functions are zero unless ICW4 follows
        self.special_mask = False
        self.read_isr = False
        self.poll_pending = False
        self._init_step = 2
        self.irr = self.lines & self._level_pins()     # edge inputs must rise again to request

    def _icw(self, value: int) -> None:
        if self._init_step == 2:
            self.vector_base = value & 0xF8
            next_step = 3 if not self.single else 4
        elif self._init_step == 3:
            self.icw3 = value
            next_step = 4
        else:
            self.auto_eoi = bool(value & ICW4_AEOI)
            next_step = 0
        if next_step == 4 and not self._expect_icw4:
            next_step = 0
        self._init_step = next_step

    def _ocw2(self, value: int) -> None:
        """End of interrupt. Rotation is not modelled: rotating EOIs act as the plain ones."""
        if not value & OCW2_EOI:
            return                     # rotate-in-AEOI set/clear, set priority: ignored
        if value & OCW2_SPECIFIC:
            self.isr &= ~(1 << (value & 7))
        elif self.isr:
            self.isr &= self.isr - 1   # clear the highest-priority (lowest-numbered) bit in service

    def _ocw3(self, value: int) -> None:
        if value & OCW3_SET_SMM:
            self.special_mask = bool(value & OCW3_SMM_VALUE)
        if value & OCW3_POLL:
            self.poll_pending = True
        if value & OCW3_READ_REGISTER:
            self.read_isr = bool(value & OCW3_READ_ISR)

    # --- the interrupt side ----------------------------------------------------------------
    def _level_pins(self) -> int:
        return 0xFF if self.level_mode else self.level_pins_always

    def set_irq(self, pin: int, level: bool) -> None:
        """An input line changed. Edge inputs latch on a rising edge; level inputs follow the line."""
        if not 0 <= pin < 8:
            return
        bit = 1 << pin
        was_high = self.lines & bit
        if level:
            self.lines |= bit
            if bit & self._level_pins() or not was_high:
                self.irr |= bit
        else:
            self.lines &= ~bit
            if bit & self._level_pins():
                self.irr &= ~bit
        self._output_may_have_changed()

    def deliverable(self) -> int | None:
        """The IRQ this chip would signal on INT right now, or None."""
        requests = self.irr & ~self.imr
        if not requests:
            return None
        irq = _lowest_bit(requests)
        in_service = self.isr & ~self.imr if self.special_mask else self.isr
        if in_service and _lowest_bit(in_service) <= irq:
            return None                # something at least as urgent is being serviced
        return irq

    def output(self) -> bool:
        """The INT output pin."""
        return self.deliverable() is not None

    def take(self) -> int | None:
        """INTA as seen by this chip: move the deliverable request to ISR and return its IRQ."""
        irq = self.deliverable()
        if irq is None:
            return None
        bit = 1 << irq
        if not bit & self._level_pins():
            self.irr &= ~bit           # a level input keeps requesting for as long as it is high
        if not self.auto_eoi:
            self.isr |= bit
        self._output_may_have_changed()
        return irq

    def _output_may_have_changed(self) -> None:
        if self._on_output_change is not None:
            self._on_output_change()

    # --- snapshots -------------------------------------------------------------------------
    def state(self) -> PicState:
        return PicState(irr=self.irr, isr=self.isr, imr=self.imr, lines=self.lines,
                        vector_base=self.vector_base, icw3=self.icw3, level_mode=self.level_mode,
                        single=self.single, auto_eoi=self.auto_eoi, special_mask=self.special_mask,
                        read_isr=self.read_isr, poll_pending=self.poll_pending,
                        init_step=self._init_step, expect_icw4=self._expect_icw4)

    def restore(self, state: PicState) -> None:
        self.irr, self.isr, self.imr, self.lines = state.irr, state.isr, state.imr, state.lines
        self.vector_base, self.icw3 = state.vector_base, state.icw3
        self.level_mode, self.single, self.auto_eoi = state.level_mode, state.single, state.auto_eoi
        self.special_mask, self.read_isr = state.special_mask, state.read_isr
        self.poll_pending = state.poll_pending
        self._init_step = state.init_step
        self._expect_icw4 = state.expect_icw4


class Pic8259Pair:
    """The PC's two 8259As: an IrqSink for ISA IRQs 0-15 and the INTR/INTA pair the CPU sees.

    IRQ 0-7 go to the master, 8-15 to the slave; IRQ2 is the cascade input and cannot be raised
    by a device (on a PC, devices wired to "IRQ2" on the ISA bus arrive as IRQ9).
    """

    name = "pic"
    state_type = PicPairState

    def __init__(self) -> None:
        self.master = Pic8259("pic-master", MASTER_VECTOR_BASE)
        self.master.level_pins_always = 1 << hw.IRQ_PIC_CASCADE
        self.slave = Pic8259("pic-slave", SLAVE_VECTOR_BASE, on_output_change=self._update_cascade)
        # Replay: timers that fire when the trace took their interrupt (IRQ -> raise it now).
        self.trace_timers: dict[int, Callable[[], object]] = {}

    def _update_cascade(self) -> None:
        self.master.set_irq(hw.IRQ_PIC_CASCADE, self.slave.output())

    def set_irq(self, pin: int, level: bool) -> None:
        if 0 <= pin < 8 and pin != hw.IRQ_PIC_CASCADE:
            self.master.set_irq(pin, level)
        elif 8 <= pin < 16:
            self.slave.set_irq(pin - 8, level)

    def irq_of_vector(self, vector: int) -> int | None:
        """The IRQ (0-15) whose vector `vector` is, as the guest programmed the chips, or None."""
        for chip, first in ((self.master, 0), (self.slave, 8)):
            if chip.vector_base <= vector < chip.vector_base + 8:
                irq = first + vector - chip.vector_base
                return None if irq == hw.IRQ_PIC_CASCADE else irq
        return None

    def take_recorded(self, vector: int) -> bool | None:
        """Replay: the CPU takes `vector` because the recording did. A timer whose interrupts
        follow the trace (`trace_timers`: IRQ -> fire) fires now if its request is not latched
        yet (it must be before acknowledging: it may outrank another pending request, as it did
        while recording). True/False: the chips delivered `vector` or another one; None: they
        have nothing for the CPU, and the vector is not theirs to give."""
        irq = self.irq_of_vector(vector)
        fire = self.trace_timers.get(irq) if irq is not None else None
        if fire is not None and not self._requested(irq):
            fire()
        if not self.has_pending():
            return None
        return self.acknowledge() == vector

    def _requested(self, irq: int) -> bool:
        chip, pin = (self.master, irq) if irq < 8 else (self.slave, irq - 8)
        return bool(chip.irr >> pin & 1)

    def has_pending(self) -> bool:
        """The master's INT output: the CPU's INTR line (through the LAPIC's LINT0 on an APIC PC)."""
        return self.master.output()

    def acknowledge(self) -> int:
        """The INTA cycle: the vector of the most urgent request, now in service.

        If the request went away before INTA, the chip answers with its IRQ7 vector without
        setting ISR (a spurious interrupt), as the 8259A does.
        """
        irq = self.master.take()
        if irq is None:
            return self.master.vector_base | SPURIOUS_IRQ
        if irq == hw.IRQ_PIC_CASCADE and not self.master.single:
            slave_irq = self.slave.take()
            if slave_irq is None:
                return self.slave.vector_base | SPURIOUS_IRQ
            return self.slave.vector_base + slave_irq
        return self.master.vector_base + irq

    def state(self) -> PicPairState:
        return PicPairState(master=self.master.state(), slave=self.slave.state())

    def restore(self, state: PicPairState) -> None:
        self.master.restore(state.master)
        self.slave.restore(state.slave)
        self._update_cascade()
