"""Unit tests for the interrupt controllers: 8259A pair, IMCR, IOAPIC and local APIC.

Where xv6 touches a controller, the tests replay its exact access sequence (lapic.c, ioapic.c,
picirq.c, mp.c) and check what it would observe. Time only moves through a VirtualClock.
"""

from __future__ import annotations

import msgpack
import pytest

from replayvm import hw
from replayvm.clock import VirtualClock
from replayvm.devices.imcr import Imcr
from replayvm.devices.ioapic import Ioapic
from replayvm.devices.lapic import Lapic, divisor_of
from replayvm.devices.pic import Pic8259Pair
from replayvm.devices.state import from_plain, to_plain

# xv6 constants (traps.h, lapic.c, ioapic.c), spelled as xv6 spells them.
T_IRQ0 = 32
IRQ_TIMER, IRQ_KBD, IRQ_COM1, IRQ_IDE, IRQ_ERROR, IRQ_SPURIOUS = 0, 1, 4, 14, 19, 31
ID, VER, TPR, EOI, SVR, ESR = 0x20, 0x30, 0x80, 0xB0, 0xF0, 0x280
ICRLO, ICRHI, TIMER, PCINT, LINT0, LINT1, ERROR = 0x300, 0x310, 0x320, 0x340, 0x350, 0x360, 0x370
TICR, TCCR, TDCR = 0x380, 0x390, 0x3E0
ENABLE, INIT, STARTUP, DELIVS, ASSERT, LEVEL, BCAST = 0x100, 0x500, 0x600, 0x1000, 0x4000, 0x8000, 0x80000
X1, PERIODIC, MASKED = 0xB, 0x20000, 0x10000
PPR, LDR, DFR, APR = 0xA0, 0xD0, 0xE0, 0x90
ISR0, TMR0, IRR0 = 0x100, 0x180, 0x200
REG_ID, REG_VER, REG_TABLE = 0x00, 0x01, 0x10
INT_DISABLED, INT_LEVEL, INT_LOGICAL = 0x10000, 0x8000, 0x800
REMOTE_IRR = 0x4000
TIMER_VECTOR = T_IRQ0 + IRQ_TIMER
TICKS = 10_000_000


# --- helpers: the guest's side of the bus ---------------------------------------------------
def lapicw(lapic: Lapic, index: int, value: int) -> None:
    """xv6's lapicw(): the write, then a read of ID to wait for it."""
    lapic.write(index, 4, value & 0xFFFFFFFF)
    lapic.read(ID, 4)


def xv6_lapicinit(lapic: Lapic) -> None:
    """lapic.c lapicinit(), access for access."""
    lapicw(lapic, SVR, ENABLE | (T_IRQ0 + IRQ_SPURIOUS))
    lapicw(lapic, TDCR, X1)
    lapicw(lapic, TIMER, PERIODIC | (T_IRQ0 + IRQ_TIMER))
    lapicw(lapic, TICR, 10000000)
    lapicw(lapic, LINT0, MASKED)
    lapicw(lapic, LINT1, MASKED)
    if ((lapic.read(VER, 4) >> 16) & 0xFF) >= 4:
        lapicw(lapic, PCINT, MASKED)
    lapicw(lapic, ERROR, T_IRQ0 + IRQ_ERROR)
    lapicw(lapic, ESR, 0)
    lapicw(lapic, ESR, 0)
    lapicw(lapic, EOI, 0)
    lapicw(lapic, ICRHI, 0)
    lapicw(lapic, ICRLO, BCAST | INIT | LEVEL)
    for _ in range(1000):                     # while(lapic[ICRLO] & DELIVS) ;
        if not lapic.read(ICRLO, 4) & DELIVS:
            break
    else:
        pytest.fail("ICR delivery status never cleared: xv6 would spin forever")
    lapicw(lapic, TPR, 0)


def xv6_lapiceoi(lapic: Lapic) -> None:
    lapicw(lapic, EOI, 0)


def ioapicread(ioapic: Ioapic, reg: int) -> int:
    ioapic.write(0x00, 4, reg)
    return ioapic.read(0x10, 4)


def ioapicwrite(ioapic: Ioapic, reg: int, data: int) -> None:
    ioapic.write(0x00, 4, reg)
    ioapic.write(0x10, 4, data)


def xv6_ioapicinit(ioapic: Ioapic, mp_ioapicid: int = hw.IOAPIC_ID) -> tuple[int, bool]:
    """ioapic.c ioapicinit(); returns (maxintr, whether the ID matched the MP table's)."""
    maxintr = (ioapicread(ioapic, REG_VER) >> 16) & 0xFF
    ident = ioapicread(ioapic, REG_ID) >> 24
    for i in range(maxintr + 1):
        ioapicwrite(ioapic, REG_TABLE + 2 * i, INT_DISABLED | (T_IRQ0 + i))
        ioapicwrite(ioapic, REG_TABLE + 2 * i + 1, 0)
    return maxintr, ident == mp_ioapicid


def ioapicenable(ioapic: Ioapic, irq: int, cpunum: int) -> None:
    ioapicwrite(ioapic, REG_TABLE + 2 * irq, T_IRQ0 + irq)
    ioapicwrite(ioapic, REG_TABLE + 2 * irq + 1, cpunum << 24)


def outb(device, offset: int, value: int) -> None:
    device.write(offset, 1, value)


def inb(device, offset: int) -> int:
    return device.read(offset, 1)


def irr_vectors(lapic: Lapic) -> list[int]:
    """The IRR as the guest reads it: 8 registers of 32 bits."""
    return _vectors_from_registers(lapic, IRR0)


def isr_vectors(lapic: Lapic) -> list[int]:
    return _vectors_from_registers(lapic, ISR0)


def _vectors_from_registers(lapic: Lapic, base: int) -> list[int]:
    out = []
    for i in range(8):
        word = lapic.read(base + 0x10 * i, 4)
        out += [32 * i + b for b in range(32) if word >> b & 1]
    return out


def roundtrip(state):
    """What a snapshot file does to a state: plain values, msgpack out and back in (default
    strict settings), then checked and typed again."""
    return from_plain(type(state), msgpack.unpackb(msgpack.packb(to_plain(state)), raw=False))


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def lapic(clock: VirtualClock) -> Lapic:
    return Lapic(clock)


@pytest.fixture
def enabled_lapic(clock: VirtualClock) -> Lapic:
    """A LAPIC after xv6's lapicinit (timer running from t=0), clock left at 0."""
    lapic = Lapic(clock)
    xv6_lapicinit(lapic)
    return lapic


def enable_only(lapic: Lapic) -> None:
    """Software-enable with the timer left masked: for tests about priorities and delivery."""
    lapic.write(SVR, 4, ENABLE | 0xFF)


# =============================================================================================
# 8259A pair
# =============================================================================================
def pic_init(pic: Pic8259Pair, master_base: int = 0x20, slave_base: int = 0x28,
             icw4: int = 0x01) -> None:
    """The classic full initialisation (cascade, ICW4), then everything unmasked."""
    for chip, base, icw3 in ((pic.master, master_base, 0x04), (pic.slave, slave_base, 0x02)):
        outb(chip, 0, 0x11)
        outb(chip, 1, base)
        outb(chip, 1, icw3)
        outb(chip, 1, icw4)
        outb(chip, 1, 0x00)


def test_pic_reset_state_is_fully_masked_with_bios_vector_bases() -> None:
    pic = Pic8259Pair()
    assert inb(pic.master, 1) == 0xFF and inb(pic.slave, 1) == 0xFF
    pic.set_irq(1, True)
    pic.set_irq(12, True)
    assert not pic.has_pending()
    outb(pic.master, 1, 0x00)            # unmask everything (IRQ2 lets the slave through)
    outb(pic.slave, 1, 0x00)
    assert pic.has_pending()
    assert pic.acknowledge() == 0x08 + 1
    outb(pic.master, 0, 0x20)
    assert pic.acknowledge() == 0x70 + 4


def test_xv6_picinit_masks_both_chips() -> None:
    pic = Pic8259Pair()
    outb(pic.master, 1, 0xFF)            # outb(IO_PIC1+1, 0xFF)
    outb(pic.slave, 1, 0xFF)             # outb(IO_PIC2+1, 0xFF)
    assert inb(pic.master, 1) == 0xFF and inb(pic.slave, 1) == 0xFF
    for irq in range(16):
        pic.set_irq(irq, True)
    assert not pic.has_pending()


def test_pic_icw_sequence_sets_vector_bases_and_clears_masks() -> None:
    pic = Pic8259Pair()
    outb(pic.master, 0, 0x11)            # ICW1: edge, cascade, ICW4 follows
    assert inb(pic.master, 1) == 0x00    # ICW1 clears the IMR
    outb(pic.master, 1, 0x20)            # ICW2
    outb(pic.master, 1, 0x04)            # ICW3
    outb(pic.master, 1, 0x01)            # ICW4
    outb(pic.master, 1, 0xFD)            # OCW1: only IRQ1 unmasked
    assert inb(pic.master, 1) == 0xFD
    outb(pic.slave, 0, 0x11)
    outb(pic.slave, 1, 0x28)
    outb(pic.slave, 1, 0x02)
    outb(pic.slave, 1, 0x01)
    outb(pic.slave, 1, 0xEF)             # only IRQ12
    pic.set_irq(3, True)                 # masked on the master
    assert not pic.has_pending()
    pic.set_irq(1, True)
    assert pic.acknowledge() == 0x21
    outb(pic.master, 0, 0x20)
    outb(pic.master, 1, 0xF9)            # unmask IRQ2 (cascade) as well
    pic.set_irq(12, True)
    assert pic.acknowledge() == 0x2C


def test_pic_icw2_low_bits_are_ignored() -> None:
    pic = Pic8259Pair()
    pic_init(pic, master_base=0x27)
    pic.set_irq(0, True)
    assert pic.acknowledge() == 0x20


def test_pic_without_icw4_or_icw3_next_data_write_is_the_mask() -> None:
    pic = Pic8259Pair()
    outb(pic.master, 0, 0x12)            # single, no ICW4: ICW2 is the only data byte
    outb(pic.master, 1, 0x40)
    outb(pic.master, 1, 0xFE)            # OCW1
    assert inb(pic.master, 1) == 0xFE
    pic.set_irq(0, True)
    assert pic.acknowledge() == 0x40
    outb(pic.slave, 0, 0x10)             # cascade, no ICW4: ICW2, ICW3, then OCW1
    outb(pic.slave, 1, 0x50)
    outb(pic.slave, 1, 0x02)
    outb(pic.slave, 1, 0x7F)
    assert inb(pic.slave, 1) == 0x7F


def test_pic_single_mode_does_not_cascade() -> None:
    pic = Pic8259Pair()
    outb(pic.master, 0, 0x13)            # single, ICW4
    outb(pic.master, 1, 0x40)
    outb(pic.master, 1, 0x01)            # ICW4 (no ICW3 in single mode)
    outb(pic.master, 1, 0x00)
    outb(pic.slave, 1, 0x00)
    pic.set_irq(9, True)                 # slave output reaches master IRQ2 ...
    assert pic.acknowledge() == 0x42     # ... but it is an ordinary IRQ2 on a single 8259


def test_pic_edge_latches_until_acknowledged_and_needs_a_new_edge() -> None:
    pic = Pic8259Pair()
    pic_init(pic)
    pic.set_irq(3, True)
    pic.set_irq(3, False)                # a pulse: the request stays latched
    assert pic.has_pending()
    assert pic.acknowledge() == 0x23
    outb(pic.master, 0, 0x20)
    assert not pic.has_pending()
    pic.set_irq(3, True)
    assert pic.acknowledge() == 0x23
    outb(pic.master, 0, 0x20)
    pic.set_irq(3, True)                 # still high, no edge: nothing
    assert not pic.has_pending()
    pic.set_irq(3, False)
    pic.set_irq(3, True)
    assert pic.has_pending()


def test_pic_masked_request_is_kept_and_delivered_on_unmask() -> None:
    pic = Pic8259Pair()
    pic_init(pic)
    outb(pic.master, 1, 0x20)            # mask IRQ5
    pic.set_irq(5, True)
    assert not pic.has_pending()
    assert inb(pic.master, 0) == 0x20    # but it is in the IRR
    outb(pic.master, 1, 0x00)
    assert pic.acknowledge() == 0x25


def test_pic_priority_nesting_and_non_specific_eoi() -> None:
    pic = Pic8259Pair()
    pic_init(pic)
    pic.set_irq(3, True)
    assert pic.acknowledge() == 0x23
    pic.set_irq(5, True)                 # lower priority than the one in service
    assert not pic.has_pending()
    pic.set_irq(1, True)                 # higher priority: preempts
    assert pic.has_pending()
    assert pic.acknowledge() == 0x21
    outb(pic.master, 0, 0x0B)            # OCW3: read ISR
    assert inb(pic.master, 0) == 0b1010
    outb(pic.master, 0, 0x20)            # non-specific EOI retires IRQ1, the most urgent
    assert inb(pic.master, 0) == 0b1000
    assert not pic.has_pending()         # IRQ3 still blocks IRQ5
    outb(pic.master, 0, 0x20)
    assert pic.acknowledge() == 0x25


def test_pic_specific_eoi_clears_only_that_level() -> None:
    pic = Pic8259Pair()
    pic_init(pic)
    pic.set_irq(4, True)
    pic.acknowledge()
    pic.set_irq(0, True)
    pic.acknowledge()
    outb(pic.master, 0, 0x0B)
    assert inb(pic.master, 0) == 0b10001
    outb(pic.master, 0, 0x60 | 4)        # specific EOI for IRQ4 (not the most urgent one)
    assert inb(pic.master, 0) == 0b00001


def test_pic_ocw3_selects_irr_or_isr_for_reads() -> None:
    pic = Pic8259Pair()
    pic_init(pic)
    outb(pic.master, 1, 0xFF)
    pic.set_irq(6, True)
    assert inb(pic.master, 0) == 0x40    # IRR by default
    outb(pic.master, 0, 0x0B)
    assert inb(pic.master, 0) == 0x00    # ISR
    outb(pic.master, 0, 0x0A)
    assert inb(pic.master, 0) == 0x40    # IRR again


def test_pic_cascade_through_master_irq2() -> None:
    pic = Pic8259Pair()
    pic_init(pic)
    pic.set_irq(12, True)
    assert pic.has_pending()
    assert pic.acknowledge() == 0x2C
    outb(pic.master, 0, 0x0B)
    outb(pic.slave, 0, 0x0B)
    assert inb(pic.master, 0) == 0x04    # IRQ2 in service on the master
    assert inb(pic.slave, 0) == 0x10     # IRQ12 = slave IRQ4
    pic.set_irq(10, True)                # the master's IRQ2 is in service: blocked
    assert not pic.has_pending()
    outb(pic.slave, 0, 0x20)
    assert not pic.has_pending()         # still blocked until the master's EOI too
    outb(pic.master, 0, 0x20)
    assert pic.acknowledge() == 0x2A


def test_pic_two_queued_slave_requests_both_arrive() -> None:
    pic = Pic8259Pair()
    pic_init(pic)
    pic.set_irq(8, True)
    pic.set_irq(8, False)
    pic.set_irq(13, True)
    pic.set_irq(13, False)
    assert pic.acknowledge() == 0x28
    outb(pic.slave, 0, 0x20)
    outb(pic.master, 0, 0x20)
    assert pic.has_pending()             # the slave's output never dropped: still seen
    assert pic.acknowledge() == 0x2D


def test_pic_slave_in_auto_eoi_keeps_its_output_high_and_nothing_is_lost() -> None:
    pic = Pic8259Pair()
    pic_init(pic)
    outb(pic.slave, 0, 0x11)             # re-initialise the slave alone, with auto-EOI
    outb(pic.slave, 1, 0x28)
    outb(pic.slave, 1, 0x02)
    outb(pic.slave, 1, 0x03)
    outb(pic.slave, 1, 0x00)
    pic.set_irq(8, True)
    pic.set_irq(13, True)
    assert pic.acknowledge() == 0x28     # the slave's INT stays high: IRQ13 is still waiting
    outb(pic.master, 0, 0x20)
    assert pic.has_pending()
    assert pic.acknowledge() == 0x2D


def test_pic_master_reinit_still_sees_a_waiting_slave_request() -> None:
    pic = Pic8259Pair()
    pic_init(pic)
    outb(pic.master, 1, 0xFF)
    pic.set_irq(11, True)                # the slave raises INT while the master is masked
    pic.set_irq(5, True)                 # and an edge is latched in the master's IRR
    assert inb(pic.master, 0) == 0x24
    outb(pic.master, 0, 0x11)            # re-initialise the master only
    outb(pic.master, 1, 0x20)
    outb(pic.master, 1, 0x04)
    outb(pic.master, 1, 0x01)
    outb(pic.master, 1, 0x00)
    assert inb(pic.master, 0) == 0x04    # ICW1 reset the edge latch; the cascade is a level
    assert pic.acknowledge() == 0x2B
    outb(pic.slave, 0, 0x20)
    outb(pic.master, 0, 0x20)
    assert not pic.has_pending()         # IRQ5 needs a new rising edge


def test_pic_masked_cascade_blocks_the_slave() -> None:
    pic = Pic8259Pair()
    pic_init(pic)
    outb(pic.master, 1, 0x04)
    pic.set_irq(14, True)
    assert not pic.has_pending()
    outb(pic.master, 1, 0x00)
    assert pic.acknowledge() == 0x2E


def test_pic_spurious_acknowledge_returns_irq7_vector_without_isr() -> None:
    pic = Pic8259Pair()
    pic_init(pic)
    assert pic.acknowledge() == 0x27
    outb(pic.master, 0, 0x0B)
    assert inb(pic.master, 0) == 0


def test_pic_device_cannot_drive_the_cascade_pin() -> None:
    pic = Pic8259Pair()
    pic_init(pic)
    pic.set_irq(2, True)
    assert not pic.has_pending()


def test_pic_auto_eoi_leaves_isr_clear() -> None:
    pic = Pic8259Pair()
    pic_init(pic, icw4=0x03)
    pic.set_irq(3, True)
    assert pic.acknowledge() == 0x23
    outb(pic.master, 0, 0x0B)
    assert inb(pic.master, 0) == 0
    pic.set_irq(4, True)                 # nothing in service blocks a lower priority
    assert pic.acknowledge() == 0x24


def test_pic_level_mode_follows_the_line() -> None:
    pic = Pic8259Pair()
    for chip, base, icw3 in ((pic.master, 0x20, 4), (pic.slave, 0x28, 2)):
        outb(chip, 0, 0x19)              # LTIM
        outb(chip, 1, base)
        outb(chip, 1, icw3)
        outb(chip, 1, 0x01)
        outb(chip, 1, 0x00)
    pic.set_irq(5, True)
    pic.set_irq(5, False)                # gone before INTA: no request
    assert not pic.has_pending()
    pic.set_irq(5, True)
    assert pic.acknowledge() == 0x25
    outb(pic.master, 0, 0x20)
    assert pic.has_pending()             # still high after EOI: requests again
    assert pic.acknowledge() == 0x25


def test_pic_poll_command() -> None:
    pic = Pic8259Pair()
    pic_init(pic)
    outb(pic.master, 0, 0x0C)            # OCW3 poll
    assert inb(pic.master, 0) == 0x00    # nothing pending
    pic.set_irq(6, True)
    outb(pic.master, 0, 0x0C)
    assert inb(pic.master, 0) == 0x86
    outb(pic.master, 0, 0x0B)
    assert inb(pic.master, 0) == 0x40    # the poll read acknowledged it
    assert not pic.has_pending()


def test_pic_special_mask_mode_lets_lower_priorities_through() -> None:
    pic = Pic8259Pair()
    pic_init(pic)
    pic.set_irq(3, True)
    pic.acknowledge()
    pic.set_irq(5, True)
    assert not pic.has_pending()
    outb(pic.master, 1, 0x08)            # mask the one in service ...
    outb(pic.master, 0, 0x68)            # ... and set special mask mode
    assert pic.acknowledge() == 0x25
    pic.set_irq(4, True)                 # 4 outranks 5, the only unmasked one in service
    assert pic.has_pending()
    outb(pic.master, 0, 0x48)            # reset special mask mode: IRQ3 in service blocks again
    assert not pic.has_pending()


def test_pic_bad_accesses_are_ignored() -> None:
    pic = Pic8259Pair()
    pic_init(pic)
    before = pic.state()
    pic.master.write(1, 2, 0x1234)
    pic.master.write(0, 4, 0x11)
    pic.master.write(5, 1, 0x11)
    pic.set_irq(16, True)
    pic.set_irq(-1, True)
    pic.master.set_irq(9, True)
    assert pic.state() == before
    assert pic.master.read(0, 2) == 0
    assert pic.master.read(7, 1) == 0
    assert pic.master.name == "pic-master" and pic.slave.name == "pic-slave"


def test_pic_state_restore_round_trip() -> None:
    pic = Pic8259Pair()
    pic_init(pic)
    pic.set_irq(3, True)
    assert pic.acknowledge() == 0x23     # IRQ3 in service on the master
    pic.set_irq(5, True)                 # waiting behind it
    outb(pic.slave, 0, 0x11)             # the slave is mid-initialisation
    outb(pic.slave, 1, 0x30)
    copy = Pic8259Pair()
    copy.restore(roundtrip(pic.state()))
    assert copy.state() == pic.state()
    for p in (pic, copy):
        assert not p.has_pending()       # IRQ5 is still blocked by IRQ3 in service
        outb(p.slave, 1, 0x02)           # ICW3 and ICW4 are still expected
        outb(p.slave, 1, 0x01)
        outb(p.slave, 1, 0x00)           # then OCW1
        p.set_irq(12, True)
        assert p.acknowledge() == 0x34   # new slave base; IRQ2 outranks IRQ3 in service
        outb(p.slave, 0, 0x20)
        outb(p.master, 0, 0x20)          # retires IRQ2
        outb(p.master, 0, 0x20)          # retires IRQ3
        assert p.acknowledge() == 0x25
    assert copy.state() == pic.state()


# =============================================================================================
# IMCR
# =============================================================================================
def test_imcr_xv6_sequence_switches_to_apic_mode() -> None:
    imcr = Imcr()
    assert not imcr.apic_mode
    outb(imcr, 0, 0x70)                  # outb(0x22, 0x70)
    outb(imcr, 1, inb(imcr, 1) | 1)      # outb(0x23, inb(0x23) | 1)
    assert imcr.apic_mode
    assert inb(imcr, 1) == 1


def test_imcr_other_registers_and_bad_accesses() -> None:
    imcr = Imcr()
    outb(imcr, 0, 0x71)
    outb(imcr, 1, 0xFF)                  # not the IMCR
    assert not imcr.apic_mode
    assert inb(imcr, 1) == 0
    assert inb(imcr, 0) == 0x71
    outb(imcr, 0, 0x70)
    outb(imcr, 1, 0xFE)                  # reserved bits only
    assert not imcr.apic_mode
    assert inb(imcr, 1) == 0
    imcr.write(1, 2, 0x01)
    imcr.write(1, 4, 0x01)
    assert not imcr.apic_mode
    assert imcr.read(1, 2) == 0


def test_imcr_state_restore() -> None:
    imcr = Imcr()
    outb(imcr, 0, 0x70)
    outb(imcr, 1, 1)
    copy = Imcr()
    copy.restore(roundtrip(imcr.state()))
    assert copy.apic_mode
    outb(copy, 1, 0)                     # the selection came along too
    assert not copy.apic_mode


# =============================================================================================
# IOAPIC
# =============================================================================================
@pytest.fixture
def ioapic(enabled_lapic: Lapic) -> Ioapic:
    io = Ioapic(enabled_lapic)
    maxintr, id_ok = xv6_ioapicinit(io)
    assert maxintr == 23 and id_ok
    return io


def test_xv6_ioapicinit_sees_24_pins_and_the_mp_table_id() -> None:
    io = Ioapic(Lapic(VirtualClock()))
    assert ioapicread(io, REG_VER) == hw.IOAPIC_VERSION | (23 << 16)
    maxintr, id_ok = xv6_ioapicinit(io, mp_ioapicid=hw.IOAPIC_ID)
    assert (maxintr, id_ok) == (23, True)
    assert ioapicread(io, REG_ID) == hw.IOAPIC_ID << 24
    for pin in range(24):
        assert ioapicread(io, REG_TABLE + 2 * pin) == INT_DISABLED | (T_IRQ0 + pin)
        assert ioapicread(io, REG_TABLE + 2 * pin + 1) == 0
    other = Ioapic(Lapic(VirtualClock()), ioapic_id=2)
    assert xv6_ioapicinit(other, mp_ioapicid=hw.IOAPIC_ID)[1] is False


def test_ioapic_reset_state_is_masked() -> None:
    lapic = Lapic(VirtualClock())
    enable_only(lapic)
    io = Ioapic(lapic)
    for pin in range(24):
        assert ioapicread(io, REG_TABLE + 2 * pin) & INT_DISABLED
        io.set_irq(pin, True)
    assert lapic.irr == 0


def test_xv6_devices_interrupt_through_the_ioapic(enabled_lapic: Lapic, ioapic: Ioapic) -> None:
    ioapicenable(ioapic, IRQ_KBD, 0)            # consoleinit
    ioapicenable(ioapic, IRQ_COM1, 0)           # uartinit
    ioapicenable(ioapic, IRQ_IDE, 1 - 1)        # ideinit: ncpu - 1 with one CPU
    assert ioapicread(ioapic, REG_TABLE + 2 * IRQ_COM1) == T_IRQ0 + IRQ_COM1
    assert ioapicread(ioapic, REG_TABLE + 2 * IRQ_IDE + 1) == 0
    ioapic.set_irq(IRQ_COM1, True)
    ioapic.set_irq(IRQ_COM1, False)
    ioapic.set_irq(IRQ_IDE, True)
    ioapic.set_irq(3, True)                     # still masked
    assert irr_vectors(enabled_lapic) == [T_IRQ0 + IRQ_COM1, T_IRQ0 + IRQ_IDE]
    assert enabled_lapic.has_pending()
    assert enabled_lapic.acknowledge() == T_IRQ0 + IRQ_IDE   # higher vector first
    xv6_lapiceoi(enabled_lapic)
    assert enabled_lapic.acknowledge() == T_IRQ0 + IRQ_COM1
    xv6_lapiceoi(enabled_lapic)
    assert not enabled_lapic.has_pending()


def test_ioapic_edge_needs_a_rising_edge(enabled_lapic: Lapic, ioapic: Ioapic) -> None:
    ioapicenable(ioapic, 5, 0)
    ioapic.set_irq(5, True)
    assert enabled_lapic.acknowledge() == 37
    xv6_lapiceoi(enabled_lapic)
    ioapic.set_irq(5, True)                     # still high: no new edge
    assert enabled_lapic.irr == 0
    ioapic.set_irq(5, False)
    ioapic.set_irq(5, True)
    assert irr_vectors(enabled_lapic) == [37]
    # edge entries never set remote IRR, and their EOI is not forwarded (TMR clear)
    assert not ioapicread(ioapic, REG_TABLE + 10) & REMOTE_IRR
    assert enabled_lapic.tmr == 0


def test_ioapic_edge_while_masked_is_lost(enabled_lapic: Lapic, ioapic: Ioapic) -> None:
    ioapic.set_irq(5, True)                     # masked by ioapicinit
    ioapicenable(ioapic, 5, 0)
    assert enabled_lapic.irr == 0
    ioapic.set_irq(5, False)
    ioapic.set_irq(5, True)
    assert irr_vectors(enabled_lapic) == [37]


def test_ioapic_level_remote_irr_and_eoi(enabled_lapic: Lapic, ioapic: Ioapic) -> None:
    lapic = enabled_lapic
    ioapicwrite(ioapic, REG_TABLE + 2 * 9, INT_LEVEL | 0x49)
    ioapicwrite(ioapic, REG_TABLE + 2 * 9 + 1, 0)
    ioapic.set_irq(9, True)
    assert irr_vectors(lapic) == [0x49]
    assert lapic.read(TMR0 + 0x20, 4) == 1 << (0x49 - 64)       # level: TMR bit set
    assert ioapicread(ioapic, REG_TABLE + 18) & REMOTE_IRR
    assert lapic.acknowledge() == 0x49
    ioapic.set_irq(9, True)                     # still asserted, remote IRR set: no new message
    assert lapic.irr == 0
    xv6_lapiceoi(lapic)                         # EOI -> IOAPIC: remote IRR clears, still high
    assert not lapic.isr >> 0x49 & 1
    assert irr_vectors(lapic) == [0x49]         # so it is sent again
    assert ioapicread(ioapic, REG_TABLE + 18) & REMOTE_IRR
    assert lapic.acknowledge() == 0x49
    ioapic.set_irq(9, False)                    # device deasserts before the EOI
    xv6_lapiceoi(lapic)
    assert lapic.irr == 0
    assert not ioapicread(ioapic, REG_TABLE + 18) & REMOTE_IRR
    ioapic.set_irq(9, True)
    assert irr_vectors(lapic) == [0x49]


class RecordingLapic:
    """Stands in for the LAPIC where a test needs to see every message the IOAPIC sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, bool]] = []
        self.eoi_hooks: list = []

    def accepts_destination(self, destination: int, logical: bool) -> bool:
        return destination == 0 and not logical

    def accept_interrupt(self, vector: int, level_triggered: bool = False) -> bool:
        self.sent.append((vector, level_triggered))
        return True

    def on_level_eoi(self, callback) -> None:
        self.eoi_hooks.append(callback)


def test_ioapic_eoi_only_touches_matching_vectors() -> None:
    lapic = RecordingLapic()
    io = Ioapic(lapic)                          # type: ignore[arg-type]
    assert lapic.eoi_hooks == [io.end_of_interrupt]
    ioapicwrite(io, REG_TABLE + 2 * 9, INT_LEVEL | 0x49)
    ioapicwrite(io, REG_TABLE + 2 * 10, INT_LEVEL | 0x4A)
    io.set_irq(9, True)
    io.set_irq(10, True)
    assert lapic.sent == [(0x49, True), (0x4A, True)]
    io.end_of_interrupt(0x4A)
    assert lapic.sent[2:] == [(0x4A, True)]                # pin 10 re-sent (still high)
    assert ioapicread(io, REG_TABLE + 18) & REMOTE_IRR     # pin 9 untouched
    io.end_of_interrupt(0x33)                              # no pin has it: nothing happens
    assert len(lapic.sent) == 3


def test_ioapic_unmasking_an_asserted_level_pin_delivers(enabled_lapic: Lapic, ioapic: Ioapic) -> None:
    ioapicwrite(ioapic, REG_TABLE + 2 * 9, INT_DISABLED | INT_LEVEL | 0x49)
    ioapic.set_irq(9, True)
    assert enabled_lapic.irr == 0
    ioapicwrite(ioapic, REG_TABLE + 2 * 9, INT_LEVEL | 0x49)
    assert irr_vectors(enabled_lapic) == [0x49]


def test_ioapic_read_only_bits(enabled_lapic: Lapic, ioapic: Ioapic) -> None:
    ioapicwrite(ioapic, REG_TABLE + 2 * 9, INT_LEVEL | REMOTE_IRR | 0x1000 | 0x49)
    assert ioapicread(ioapic, REG_TABLE + 18) == INT_LEVEL | 0x49   # remote IRR, delivery status
    ioapic.set_irq(9, True)
    assert enabled_lapic.acknowledge() == 0x49
    ioapicwrite(ioapic, REG_TABLE + 2 * 9, INT_LEVEL | 0x49)     # rewrite: remote IRR survives
    assert ioapicread(ioapic, REG_TABLE + 18) & REMOTE_IRR
    assert enabled_lapic.irr == 0                                # so no second message
    ioapicwrite(ioapic, REG_TABLE + 2 * 9, 0x49)                 # to edge: remote IRR cleared
    assert not ioapicread(ioapic, REG_TABLE + 18) & REMOTE_IRR
    ioapicwrite(ioapic, REG_TABLE + 19, 0xFFFFFFFF)
    assert ioapicread(ioapic, REG_TABLE + 19) == 0xFF000000
    ioapicwrite(ioapic, REG_VER, 0)
    ioapicwrite(ioapic, 0x02, 0x0F000000)
    assert ioapicread(ioapic, REG_VER) == hw.IOAPIC_VERSION | (23 << 16)
    assert ioapicread(ioapic, 0x02) == hw.IOAPIC_ID << 24
    ioapicwrite(ioapic, REG_ID, 0x0A00_0000)
    assert ioapicread(ioapic, REG_ID) == 0x0A00_0000
    assert ioapicread(ioapic, 0x02) == 0x0A00_0000
    ioapic.write(0x00, 4, 0x13)
    assert ioapic.read(0x00, 4) == 0x13


@pytest.mark.parametrize("low, high, delivered", [
    (0x40, 0 << 24, True),                       # physical, our APIC ID
    (0x40, 1 << 24, False),                      # physical, another CPU
    (0x40, 0xFF << 24, True),                    # physical broadcast
    (INT_LOGICAL | 0x40, 0xFF << 24, True),      # logical broadcast
    (INT_LOGICAL | 0x40, 0x01 << 24, False),     # logical: our LDR is 0 after reset
    (0x100 | 0x40, 0, True),                     # lowest priority: we are the lowest
    (0x400 | 0x40, 0, False),                    # NMI: not modelled
    (0x500 | 0x40, 0, False),                    # INIT
    (0x700 | 0x40, 0, False),                    # ExtINT
])
def test_ioapic_destination_and_delivery_mode(enabled_lapic: Lapic, ioapic: Ioapic,
                                              low: int, high: int, delivered: bool) -> None:
    ioapicwrite(ioapic, REG_TABLE + 2 * 7, low)
    ioapicwrite(ioapic, REG_TABLE + 2 * 7 + 1, high)
    ioapic.set_irq(7, True)
    assert (irr_vectors(enabled_lapic) == [0x40]) is delivered


def test_ioapic_logical_destination_uses_the_ldr(enabled_lapic: Lapic, ioapic: Ioapic) -> None:
    lapicw(enabled_lapic, LDR, 0x02 << 24)      # flat model (DFR reset 0xFFFFFFFF), bit 1
    ioapicwrite(ioapic, REG_TABLE + 2 * 7, INT_LOGICAL | 0x40)
    ioapicwrite(ioapic, REG_TABLE + 2 * 7 + 1, 0x01 << 24)
    ioapic.set_irq(7, True)
    assert enabled_lapic.irr == 0
    ioapicwrite(ioapic, REG_TABLE + 2 * 7 + 1, 0x03 << 24)
    ioapic.set_irq(7, False)
    ioapic.set_irq(7, True)
    assert irr_vectors(enabled_lapic) == [0x40]


def test_ioapic_bad_accesses_are_ignored(enabled_lapic: Lapic, ioapic: Ioapic) -> None:
    before = ioapic.state()
    ioapic.write(0x10, 2, 0xFFFF)               # IOWIN is 32-bit only
    ioapic.write(0x10, 1, 0xFF)
    ioapic.write(0x04, 4, 0x12)                 # nothing there
    ioapic.write(0x20, 4, 0)
    ioapic.set_irq(24, True)
    ioapic.set_irq(-1, True)
    assert ioapic.state() == before
    assert ioapic.read(0x10, 1) == 0
    assert ioapic.read(0x40, 4) == 0
    for reg in (0x03, 0x0F, REG_TABLE + 48, 0xFF):
        assert ioapicread(ioapic, reg) == 0
        ioapicwrite(ioapic, reg, 0xFFFFFFFF)
    assert ioapic.state().low == before.low and ioapic.state().high == before.high
    assert enabled_lapic.irr == 0


def test_ioapic_state_restore_round_trip(clock: VirtualClock) -> None:
    def build() -> tuple[Lapic, Ioapic]:
        lapic = Lapic(clock)
        enable_only(lapic)
        return lapic, Ioapic(lapic)

    lapic, io = build()
    ioapicwrite(io, REG_TABLE + 2 * 9, INT_LEVEL | 0x49)
    ioapicenable(io, 4, 0)
    io.set_irq(9, True)
    assert lapic.acknowledge() == 0x49
    io.write(0x00, 4, 0x13)
    lapic2, io2 = build()
    lapic2.restore(roundtrip(lapic.state()))
    io2.restore(roundtrip(io.state()))
    assert io2.state() == io.state()
    assert io2.read(0x00, 4) == 0x13
    io2.set_irq(9, True)                       # remote IRR came along: no second message
    assert lapic2.irr == 0
    lapic2.write(EOI, 4, 0)                     # TMR came along: EOI reaches the new IOAPIC
    assert irr_vectors(lapic2) == [0x49]
    io2.set_irq(4, True)                        # the edge pin is enabled in the copy too
    assert irr_vectors(lapic2) == [T_IRQ0 + 4, 0x49]


# =============================================================================================
# Local APIC: registers
# =============================================================================================
def test_lapic_id_and_version(clock: VirtualClock) -> None:
    lapic = Lapic(clock)
    assert lapic.read(ID, 4) == 0 and lapic.id_register_value == 0
    other = Lapic(clock, apic_id=3)
    assert other.read(ID, 4) == 3 << 24 == other.id_register_value
    assert other.read(ID + 3, 1) == 3           # byte read of the ID's top byte
    other.write(ID, 4, 7 << 24)                 # read-only here
    assert other.read(ID, 4) == 3 << 24
    ver = lapic.read(VER, 4)
    assert ver & 0xFF == hw.LAPIC_VERSION
    assert (ver >> 16) & 0xFF == 5              # xv6 masks PCINT only if >= 4


def test_lapic_id_read_takes_the_fast_path(lapic: Lapic, monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(offset: int) -> int:
        raise AssertionError("the ID read went through the general register decoder")
    monkeypatch.setattr(lapic, "_read_register", slow)
    assert lapic.read(ID, 4) == 0


def test_lapic_reset_state(lapic: Lapic) -> None:
    assert lapic.read(SVR, 4) == 0xFF
    for reg in (TIMER, 0x330, PCINT, LINT0, LINT1, ERROR):
        assert lapic.read(reg, 4) == MASKED
    assert lapic.read(DFR, 4) == 0xFFFFFFFF
    assert lapic.read(TPR, 4) == 0 and lapic.read(TICR, 4) == 0 and lapic.read(TCCR, 4) == 0
    assert lapic.next_deadline_ns() is None
    lapic.accept_interrupt(0x40)                # accepted into IRR, but the LAPIC is disabled
    assert irr_vectors(lapic) == [0x40]
    assert not lapic.has_pending()
    assert lapic.acknowledge() == 0xFF          # the spurious vector from the SVR
    assert isr_vectors(lapic) == []


def test_xv6_lapicinit_leaves_the_documented_state(clock: VirtualClock) -> None:
    clock.advance(123)
    lapic = Lapic(clock)
    xv6_lapicinit(lapic)
    assert lapic.read(SVR, 4) == 0x13F
    assert lapic.read(TDCR, 4) == 0xB
    assert lapic.read(TIMER, 4) == PERIODIC | 32
    assert lapic.read(TICR, 4) == 10_000_000
    assert lapic.read(TCCR, 4) == 10_000_000
    assert lapic.read(LINT0, 4) == MASKED and lapic.read(LINT1, 4) == MASKED
    assert lapic.read(PCINT, 4) == MASKED
    assert lapic.read(ERROR, 4) == 51
    assert lapic.read(ESR, 4) == 0
    assert lapic.read(ICRLO, 4) == BCAST | INIT | LEVEL      # DELIVS clear: the poll ends
    assert lapic.read(TPR, 4) == 0 and lapic.read(PPR, 4) == 0
    assert lapic.irr == 0 and lapic.isr == 0    # the INIT de-assert broadcast was a no-op
    assert not lapic.has_pending()
    assert lapic.next_deadline_ns() == 123 + TICKS


def test_lapic_register_masks(lapic: Lapic) -> None:
    enable_only(lapic)
    lapicw(lapic, TPR, 0xFFFF)
    assert lapic.read(TPR, 4) == 0xFF
    lapicw(lapic, LDR, 0xFFFFFFFF)
    assert lapic.read(LDR, 4) == 0xFF000000
    lapicw(lapic, DFR, 0)
    assert lapic.read(DFR, 4) == 0x0FFFFFFF
    lapicw(lapic, SVR, 0xFFFFFFFF)
    assert lapic.read(SVR, 4) == 0x3FF
    lapicw(lapic, TIMER, 0xFFFFFFFF)
    assert lapic.read(TIMER, 4) == 0x300FF
    lapicw(lapic, LINT0, 0xFFFFFFFF)
    assert lapic.read(LINT0, 4) == 0x1A7FF
    lapicw(lapic, ERROR, 0xFFFFFFFF)
    assert lapic.read(ERROR, 4) == 0x100FF
    lapicw(lapic, TDCR, 0xFFFFFFFF)
    assert lapic.read(TDCR, 4) == 0xB
    lapicw(lapic, ICRHI, 0xFFFFFFFF)
    assert lapic.read(ICRHI, 4) == 0xFF000000
    lapicw(lapic, ICRLO, 0xFFFFFFFF)            # an ExtINT IPI to all but self: goes nowhere
    assert lapic.read(ICRLO, 4) == 0xCCFFF       # delivery status and reserved bits read 0
    assert lapic.irr == 0


def test_lapic_software_disable_masks_every_lvt(enabled_lapic: Lapic) -> None:
    lapic = enabled_lapic
    lapicw(lapic, SVR, 0x3F)                    # clear ENABLE
    for reg in (TIMER, 0x330, PCINT, LINT0, LINT1, ERROR):
        assert lapic.read(reg, 4) & MASKED
    lapicw(lapic, TIMER, PERIODIC | 32)         # cannot unmask while disabled
    assert lapic.read(TIMER, 4) == MASKED | PERIODIC | 32
    lapic.accept_interrupt(0x40)
    assert not lapic.has_pending()              # disabled: IRR held, nothing delivered
    lapicw(lapic, SVR, 0x13F)
    assert lapic.has_pending()                  # re-enabled: the held request goes out
    assert lapic.read(TIMER, 4) & MASKED        # but the LVTs stay masked until rewritten


def test_lapic_bad_accesses_do_not_raise(enabled_lapic: Lapic) -> None:
    lapic = enabled_lapic
    before = lapic.state()
    lapic.write(TPR + 1, 4, 0xFF)               # misaligned
    lapic.write(TPR, 2, 0xFF)                   # narrow
    lapic.write(TPR, 8, 0xFF)
    lapic.write(0x20 + 4, 4, 1)                 # padding inside the ID slot
    lapic.write(PPR, 4, 0xFF)                   # read-only registers: silently ignored
    lapic.write(IRR0 + 0x10, 4, 0xFFFFFFFF)
    lapic.write(TCCR, 4, 5)
    lapic.write(VER, 4, 0)
    assert lapic.state() == before
    assert lapic.read(TPR, 8) == 0
    assert lapic.read(TPR + 2, 4) == 0
    assert lapic.read(ID + 8, 4) == 0
    assert lapic.read(SVR + 1, 1) == 0x01       # byte 1 of SVR 0x13F
    assert lapic.read(SVR, 2) == 0x13F
    assert lapic.read(EOI, 4) == 0


def test_lapic_unknown_register_latches_an_error_and_signals_it(enabled_lapic: Lapic) -> None:
    lapic = enabled_lapic                       # xv6 put the error LVT at vector 51
    assert lapic.read(0x2F0, 4) == 0            # CMCI LVT: absent with max LVT 5
    assert lapic.read(ESR, 4) == 0              # not visible until the next ESR write
    lapicw(lapic, ESR, 0)
    assert lapic.read(ESR, 4) == 0x80           # illegal register address
    lapicw(lapic, ESR, 0)
    assert lapic.read(ESR, 4) == 0              # back-to-back writes clear
    assert irr_vectors(lapic) == [T_IRQ0 + IRQ_ERROR]
    lapic.write(0xFF0, 4, 1)                    # an unknown write latches it too
    lapicw(lapic, ESR, 0)
    assert lapic.read(ESR, 4) == 0x80


def test_lapic_masked_error_lvt_only_latches(lapic: Lapic) -> None:
    enable_only(lapic)
    lapic.accept_interrupt(3)                   # illegal vector
    assert lapic.irr == 0
    lapic.write(ESR, 4, 0)
    assert lapic.read(ESR, 4) == 0x40           # receive illegal vector


def test_lapic_error_lvt_with_illegal_vector_does_not_recurse(lapic: Lapic) -> None:
    enable_only(lapic)
    lapicw(lapic, ERROR, 2)
    lapic.accept_interrupt(1)
    lapic.write(ESR, 4, 0)
    assert lapic.read(ESR, 4) == 0x40 and lapic.irr == 0


# =============================================================================================
# Local APIC: priorities, acknowledge, EOI
# =============================================================================================
def test_lapic_higher_class_preempts_and_eoi_retires_highest_first(lapic: Lapic) -> None:
    enable_only(lapic)
    lapic.accept_interrupt(0x30)
    assert lapic.acknowledge() == 0x30
    assert lapic.read(PPR, 4) == 0x30
    lapic.accept_interrupt(0x35)                # same class as the one in service: waits
    assert not lapic.has_pending()
    lapic.accept_interrupt(0x50)                # higher class: preempts
    assert lapic.has_pending()
    assert lapic.acknowledge() == 0x50
    assert isr_vectors(lapic) == [0x30, 0x50]
    assert lapic.read(PPR, 4) == 0x50
    lapicw(lapic, EOI, 0)
    assert isr_vectors(lapic) == [0x30]
    assert not lapic.has_pending()              # 0x35 still blocked by 0x30's class
    lapicw(lapic, EOI, 0)
    assert lapic.read(PPR, 4) == 0
    assert lapic.acknowledge() == 0x35
    lapicw(lapic, EOI, 0)
    lapicw(lapic, EOI, 0)                       # an extra EOI with nothing in service: harmless
    assert lapic.isr == 0 and lapic.irr == 0


def test_lapic_highest_vector_is_taken_first(lapic: Lapic) -> None:
    enable_only(lapic)
    for vector in (0x41, 0x92, 0x47, 0x91):
        lapic.accept_interrupt(vector)
    assert lapic.acknowledge() == 0x92
    assert not lapic.has_pending()              # the rest are in 0x92's class or below
    assert irr_vectors(lapic) == [0x41, 0x47, 0x91]
    taken = []
    for _ in range(3):
        lapicw(lapic, EOI, 0)
        taken.append(lapic.acknowledge())
    assert taken == [0x91, 0x47, 0x41]


def test_lapic_tpr_blocks_classes_at_or_below_it(lapic: Lapic) -> None:
    enable_only(lapic)
    lapicw(lapic, TPR, 0x45)
    lapic.accept_interrupt(0x4F)
    assert lapic.read(PPR, 4) == 0x45
    assert not lapic.has_pending()
    assert lapic.acknowledge() == 0xFF          # spurious, nothing moved
    assert irr_vectors(lapic) == [0x4F]
    lapic.accept_interrupt(0x50)
    assert lapic.acknowledge() == 0x50
    assert lapic.read(PPR, 4) == 0x50           # in-service class above the TPR's
    lapicw(lapic, EOI, 0)
    lapicw(lapic, TPR, 0)
    assert lapic.acknowledge() == 0x4F


def test_lapic_apr(lapic: Lapic) -> None:
    enable_only(lapic)
    lapicw(lapic, TPR, 0x35)
    assert lapic.read(APR, 4) == 0x35
    lapic.accept_interrupt(0x61)
    assert lapic.read(APR, 4) == 0x60


def test_lapic_isr_irr_tmr_registers(lapic: Lapic) -> None:
    enable_only(lapic)
    lapic.accept_interrupt(0x41, level_triggered=True)
    lapic.accept_interrupt(0xFF)
    assert lapic.read(IRR0 + 0x20, 4) == 1 << 1
    assert lapic.read(IRR0 + 0x70, 4) == 1 << 31
    assert lapic.read(TMR0 + 0x20, 4) == 1 << 1
    assert lapic.read(TMR0 + 0x70, 4) == 0
    lapic.acknowledge()
    assert lapic.read(ISR0 + 0x70, 4) == 1 << 31
    assert lapic.read(IRR0 + 0x70, 4) == 0


def test_lapic_level_eoi_calls_back_edge_does_not(lapic: Lapic) -> None:
    enable_only(lapic)
    seen: list[int] = []
    lapic.on_level_eoi(seen.append)
    lapic.on_level_eoi(seen.append)            # registering twice does not double the calls
    lapic.accept_interrupt(0x40, level_triggered=True)
    lapic.acknowledge()
    lapicw(lapic, EOI, 0)
    assert seen == [0x40]
    lapic.accept_interrupt(0x40)                # now edge: TMR cleared at acceptance
    lapic.acknowledge()
    lapicw(lapic, EOI, 0)
    assert seen == [0x40]


# =============================================================================================
# Local APIC: IPIs
# =============================================================================================
@pytest.mark.parametrize("icr_low, icr_high, delivered", [
    (0x40 | (1 << 18), 0, True),               # shorthand: self
    (0x40 | (2 << 18), 0, True),               # all including self
    (0x40 | (3 << 18), 0, False),              # all excluding self: nobody
    (0x40, 0 << 24, True),                     # physical destination = our ID
    (0x40, 1 << 24, False),                    # another (absent) CPU
    (0x40, 0xFF << 24, True),                  # broadcast
    (0x40 | 0x100, 0, True),                   # lowest priority to us
    (0x40 | 0x400 | (2 << 18), 0, False),      # NMI: not modelled
    (INIT | ASSERT | LEVEL, 1 << 24, False),   # xv6's lapicstartap sequence to CPU 1
    (STARTUP | 0x07, 1 << 24, False),
    (INIT | ASSERT | LEVEL | (2 << 18), 0, False),
])
def test_lapic_ipis(lapic: Lapic, icr_low: int, icr_high: int, delivered: bool) -> None:
    enable_only(lapic)
    lapicw(lapic, ICRHI, icr_high)
    lapicw(lapic, ICRLO, icr_low)
    assert not lapic.read(ICRLO, 4) & DELIVS
    assert (irr_vectors(lapic) == [0x40]) is delivered
    if not delivered:
        assert lapic.irr == 0


def test_lapic_self_ipi_level_sets_tmr(lapic: Lapic) -> None:
    enable_only(lapic)
    lapicw(lapic, ICRLO, 0x40 | LEVEL | ASSERT | (1 << 18))
    assert lapic.tmr >> 0x40 & 1


def test_lapic_ipi_with_illegal_vector_is_an_error(lapic: Lapic) -> None:
    enable_only(lapic)
    lapicw(lapic, ICRLO, 0x05 | (1 << 18))
    assert lapic.irr == 0
    lapicw(lapic, ESR, 0)
    assert lapic.read(ESR, 4) == 0x20          # send illegal vector


def test_lapic_cluster_logical_destination(lapic: Lapic) -> None:
    lapicw(lapic, DFR, 0x0FFFFFFF)             # cluster model
    lapicw(lapic, LDR, 0x21 << 24)             # cluster 2, member bit 0
    assert lapic.accepts_destination(0x21, logical=True)
    assert lapic.accepts_destination(0x23, logical=True)
    assert not lapic.accepts_destination(0x11, logical=True)
    assert not lapic.accepts_destination(0x22, logical=True)
    assert lapic.accepts_destination(0xFF, logical=True)


# =============================================================================================
# Local APIC: timer
# =============================================================================================
def test_timer_fires_after_ten_million_ns(clock: VirtualClock, enabled_lapic: Lapic) -> None:
    lapic = enabled_lapic
    assert lapic.next_deadline_ns() == TICKS
    lapic.poll(TICKS - 1)
    assert lapic.irr == 0 and lapic.timer_interrupts_raised == 0
    lapic.poll(TICKS)
    assert irr_vectors(lapic) == [TIMER_VECTOR]
    assert lapic.timer_interrupts_raised == 1
    assert lapic.last_timer_expiry_ns == TICKS
    assert lapic.has_pending()
    assert lapic.acknowledge() == TIMER_VECTOR


def test_timer_periodic_repeats_on_its_phase(clock: VirtualClock, enabled_lapic: Lapic) -> None:
    lapic = enabled_lapic
    for n in range(1, 6):
        late = 12_345 * n                       # the run loop polls a little late each time
        lapic.poll(n * TICKS + late)
        assert lapic.acknowledge() == TIMER_VECTOR
        xv6_lapiceoi(lapic)
        assert lapic.last_timer_expiry_ns == n * TICKS
        assert lapic.next_deadline_ns() == (n + 1) * TICKS
    assert lapic.timer_interrupts_raised == 5


def test_timer_one_shot_fires_once(clock: VirtualClock, lapic: Lapic) -> None:
    enable_only(lapic)
    lapicw(lapic, TDCR, X1)
    lapicw(lapic, TIMER, 0x40)                  # one-shot
    clock.advance(1000)
    lapicw(lapic, TICR, 5000)
    assert lapic.next_deadline_ns() == 6000
    lapic.poll(6000)
    assert lapic.acknowledge() == 0x40
    lapicw(lapic, EOI, 0)
    assert lapic.next_deadline_ns() is None
    clock.advance(100_000)
    lapic.poll(clock.now_ns())
    assert lapic.irr == 0 and lapic.timer_interrupts_raised == 1
    assert lapic.read(TCCR, 4) == 0
    assert lapic.read(TICR, 4) == 5000          # TICR keeps its value
    lapicw(lapic, TIMER, PERIODIC | 0x40)       # switching mode does not restart an expired one
    assert lapic.next_deadline_ns() is None and lapic.read(TCCR, 4) == 0


def test_timer_masked_does_not_fire(clock: VirtualClock, lapic: Lapic) -> None:
    enable_only(lapic)
    lapicw(lapic, TDCR, X1)
    lapicw(lapic, TIMER, MASKED | PERIODIC | 0x40)
    lapicw(lapic, TICR, 1000)
    assert lapic.next_deadline_ns() is None     # nothing for the run loop to wake up for
    for _ in range(10):
        clock.advance(250)
        lapic.poll(clock.now_ns())
    assert lapic.irr == 0 and lapic.timer_interrupts_raised == 0
    assert clock.now_ns() == 2500               # 2.5 periods in: unmask
    assert lapic.read(TCCR, 4) == 500           # it kept counting
    lapicw(lapic, TIMER, PERIODIC | 0x40)
    assert lapic.irr == 0                       # the expiries while masked are lost
    assert lapic.next_deadline_ns() == 3000     # and the phase is the original one
    lapic.poll(3000)
    assert irr_vectors(lapic) == [0x40]


def test_timer_expiry_due_before_masking_is_delivered(clock: VirtualClock, lapic: Lapic) -> None:
    enable_only(lapic)
    lapicw(lapic, TDCR, X1)
    lapicw(lapic, TIMER, 0x40)
    lapicw(lapic, TICR, 1000)
    clock.advance(1500)                         # due at 1000, not polled yet
    lapicw(lapic, TIMER, MASKED | 0x40)
    assert irr_vectors(lapic) == [0x40]


def test_timer_expiry_due_before_a_restart_is_delivered(clock: VirtualClock, lapic: Lapic) -> None:
    enable_only(lapic)
    lapicw(lapic, TDCR, X1)
    lapicw(lapic, TIMER, 0x40)
    lapicw(lapic, TICR, 1000)
    clock.advance(1500)                         # due at 1000, not polled yet
    lapicw(lapic, TICR, 1000)                   # restart
    assert irr_vectors(lapic) == [0x40]
    assert lapic.next_deadline_ns() == 2500


def test_timer_expiry_due_before_software_disable_is_held(clock: VirtualClock, lapic: Lapic) -> None:
    enable_only(lapic)
    lapicw(lapic, TDCR, X1)
    lapicw(lapic, TIMER, 0x40)
    lapicw(lapic, TICR, 1000)
    clock.advance(1500)
    lapicw(lapic, SVR, 0xFF)                    # disable: the due expiry happened before
    assert irr_vectors(lapic) == [0x40]
    assert not lapic.has_pending()


def test_timer_tccr_counts_down(clock: VirtualClock, enabled_lapic: Lapic) -> None:
    lapic = enabled_lapic
    assert lapic.read(TCCR, 4) == TICKS
    clock.advance(2_500_000)
    assert lapic.read(TCCR, 4) == 7_500_000
    clock.advance(TICKS)                        # 1.25 periods, not polled: already reloaded
    assert lapic.read(TCCR, 4) == 7_500_000
    clock.advance(7_499_999)
    assert lapic.read(TCCR, 4) == 1
    clock.advance(1)
    assert lapic.read(TCCR, 4) == TICKS         # reload at the expiry instant


def test_timer_missed_periods_collapse_into_one_interrupt(enabled_lapic: Lapic) -> None:
    lapic = enabled_lapic
    lapic.poll(5 * TICKS + TICKS // 2)
    assert irr_vectors(lapic) == [TIMER_VECTOR]
    assert lapic.timer_interrupts_raised == 1
    assert lapic.last_timer_expiry_ns == 5 * TICKS
    assert lapic.next_deadline_ns() == 6 * TICKS
    lapic.poll(6 * TICKS - 1)
    assert lapic.timer_interrupts_raised == 1


@pytest.mark.parametrize("tdcr, divisor", [
    (0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32), (0x9, 64), (0xA, 128), (0xB, 1),
])
def test_timer_divide_configuration(clock: VirtualClock, lapic: Lapic, tdcr: int, divisor: int) -> None:
    assert divisor_of(tdcr) == divisor
    enable_only(lapic)
    lapicw(lapic, TDCR, tdcr)
    lapicw(lapic, TIMER, 0x40)
    clock.advance(77)
    lapicw(lapic, TICR, 1000)
    assert lapic.next_deadline_ns() == 77 + 1000 * divisor
    clock.advance(100 * divisor)
    assert lapic.read(TCCR, 4) == 900
    lapic.poll(77 + 1000 * divisor - 1)
    assert lapic.irr == 0
    lapic.poll(77 + 1000 * divisor)
    assert irr_vectors(lapic) == [0x40]


def test_timer_divide_change_mid_count_applies_to_the_rest(clock: VirtualClock, lapic: Lapic) -> None:
    enable_only(lapic)
    lapicw(lapic, TDCR, X1)
    lapicw(lapic, TIMER, 0x40)
    lapicw(lapic, TICR, 1000)
    clock.advance(400)                          # 600 counts to go
    lapicw(lapic, TDCR, 0x0)                    # now 2 ns per count
    assert lapic.read(TCCR, 4) == 600
    assert lapic.next_deadline_ns() == 400 + 1200


def test_timer_ticr_zero_stops_and_rewrite_restarts(clock: VirtualClock, enabled_lapic: Lapic) -> None:
    lapic = enabled_lapic
    clock.advance(3_000_000)
    lapicw(lapic, TICR, 0)
    assert lapic.next_deadline_ns() is None and lapic.read(TCCR, 4) == 0
    lapic.poll(5 * TICKS)
    assert lapic.irr == 0
    clock.advance(1_000_000)
    lapicw(lapic, TICR, TICKS)                  # restarts from now, not from the old phase
    assert lapic.next_deadline_ns() == 4_000_000 + TICKS


def test_timer_poll_before_the_deadline_does_no_work(enabled_lapic: Lapic,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def expensive(now_ns: int) -> int:
        raise AssertionError("poll computed counts although nothing was due")
    monkeypatch.setattr(enabled_lapic, "_counts_since_start", expensive)
    enabled_lapic.poll(TICKS - 1)
    assert enabled_lapic.irr == 0


def test_timer_with_illegal_vector_raises_nothing(clock: VirtualClock, lapic: Lapic) -> None:
    enable_only(lapic)
    lapicw(lapic, TIMER, 0x05)
    lapicw(lapic, TICR, 10)
    lapic.poll(10_000)
    assert lapic.irr == 0 and lapic.timer_interrupts_raised == 0


def test_timer_follows_the_bus_frequency(clock: VirtualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hw, "LAPIC_BUS_HZ", 100_000_000)   # 10 ns per count at divide-by-1
    lapic = Lapic(clock)
    xv6_lapicinit(lapic)
    assert lapic.next_deadline_ns() == 10 * TICKS
    clock.advance(25)
    assert lapic.read(TCCR, 4) == TICKS - 2


# =============================================================================================
# ExtINT: the 8259 behind the local APIC
# =============================================================================================
def test_extint_passes_the_pic_while_the_lapic_is_disabled(clock: VirtualClock) -> None:
    pic = Pic8259Pair()
    lapic = Lapic(clock, pic=pic)
    pic_init(pic)
    assert not lapic.has_pending()
    pic.set_irq(1, True)
    assert lapic.has_pending()
    assert lapic.acknowledge() == 0x21
    outb(pic.master, 0, 0x0B)
    assert inb(pic.master, 0) == 0x02           # the PIC saw the INTA


def test_extint_closed_after_xv6_lapicinit_and_reopened_by_lint0(clock: VirtualClock) -> None:
    pic = Pic8259Pair()
    lapic = Lapic(clock, pic=pic)
    pic_init(pic)
    xv6_lapicinit(lapic)
    pic.set_irq(1, True)
    assert not lapic.has_pending()              # LINT0 masked: the virtual wire is cut
    assert lapic.acknowledge() == 0x3F          # spurious vector from SVR 0x13F
    lapicw(lapic, LINT0, 0x700)                 # unmasked, delivery mode ExtINT
    assert lapic.has_pending()
    assert lapic.acknowledge() == 0x21
    outb(pic.master, 0, 0x20)
    lapicw(lapic, LINT0, 0x000)                 # fixed mode: not the virtual wire
    pic.set_irq(3, True)
    assert not lapic.has_pending()


def test_extint_goes_before_the_apics_own_vectors(clock: VirtualClock) -> None:
    pic = Pic8259Pair()
    lapic = Lapic(clock, pic=pic)
    pic_init(pic)
    enable_only(lapic)
    lapicw(lapic, LINT0, 0x700)
    lapic.accept_interrupt(0xE0)
    pic.set_irq(0, True)
    assert lapic.acknowledge() == 0x20
    assert lapic.acknowledge() == 0xE0


def test_no_pic_means_no_extint(lapic: Lapic) -> None:
    assert not lapic.has_pending()
    assert lapic.acknowledge() == 0xFF


# =============================================================================================
# Snapshots
# =============================================================================================
def test_lapic_state_restore_round_trip(clock: VirtualClock, enabled_lapic: Lapic) -> None:
    lapic = enabled_lapic
    seen_original: list[int] = []
    lapic.on_level_eoi(seen_original.append)
    lapic.poll(TICKS)
    lapic.accept_interrupt(0x60, level_triggered=True)
    assert lapic.acknowledge() == 0x60
    lapicw(lapic, TPR, 0x10)
    lapic.read(0x2F0, 4)                        # an error pending in the latch
    clock.advance(TICKS + 2_000_000)
    state = lapic.state()
    assert roundtrip(state) == state            # plain msgpack values only

    copy = Lapic(clock)
    seen_copy: list[int] = []
    copy.on_level_eoi(seen_copy.append)
    copy.restore(roundtrip(state))
    assert copy.state() == state
    for l in (lapic, copy):
        assert l.read(TCCR, 4) == 8_000_000
        assert l.next_deadline_ns() == 2 * TICKS
        assert l.timer_interrupts_raised == 1 and l.last_timer_expiry_ns == TICKS
        assert not l.has_pending()              # 0x60 in service blocks the timer's class
        lapicw(l, EOI, 0)
        lapicw(l, ESR, 0)
        assert l.read(ESR, 4) == 0x80
        assert l.acknowledge() == T_IRQ0 + IRQ_ERROR   # the error LVT signalled the bad read
        lapicw(l, EOI, 0)
        assert l.acknowledge() == TIMER_VECTOR
        l.poll(2 * TICKS)
        assert l.timer_interrupts_raised == 2
    assert seen_original == seen_copy == [0x60]
    assert copy.state() == lapic.state()


def test_lapic_restore_keeps_extint_wiring(clock: VirtualClock) -> None:
    pic = Pic8259Pair()
    pic_init(pic)
    source = Lapic(clock)
    xv6_lapicinit(source)
    lapic = Lapic(clock, pic=pic)               # disabled: virtual wire open
    lapic.restore(source.state())               # enabled, LINT0 masked: wire cut
    pic.set_irq(1, True)
    assert not lapic.has_pending()
