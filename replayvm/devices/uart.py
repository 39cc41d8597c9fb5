"""16550A UART (COM1): the guest's serial console.

Input enters through `feed_input`, the one door a recorder logs. xv6 runs the UART with its FIFO
off, where on real hardware a byte typed before the guest read the previous one overwrites it;
here the next queued byte moves into the receive buffer only once the guest has read the previous
one, so no input is ever lost. Output is instant: the transmitter is always empty.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from replayvm.devices.irq import IrqLine
from replayvm.devices.state import NS, U8, U16, U64, Blob

# Register offsets (DLAB = LCR bit 7 switches offsets 0 and 1 to the divisor latch).
RBR_THR = 0
IER = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RX_AVAILABLE = 0x01
IER_TX_EMPTY = 0x02
IIR_NO_INTERRUPT = 0x01
IIR_TX_EMPTY = 0x02
IIR_RX_AVAILABLE = 0x04
IIR_FIFO_ENABLED = 0xC0
LCR_DLAB = 0x80
LSR_DATA_READY = 0x01
LSR_THR_EMPTY = 0x20
LSR_TX_EMPTY = 0x40
MCR_LOOPBACK = 0x10
MSR_IDLE = 0xB0            # CTS, DSR, DCD asserted: a terminal is attached
RESET_LCR = 0x03           # 8 data bits, DLAB clear
MCR_MASK = 0x1F

# Register names by offset, as the `devices` table of analyze shows them (`com1.lsr`).
REGISTERS = {RBR_THR: "data", IER: "ier", IIR_FCR: "iir", LCR: "lcr", MCR: "mcr", LSR: "lsr",
             MSR: "msr", SCR: "scratch"}
PENDING_INPUT_LIMIT = 1 << 24      # typed bytes a saved state may hold unread (16 MiB)


@dataclass(frozen=True)
class UartState:
    """Everything the UART needs to go on as it would have: typed bytes not yet read, the
    registers, the transmitter (chaos: busy until), the interrupt line's level."""
    rbr: U8 | None
    pending: Blob(PENDING_INPUT_LIMIT)
    ier: U8
    lcr: U8
    mcr: U8
    scr: U8
    fcr: U8
    divisor: U16
    tx_interrupt_pending: bool
    tx_busy_until: NS | None
    irq_level: bool
    bytes_out: U64
    bytes_in: U64


def transmits(offset: int, lcr: int, mcr: int) -> bool:
    """Does a write at register `offset` send a byte down the line? Only the transmit holding
    register does, with DLAB clear (else it is the divisor latch) and loopback off (else the byte
    comes back as input). The UART and the replay's console decoder both decide with this."""
    return offset == RBR_THR and not lcr & LCR_DLAB and not mcr & MCR_LOOPBACK


def loops_back(offset: int, lcr: int, mcr: int) -> bool:
    """Does a write at `offset` go to the receiver instead (the THR in MCR loopback mode)?"""
    return offset == RBR_THR and not lcr & LCR_DLAB and bool(mcr & MCR_LOOPBACK)


def receives(offset: int, lcr: int) -> bool:
    """Does a read at `offset` take the receive buffer (a typed byte)? Offset 0 with DLAB
    clear; with DLAB set it reads the divisor latch instead."""
    return offset == RBR_THR and not lcr & LCR_DLAB


class SerialOutputDecoder:
    """What a guest printed on COM1, from its register writes alone (replay has no UART): the
    two registers that decide whether a THR write is output, kept as the UART keeps them."""

    def __init__(self) -> None:
        self.lcr = RESET_LCR
        self.mcr = 0

    def write(self, offset: int, value: int) -> int | None:
        """The byte sent by a write of `value` at `offset`, or None when nothing is sent."""
        if offset == LCR:
            self.lcr = value & 0xFF
        elif offset == MCR:
            self.mcr = value & MCR_MASK
        elif transmits(offset, self.lcr, self.mcr):
            return value & 0xFF
        return None

    def loops_back(self, offset: int) -> bool:
        """Whether a write at `offset` goes to the receiver instead (MCR loopback mode)."""
        return loops_back(offset, self.lcr, self.mcr)

    def receives(self, offset: int) -> bool:
        """Whether a read at `offset` takes a typed byte from the receive buffer (see receives)."""
        return receives(offset, self.lcr)

    def state(self) -> tuple[int, int]:
        return self.lcr, self.mcr

    def restore(self, state) -> None:
        """From state() (or, from checkpoints kept by an older build, the LCR alone)."""
        self.lcr, self.mcr = (state, 0) if isinstance(state, int) else tuple(state)


class Uart16550:
    """A 16550A whose transmit side is instantaneous and receive side never overruns."""

    name = "com1"
    state_type = UartState

    def __init__(self, irq: IrqLine, on_output: Callable[[int], None],
                 latency: Callable[[], int] | None = None, now_ns: Callable[[], int] | None = None) -> None:
        self.irq = irq
        self.on_output = on_output
        self.latency = latency               # chaos: ns the transmit register stays full per byte
        self.now_ns = now_ns
        self.pending: deque[int] = deque()
        self.reset()

    def reset(self) -> None:
        self.rbr: int | None = None          # the byte the guest can read now, if any
        self.ier = 0
        self.lcr = RESET_LCR
        self.mcr = 0
        self.scr = 0
        self.fcr = 0
        self.divisor = 12                    # 9600 baud
        self.tx_interrupt_pending = False   # THR-empty interrupt, cleared by reading IIR or writing THR
        self.tx_busy_until: int | None = None   # chaos: THR full until this guest time
        self.bytes_out = 0
        self.bytes_in = 0

    # ---------------------------------------------------------------- input
    def feed_input(self, data: bytes) -> None:
        """Queue bytes typed at the console; they reach the guest one read at a time."""
        self.pending.extend(data)
        self._refill()

    def rx_pending(self) -> int:
        """Bytes not yet read by the guest (including the one in the receive buffer)."""
        return len(self.pending) + (self.rbr is not None)

    def _refill(self) -> None:
        if self.rbr is None and self.pending:
            self.rbr = self.pending.popleft()
        self._update_irq()

    # ---------------------------------------------------------------- interrupts
    def _interrupt_id(self) -> int:
        if self.ier & IER_RX_AVAILABLE and self.rbr is not None:
            return IIR_RX_AVAILABLE
        if self.ier & IER_TX_EMPTY and self.tx_interrupt_pending:
            return IIR_TX_EMPTY
        return IIR_NO_INTERRUPT

    def _update_irq(self) -> None:
        level = self._interrupt_id() != IIR_NO_INTERRUPT
        if level != self.irq.level:
            self.irq.set_level(level)

    # ---------------------------------------------------------------- registers
    def read(self, offset: int, size: int) -> int:
        if self.tx_busy_until is not None and self.now_ns is not None:
            self.poll(self.now_ns())             # a guest polling LSR sees the byte go on time
        if offset == LSR:
            lsr = LSR_THR_EMPTY | LSR_TX_EMPTY if self.tx_busy_until is None else 0
            return lsr | (LSR_DATA_READY if self.rbr is not None else 0)
        if receives(offset, self.lcr):
            value = self.rbr if self.rbr is not None else 0
            if self.rbr is not None:
                self.rbr = None
                self.bytes_in += 1
                if self.irq.level:           # the condition clears: the next byte is a new edge
                    self.irq.set_level(False)
                self._refill()
            return value
        if offset == RBR_THR:                    # DLAB set: the divisor latch
            return self.divisor & 0xFF
        if offset == IER:
            return (self.divisor >> 8) & 0xFF if self.lcr & LCR_DLAB else self.ier
        if offset == IIR_FCR:
            iid = self._interrupt_id()
            if iid == IIR_TX_EMPTY:
                self.tx_interrupt_pending = False
                self._update_irq()
            return iid | (IIR_FIFO_ENABLED if self.fcr & 1 else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == MSR:
            return MSR_IDLE
        if offset == SCR:
            return self.scr
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == RBR_THR:
            if self.lcr & LCR_DLAB:
                self.divisor = (self.divisor & 0xFF00) | value
                return
            self.bytes_out += 1
            if transmits(offset, self.lcr, self.mcr):
                self.on_output(value)
            else:                                  # loopback: the byte comes back as input
                self.feed_input(bytes((value,)))
            if self.latency is not None and self.now_ns is not None:
                self.tx_busy_until = self.now_ns() + self.latency()
                self.tx_interrupt_pending = False
            else:
                self.tx_interrupt_pending = True      # transmitted at once: THR empty again
            self._update_irq()
        elif offset == IER:
            if self.lcr & LCR_DLAB:
                self.divisor = (self.divisor & 0xFF) | (value << 8)
                return
            self.ier = value & 0x0F
            self.tx_interrupt_pending = bool(self.ier & IER_TX_EMPTY)
            self._update_irq()
        elif offset == IIR_FCR:
            self.fcr = value
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & MCR_MASK
        elif offset == SCR:
            self.scr = value

    # ---------------------------------------------------------------- snapshots
    def poll(self, now_ns: int) -> None:
        """Chaos latency: the byte in the transmit register has gone; THR empty again."""
        if self.tx_busy_until is not None and now_ns >= self.tx_busy_until:
            self.tx_busy_until = None
            self.tx_interrupt_pending = True
            self._update_irq()

    def next_deadline_ns(self) -> int | None:
        return self.tx_busy_until

    def state(self) -> UartState:
        return UartState(rbr=self.rbr, pending=bytes(self.pending), ier=self.ier, lcr=self.lcr,
                         mcr=self.mcr, scr=self.scr, fcr=self.fcr, divisor=self.divisor,
                         tx_interrupt_pending=self.tx_interrupt_pending,
                         tx_busy_until=self.tx_busy_until, irq_level=self.irq.level,
                         bytes_out=self.bytes_out, bytes_in=self.bytes_in)

    def restore(self, state: UartState) -> None:
        """Back to `state`; the interrupt line is set quietly (the controllers keep their own)."""
        self.rbr = state.rbr
        self.pending = deque(state.pending)
        self.ier, self.lcr, self.mcr, self.scr = state.ier, state.lcr, state.mcr, state.scr
        self.fcr, self.divisor = state.fcr, state.divisor
        self.tx_interrupt_pending = state.tx_interrupt_pending
        self.tx_busy_until = state.tx_busy_until
        self.bytes_out, self.bytes_in = state.bytes_out, state.bytes_in
        self.irq.restore_level(state.irq_level)
