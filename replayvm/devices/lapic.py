"""The local APIC of each guest CPU: interrupt priorities, the LAPIC timer, and IPIs.

It is the machine's `InterruptSource`: the engine asks `has_pending()` when the guest can take
an interrupt (EFLAGS.IF=1) and `acknowledge()` to take it. Fixed interrupts arrive from the IOAPIC,
the timer, the error LVT and self-IPIs into the IRR; `acknowledge()` moves the most urgent one to
the ISR; an EOI write retires the most urgent in-service one.

Time: the timer never looks at host time. Its state is a start instant, a divisor and the count
at which it next expires; everything else (the current count, the next deadline) is arithmetic
on guest nanoseconds. The machine calls `poll(now_ns)` to let due expiries reach the IRR and
`next_deadline_ns()` to know when to call it next. Register reads that need the time (TCCR) and
writes that restart the timer ask `clock.now_ns()`, the machine's one clock.

Hot path: xv6 reads the ID register on every lock operation (~470,000 reads per second), so
`read()` answers offset 0x20 before anything else, from `id_register_value`, which an engine may
also serve itself. The ID is read-only here (Intel lets software write it on some models, but
nothing needs that, and a constant ID keeps such engine-side caching correct).

Several CPUs (`ApicBus`): each CPU has its own Lapic, all at hw.LAPIC_ADDR (`LapicWindow` hands
an access to the LAPIC of the CPU running now); an IPI reaches the LAPICs its ICR names, INIT and
STARTUP go to the machine, which holds the AP in wait-for-SIPI or starts it (xv6's startothers).

Deliberate simplifications:
- One CPU: INIT, STARTUP, SMI and NMI IPIs are dropped (no other CPU to start); with several,
  SMI and NMI are dropped (no NMI/SMI path to the CPU).
- LINT0 is only meaningful as the ExtINT "virtual wire" to the 8259 pair; LINT1 (NMI on a PC),
  the thermal and performance-counter LVTs are registers without a source.
- Delivery is instant, so the ICR and LVT delivery-status bits always read 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from replayvm import hw
from replayvm.devices.state import NS, U8, U16, U32, U64, Blob, Ints

if TYPE_CHECKING:
    from replayvm.devices.pic import Pic8259Pair


class Clock(Protocol):
    def now_ns(self) -> int: ...


# --- Register offsets (32-bit registers on 16-byte strides) -----------------------------
ID = 0x020
VER = 0x030
TPR = 0x080            # task priority: the guest's "block everything at or below this class"
APR = 0x090            # arbitration priority (computed)
PPR = 0x0A0            # processor priority (computed from TPR and the ISR)
EOI = 0x0B0
LDR = 0x0D0            # logical destination
DFR = 0x0E0            # destination format (flat or cluster logical addressing)
SVR = 0x0F0            # spurious vector + software enable
ISR_BASE = 0x100       # 8 registers each for ISR, TMR and IRR: 256 bits, 32 per register
TMR_BASE = 0x180
IRR_BASE = 0x200
ESR = 0x280
ICR_LOW = 0x300
ICR_HIGH = 0x310
LVT_TIMER = 0x320
LVT_THERMAL = 0x330
LVT_PCINT = 0x340
LVT_LINT0 = 0x350
LVT_LINT1 = 0x360
LVT_ERROR = 0x370
TICR = 0x380           # timer initial count
TCCR = 0x390           # timer current count (computed)
TDCR = 0x3E0           # timer divide configuration

# Register names by offset, as the `devices` table of analyze shows them (`lapic.eoi`).
REGISTERS = {ID: "id", VER: "version", TPR: "tpr", APR: "apr", PPR: "ppr", EOI: "eoi", LDR: "ldr",
             DFR: "dfr", SVR: "svr",
             **{ISR_BASE + 0x10 * i: f"isr{i}" for i in range(8)},
             **{TMR_BASE + 0x10 * i: f"tmr{i}" for i in range(8)},
             **{IRR_BASE + 0x10 * i: f"irr{i}" for i in range(8)},
             ESR: "esr", ICR_LOW: "icr_low", ICR_HIGH: "icr_high", LVT_TIMER: "lvt_timer",
             LVT_THERMAL: "lvt_thermal", LVT_PCINT: "lvt_pcint", LVT_LINT0: "lvt_lint0",
             LVT_LINT1: "lvt_lint1", LVT_ERROR: "lvt_error", TICR: "timer_initial",
             TCCR: "timer_current", TDCR: "timer_divide"}

# The one time-valued register: a read of the current count is a clock read (logged as CLOCK,
# under this source name, and fed back from the trace on replay); see is_time_read.
TIME_REGISTERS = (TCCR,)
CLOCK_SOURCE = "lapic.tccr"

MAX_LVT = 5            # index of the last LVT entry (timer, thermal, PCINT, LINT0, LINT1, ERROR)
VERSION_VALUE = hw.LAPIC_VERSION | (MAX_LVT << 16)

# The bits a guest can change in each LVT entry. Delivery-status and remote-IRR bits are
# read-only; the timer has no delivery mode; timer mode bit 18 (TSC deadline) is reserved
# because our CPUID does not offer that mode.
LVT_WRITABLE = {
    LVT_TIMER: 0x300FF,      # vector, mask, periodic
    LVT_THERMAL: 0x107FF,    # vector, delivery mode, mask
    LVT_PCINT: 0x107FF,
    LVT_LINT0: 0x1A7FF,      # vector, delivery mode, polarity, trigger mode, mask
    LVT_LINT1: 0x1A7FF,
    LVT_ERROR: 0x100FF,      # vector, mask
}
LVT_ORDER = (LVT_TIMER, LVT_THERMAL, LVT_PCINT, LVT_LINT0, LVT_LINT1, LVT_ERROR)
LVT_MASKED = 0x10000
TIMER_PERIODIC = 0x20000
DELIVERY_MODE = 0x700
DM_FIXED = 0
DM_LOWEST_PRIORITY = 1
DM_INIT = 5
DM_STARTUP = 6
DM_EXTINT = 7
ICR_ASSERT = 0x4000      # level: INIT with this bit clear is the "de-assert" (arbitration IDs only)

SVR_ENABLE = 0x100
SVR_WRITABLE = 0x3FF   # vector, software enable, focus-check disable
RESET_SVR = 0xFF

ICR_WRITABLE = 0xCCFFF   # vector, delivery mode, dest mode, level, trigger, shorthand
ICR_LOGICAL = 0x800
ICR_LEVEL_TRIGGERED = 0x8000
SHORTHAND_NONE, SHORTHAND_SELF, SHORTHAND_ALL_INCLUDING_SELF, SHORTHAND_ALL_EXCLUDING_SELF = range(4)
BROADCAST = 0xFF

TDCR_WRITABLE = 0xB

# Error status bits (what an ESR read reports).
ESR_SEND_ILLEGAL_VECTOR = 0x20
ESR_RECEIVE_ILLEGAL_VECTOR = 0x40
ESR_ILLEGAL_REGISTER = 0x80

_NS_PER_S = 1_000_000_000


def divisor_of(tdcr: int) -> int:
    """TDCR bits 0, 1 and 3 form a 3-bit code: 0..6 divide by 2..128, 7 divides by 1."""
    code = (tdcr & 3) | ((tdcr >> 1) & 4)
    return 1 if code == 7 else 2 << code


def _priority_class(vector: int) -> int:
    return vector & 0xF0


def _highest(bits: int) -> int:
    """The highest vector set in a 256-bit field, or 0 when none is (class 0 blocks nothing)."""
    return bits.bit_length() - 1 if bits else 0


def _is_read_only(offset: int) -> bool:
    return offset in (ID, VER, APR, PPR, TCCR) or ISR_BASE <= offset < IRR_BASE + 0x80


PURE_READ_REGISTER = "lapic.id"    # how a trace's PURE_READS record names those ID reads


def is_pure_id_read(address: int, size: int) -> bool:
    """The one read deliberately not logged: 4 bytes at the ID register (a constant, read on every
    lock operation by xv6; the emu engine answers it in C). Narrower or unaligned reads of it are
    logged and replayed like any MMIO read."""
    return size == 4 and address == hw.LAPIC_ADDR + ID


def is_time_read(address: int) -> bool:
    """Whether an MMIO read at guest-physical `address` reads the time (the timer's current
    count), whatever its size: the recorder logs it as a clock read, replay takes it from the
    trace. Only the register's own address counts, as every trace so far was recorded."""
    return address == hw.LAPIC_ADDR + TCCR


BITS_BYTES = 32        # a 256-bit IRR/ISR/TMR in a state: 32 bytes, little-endian (bit n = vector n)


@dataclass(frozen=True)
class LapicState:
    """Everything the LAPIC needs to go on as it would have: priorities and the IRR/ISR/TMR,
    error latches, the ICR, the LVTs (in LVT_ORDER), and the timer: initial count, divide
    configuration, when its current run started, the count at which it next expires and that
    expiry's guest time (None: stopped)."""
    apic_id: U8
    tpr: U8
    ldr: U32
    dfr: U32
    svr: U16
    irr: Blob(BITS_BYTES, BITS_BYTES)
    isr: Blob(BITS_BYTES, BITS_BYTES)
    tmr: Blob(BITS_BYTES, BITS_BYTES)
    esr: U32
    esr_pending: U32
    icr_low: U32
    icr_high: U32
    lvt: Ints(len(LVT_ORDER), U32)
    ticr: U32
    tdcr: U8
    timer_start_ns: NS
    timer_expiry_count: NS
    timer_deadline_ns: NS | None
    timer_interrupts_raised: U64
    last_timer_expiry_ns: NS | None

    def __post_init__(self) -> None:
        if self.timer_deadline_ns is not None and self.ticr == 0:
            raise ValueError("LapicState.timer_deadline_ns: a running timer needs an initial count")


class Lapic:
    """The xAPIC of our single CPU, at hw.LAPIC_ADDR; also the engine's InterruptSource."""

    name = "lapic"
    state_type = LapicState

    def __init__(self, clock: Clock, pic: Pic8259Pair | None = None,
                 apic_id: int = hw.BSP_APIC_ID) -> None:
        self.clock = clock
        self.pic = pic
        self.apic_id = apic_id & 0xFF
        self.id_register_value = self.apic_id << 24
        self._level_eoi_callbacks: list[Callable[[int], None]] = []
        # Replay: the trace says when the timer fired (its interrupts' positions), not the clock,
        # which then only orders the timer's own bookkeeping (see take_recorded).
        self.timer_follows_trace = False
        self.apic_bus: ApicBus | None = None      # several CPUs: where IPIs to others go
        self.reset()

    def reset(self) -> None:
        """The power-on state: software-disabled, every LVT masked, timer stopped."""
        self.tpr = 0
        self.ldr = 0
        self.dfr = 0xFFFFFFFF
        self.svr = RESET_SVR
        self.irr = 0               # 256-bit fields as Python ints, bit n = vector n
        self.isr = 0
        self.tmr = 0
        self.esr = 0               # what ESR reads show
        self.esr_pending = 0       # errors detected since the last ESR write
        self.icr_low = 0
        self.icr_high = 0
        self.lvt = {offset: LVT_MASKED for offset in LVT_ORDER}
        self.ticr = 0
        self.tdcr = 0
        self._divisor = divisor_of(0)
        # Timer run: counting started at _timer_start_ns; the next expiry is when the count
        # since then reaches _timer_expiry_count; None = stopped (or a one-shot that expired).
        self._timer_start_ns = 0
        self._timer_expiry_count = 0
        self._timer_deadline_ns: int | None = None
        self.timer_interrupts_raised = 0
        self.last_timer_expiry_ns: int | None = None
        self._update_modes()

    def _update_modes(self) -> None:
        """Cache the two flags every has_pending() needs, after SVR or LINT0 change."""
        self._enabled = bool(self.svr & SVR_ENABLE)
        lint0 = self.lvt[LVT_LINT0]
        lint0_extint = not lint0 & LVT_MASKED and (lint0 & DELIVERY_MODE) >> 8 == DM_EXTINT
        # While disabled (the reset state) the LAPIC passes the 8259's INTR through, as the
        # virtual-wire wiring of an MP-spec PC does; once enabled, only an ExtINT LINT0 does.
        self._extint = self.pic is not None and (not self._enabled or lint0_extint)

    # --- register access -------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == ID and size == 4:
            return self.id_register_value
        register = offset & ~0xF
        if size == 4 and offset == register:
            return self._read_register(register)
        start = offset - register
        if size in (1, 2) and start + size <= 4:
            return (self._read_register(register) >> (8 * start)) & ((1 << (8 * size)) - 1)
        return 0                   # misaligned or oversized: undefined on hardware, harmless here

    def _read_register(self, offset: int) -> int:
        if offset == ID:
            return self.id_register_value
        if offset == VER:
            return VERSION_VALUE
        if offset == TPR:
            return self.tpr
        if offset == APR:
            return self._apr()
        if offset == PPR:
            return self._ppr()
        if offset == EOI:
            return 0               # write-only
        if offset == LDR:
            return self.ldr
        if offset == DFR:
            return self.dfr
        if offset == SVR:
            return self.svr
        if offset == ESR:
            return self.esr
        if offset == ICR_LOW:
            return self.icr_low    # delivery status (bit 12) is never set: delivery is instant
        if offset == ICR_HIGH:
            return self.icr_high
        if offset in self.lvt:
            return self.lvt[offset]
        if offset == TICR:
            return self.ticr
        if offset == TCCR:
            return self._current_count(self.clock.now_ns())
        if offset == TDCR:
            return self.tdcr
        for base, bits in ((ISR_BASE, self.isr), (TMR_BASE, self.tmr), (IRR_BASE, self.irr)):
            if base <= offset < base + 0x80:
                return (bits >> ((offset - base) // 0x10 * 32)) & 0xFFFFFFFF
        self._latch_error(ESR_ILLEGAL_REGISTER)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset & 0xF:
            return                 # only aligned 32-bit writes mean anything
        value &= 0xFFFFFFFF
        if offset == EOI:
            self._eoi()
        elif offset == TPR:
            self.tpr = value & 0xFF
        elif offset == LDR:
            self.ldr = value & 0xFF000000
        elif offset == DFR:
            self.dfr = (value & 0xF0000000) | 0x0FFFFFFF
        elif offset == SVR:
            self._write_svr(value)
        elif offset == ESR:
            # Back-to-back writes are the documented way to clear: each write publishes what was
            # detected since the previous one.
            self.esr = self.esr_pending
            self.esr_pending = 0
        elif offset == ICR_LOW:
            self.icr_low = value & ICR_WRITABLE
            if self.apic_bus is not None:
                self.apic_bus.send(self, self.icr_low, bool(value & ICR_ASSERT), self.icr_high >> 24)
            else:
                self._send_ipi()
        elif offset == ICR_HIGH:
            self.icr_high = value & 0xFF000000
        elif offset in self.lvt:
            self._write_lvt(offset, value)
        elif offset == TICR:
            self._write_ticr(value)
        elif offset == TDCR:
            self._write_tdcr(value & TDCR_WRITABLE)
        elif not _is_read_only(offset):
            self._latch_error(ESR_ILLEGAL_REGISTER)

    def _write_svr(self, value: int) -> None:
        if not value & SVR_ENABLE:
            self._catch_up_timer()           # expiries due before the timer gets masked still count
            for offset in self.lvt:          # software disable masks every LVT entry
                self.lvt[offset] |= LVT_MASKED
        self.svr = value & SVR_WRITABLE
        self._update_modes()

    def _write_lvt(self, offset: int, value: int) -> None:
        if offset == LVT_TIMER:
            # Settle expiries under the old entry: one that fell due while masked is lost, one
            # due before a mask was set was delivered (so next_deadline_ns may skip masked timers).
            self._catch_up_timer()
        value &= LVT_WRITABLE[offset]
        if not self._enabled:
            value |= LVT_MASKED              # masks cannot be cleared while software-disabled
        self.lvt[offset] = value
        self._update_modes()

    # --- priorities ------------------------------------------------------------------------
    def _ppr(self) -> int:
        """Processor priority: the TPR, unless the in-service class is higher."""
        isr_class = _priority_class(_highest(self.isr))
        return self.tpr if _priority_class(self.tpr) >= isr_class else isr_class

    def _apr(self) -> int:
        """Arbitration priority (meaningful only with several CPUs; computed as the P6 does)."""
        tpr_class = _priority_class(self.tpr)
        irr_class = _priority_class(_highest(self.irr))
        isr_class = _priority_class(_highest(self.isr))
        if tpr_class >= irr_class and tpr_class > isr_class:
            return self.tpr
        return max(tpr_class, irr_class, isr_class)

    # --- interrupts in ---------------------------------------------------------------------
    def accept_interrupt(self, vector: int, level_triggered: bool = False) -> bool:
        """A fixed interrupt arrives (IOAPIC message, IPI, local source). True if it reached IRR.

        The TMR bit records the trigger mode so that the EOI for a level-triggered interrupt can
        be forwarded to the IOAPIC. Vectors 0-15 are illegal: they set an error instead.
        """
        vector &= 0xFF
        if vector < 16:
            self._latch_error(ESR_RECEIVE_ILLEGAL_VECTOR)
            return False
        bit = 1 << vector
        self.irr |= bit
        if level_triggered:
            self.tmr |= bit
        else:
            self.tmr &= ~bit
        return True

    def _latch_error(self, error: int) -> None:
        """Record an error for the next ESR write to publish, and signal the ERROR LVT."""
        self.esr_pending |= error
        entry = self.lvt[LVT_ERROR]
        if entry & LVT_MASKED:
            return
        vector = entry & 0xFF
        if vector < 16:
            self.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR   # and no interrupt: no recursion
        else:
            self.accept_interrupt(vector)

    def accepts_destination(self, destination: int, logical: bool) -> bool:
        """Whether an interrupt message addressed this way is for this CPU.

        Physical mode compares with the APIC ID; logical mode uses the LDR, in the flat model
        (DFR model 0xF: LDR bits are a CPU bitmap) or the cluster model (high nibble = cluster,
        low nibble = bitmap). 0xFF is a broadcast in both.
        """
        destination &= 0xFF
        if destination == BROADCAST:
            return True
        if not logical:
            return destination == self.apic_id
        logical_id = self.ldr >> 24
        if self.dfr >> 28 == 0xF:
            return bool(logical_id & destination)
        return destination >> 4 == logical_id >> 4 and bool(destination & logical_id & 0xF)

    def _send_ipi(self) -> None:
        """An ICR low write sends the IPI at once; only fixed interrupts to ourselves arrive."""
        icr = self.icr_low
        vector = icr & 0xFF
        mode = (icr & DELIVERY_MODE) >> 8
        shorthand = (icr >> 18) & 3
        if mode not in (DM_FIXED, DM_LOWEST_PRIORITY):
            return        # INIT (including xv6's INIT de-assert broadcast), STARTUP, NMI, SMI
        if vector < 16:
            self._latch_error(ESR_SEND_ILLEGAL_VECTOR)
            return
        if shorthand == SHORTHAND_ALL_EXCLUDING_SELF:
            return
        if shorthand == SHORTHAND_NONE and not self.accepts_destination(
                self.icr_high >> 24, bool(icr & ICR_LOGICAL)):
            return
        self.accept_interrupt(vector, bool(icr & ICR_LEVEL_TRIGGERED))

    def send_illegal_vector(self) -> None:
        self._latch_error(ESR_SEND_ILLEGAL_VECTOR)

    # --- interrupts out (the InterruptSource side) ---------------------------------------
    def has_pending(self) -> bool:
        """An interrupt is ready for the CPU: an IRR vector whose class beats the PPR's, or the
        8259's INTR while the virtual wire to it is open. Only state: call poll() first."""
        if self._enabled and self.irr:
            if _priority_class(self.irr.bit_length() - 1) > _priority_class(self._ppr()):
                return True
        if self._extint:
            return self.pic.has_pending()    # type: ignore[union-attr]  (_extint implies a pic)
        return False

    def acknowledge(self) -> int:
        """The CPU takes an interrupt: return its vector (IRR -> ISR for our own vectors).

        ExtINT goes first (it bypasses the APIC's priority logic, as on hardware). With nothing
        to deliver the answer is the spurious vector from the SVR, and no ISR bit is set.
        """
        if self._extint and self.pic.has_pending():          # type: ignore[union-attr]
            return self.pic.acknowledge()                    # type: ignore[union-attr]
        if self._enabled and self.irr:
            vector = self.irr.bit_length() - 1
            if _priority_class(vector) > _priority_class(self._ppr()):
                bit = 1 << vector
                self.irr &= ~bit
                self.isr |= bit
                return vector
        return self.svr & 0xFF

    def take_recorded(self, vector: int) -> bool:
        """Replay: the CPU takes `vector` because the recording did. In IRR it moves to ISR as
        acknowledge() would have moved it; the timer's vector may not be there yet, since on
        replay the trace, not the clock, fires the timer: it fires now. Any other vector that no
        device raised means the replayed devices went another way: False."""
        vector &= 0xFF
        if self._extint and self.pic.has_pending():          # type: ignore[union-attr]
            return self.pic.acknowledge() == vector          # type: ignore[union-attr]
        bit = 1 << vector
        if not self.irr & bit:
            timer = self.lvt[LVT_TIMER]
            if vector != timer & 0xFF or timer & LVT_MASKED:
                return False
            self.timer_interrupts_raised += 1
        self.irr &= ~bit
        self.isr |= bit
        return True

    def _eoi(self) -> None:
        """Retire the highest in-service vector; tell the IOAPIC if it was level-triggered."""
        if not self.isr:
            return
        vector = self.isr.bit_length() - 1
        self.isr &= ~(1 << vector)
        if self.tmr >> vector & 1:
            for callback in list(self._level_eoi_callbacks):
                callback(vector)

    def on_level_eoi(self, callback: Callable[[int], None]) -> None:
        """Call `callback(vector)` on each EOI of a level-triggered vector (the IOAPIC's hook)."""
        if callback not in self._level_eoi_callbacks:
            self._level_eoi_callbacks.append(callback)

    # --- the timer -------------------------------------------------------------------------
    def _counts_since_start(self, now_ns: int) -> int:
        return max(0, now_ns - self._timer_start_ns) * hw.LAPIC_BUS_HZ // (self._divisor * _NS_PER_S)

    def _time_of_count(self, count: int) -> int:
        """The first guest ns at which the count since start has reached `count`."""
        return self._timer_start_ns - (-count * self._divisor * _NS_PER_S // hw.LAPIC_BUS_HZ)

    def _current_count(self, now_ns: int) -> int:
        if self._timer_deadline_ns is None:
            return 0
        remaining = self._timer_expiry_count - self._counts_since_start(now_ns)
        if remaining > 0:
            return remaining
        if self.lvt[LVT_TIMER] & TIMER_PERIODIC:
            return self.ticr - (-remaining) % self.ticr    # already reloaded, poll() or not
        return 0

    def _catch_up_timer(self) -> None:
        if self._timer_deadline_ns is not None:
            self.poll(self.clock.now_ns())

    def _write_ticr(self, value: int) -> None:
        """Writing the initial count (re)starts the countdown from now; 0 stops the timer."""
        now = self.clock.now_ns()
        if self._timer_deadline_ns is not None:
            self.poll(now)
        self.ticr = value
        if value == 0:
            self._timer_deadline_ns = None
            return
        self._timer_start_ns = now
        self._timer_expiry_count = value
        self._timer_deadline_ns = self._time_of_count(value)

    def _write_tdcr(self, value: int) -> None:
        """A new divisor applies to the counts still to go; the countdown does not restart."""
        if self._timer_deadline_ns is not None:
            now = self.clock.now_ns()
            self.poll(now)
            if self._timer_deadline_ns is not None:
                remaining = self._timer_expiry_count - self._counts_since_start(now)
                self.tdcr = value
                self._divisor = divisor_of(value)
                self._timer_start_ns = now
                self._timer_expiry_count = remaining
                self._timer_deadline_ns = self._time_of_count(remaining)
                return
        self.tdcr = value
        self._divisor = divisor_of(value)

    def poll(self, now_ns: int) -> None:
        """Let timer expiries due by `now_ns` happen.

        Several periods missed since the last poll raise one interrupt (the IRR has one bit per
        vector, as on hardware); periodic deadlines stay on their original phase. An expiry
        while the LVT is masked changes nothing but the count.
        """
        deadline = self._timer_deadline_ns
        if deadline is None or now_ns < deadline or self.timer_follows_trace:
            return
        entry = self.lvt[LVT_TIMER]
        if entry & TIMER_PERIODIC:
            due_extra = (self._counts_since_start(now_ns) - self._timer_expiry_count) // self.ticr
            last_count = self._timer_expiry_count + due_extra * self.ticr
            self._timer_expiry_count = last_count + self.ticr
            self._timer_deadline_ns = self._time_of_count(self._timer_expiry_count)
            self.last_timer_expiry_ns = self._time_of_count(last_count)
        else:
            self._timer_deadline_ns = None
            self.last_timer_expiry_ns = deadline
        if not entry & LVT_MASKED and self.accept_interrupt(entry & 0xFF):
            self.timer_interrupts_raised += 1

    def next_deadline_ns(self) -> int | None:
        """Absolute guest ns of the next timer interrupt, or None if none can come.

        A masked timer reports None: its expiries have no visible effect (the current count is
        computed), and unmasking settles them first.
        """
        if self.lvt[LVT_TIMER] & LVT_MASKED:
            return None
        return self._timer_deadline_ns

    # --- snapshots -------------------------------------------------------------------------
    def state(self) -> LapicState:
        return LapicState(
            apic_id=self.apic_id, tpr=self.tpr, ldr=self.ldr, dfr=self.dfr, svr=self.svr,
            irr=self.irr.to_bytes(BITS_BYTES, "little"), isr=self.isr.to_bytes(BITS_BYTES, "little"),
            tmr=self.tmr.to_bytes(BITS_BYTES, "little"), esr=self.esr, esr_pending=self.esr_pending,
            icr_low=self.icr_low, icr_high=self.icr_high,
            lvt=tuple(self.lvt[offset] for offset in LVT_ORDER), ticr=self.ticr, tdcr=self.tdcr,
            timer_start_ns=self._timer_start_ns, timer_expiry_count=self._timer_expiry_count,
            timer_deadline_ns=self._timer_deadline_ns,
            timer_interrupts_raised=self.timer_interrupts_raised,
            last_timer_expiry_ns=self.last_timer_expiry_ns)

    def restore(self, state: LapicState) -> None:
        self.apic_id = state.apic_id
        self.id_register_value = self.apic_id << 24
        self.tpr, self.ldr, self.dfr, self.svr = state.tpr, state.ldr, state.dfr, state.svr
        self.irr = int.from_bytes(state.irr, "little")
        self.isr = int.from_bytes(state.isr, "little")
        self.tmr = int.from_bytes(state.tmr, "little")
        self.esr, self.esr_pending = state.esr, state.esr_pending
        self.icr_low, self.icr_high = state.icr_low, state.icr_high
        self.lvt = dict(zip(LVT_ORDER, state.lvt))
        self.ticr = state.ticr
        self.tdcr = state.tdcr
        self._divisor = divisor_of(self.tdcr)
        self._timer_start_ns = state.timer_start_ns
        self._timer_expiry_count = state.timer_expiry_count
        self._timer_deadline_ns = state.timer_deadline_ns
        self.timer_interrupts_raised = state.timer_interrupts_raised
        self.last_timer_expiry_ns = state.last_timer_expiry_ns
        self._update_modes()


class ApicBus:
    """The wire between several CPUs' local APICs (APIC ID = the CPU's index): an IPI reaches the
    LAPICs its ICR names; INIT and STARTUP are the machine's to act on (`on_init(cpu)` holds a
    CPU in wait-for-SIPI, `on_startup(cpu, vector)` starts a waiting one in real mode at
    vector * 4096). Delivery is instant, as for one CPU."""

    def __init__(self, lapics: list[Lapic], on_init: Callable[[int], None],
                 on_startup: Callable[[int, int], None],
                 on_wake: Callable[[int], None] | None = None) -> None:
        self.lapics = lapics
        self.on_init = on_init
        self.on_startup = on_startup
        self.on_wake = on_wake          # a fixed IPI reached another CPU (the scheduler may care)
        for lapic in lapics:
            lapic.apic_bus = self

    def targets(self, source: Lapic, icr: int, destination: int) -> list[Lapic]:
        shorthand = (icr >> 18) & 3
        if shorthand == SHORTHAND_SELF:
            return [source]
        if shorthand == SHORTHAND_ALL_INCLUDING_SELF:
            return list(self.lapics)
        if shorthand == SHORTHAND_ALL_EXCLUDING_SELF:
            return [lapic for lapic in self.lapics if lapic is not source]
        logical = bool(icr & ICR_LOGICAL)
        return [lapic for lapic in self.lapics if lapic.accepts_destination(destination, logical)]

    def send(self, source: Lapic, icr: int, asserted: bool, destination: int) -> None:
        """`source`'s ICR low was written: send the IPI it describes."""
        vector = icr & 0xFF
        mode = (icr & DELIVERY_MODE) >> 8
        targets = self.targets(source, icr, destination)
        if mode == DM_INIT:
            if icr & ICR_LEVEL_TRIGGERED and not asserted:
                return                     # xv6's INIT de-assert broadcast: arbitration IDs only
            for lapic in targets:
                if lapic is not source:
                    self.on_init(lapic.apic_id)
        elif mode == DM_STARTUP:
            for lapic in targets:
                if lapic is not source:
                    self.on_startup(lapic.apic_id, vector)
        elif mode in (DM_FIXED, DM_LOWEST_PRIORITY):
            if vector < 16:
                source.send_illegal_vector()
                return
            for lapic in targets[:1] if mode == DM_LOWEST_PRIORITY else targets:
                if lapic.accept_interrupt(vector, bool(icr & ICR_LEVEL_TRIGGERED)) \
                        and lapic is not source and self.on_wake is not None:
                    self.on_wake(lapic.apic_id)


class LapicWindow:
    """hw.LAPIC_ADDR on the MMIO bus of a machine with several CPUs: each CPU sees its own local
    APIC there. The machine selects the running CPU's (`select`) whenever it switches CPUs."""

    name = "lapic"

    def __init__(self, lapics: list[Lapic]) -> None:
        self.lapics = lapics
        self.current = lapics[0]

    def select(self, cpu: int) -> None:
        self.current = self.lapics[cpu]

    def read(self, offset: int, size: int) -> int:
        return self.current.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.current.write(offset, size, value)
