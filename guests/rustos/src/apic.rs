//! The interrupt controllers: the local APIC (our CPU's: its timer drives the scheduler) and
//! the I/O APIC (routes device lines, here COM1's IRQ 4, to the CPU). The old 8259 PICs are
//! masked. A teaching kernel may take the addresses as fixed: they are the PC's defaults, and
//! the MP table replayvm's machine offers (boot/mptable.py) says the same.

use crate::trap::{COM1_VECTOR, SPURIOUS_VECTOR, TIMER_VECTOR};
use crate::x86::{mmio_read, mmio_write, outb};

const LAPIC: u64 = 0xFEE0_0000;
const LAPIC_ID: u64 = 0x20;
const LAPIC_TPR: u64 = 0x80;            // task priority: 0 accepts every interrupt
const LAPIC_EOI: u64 = 0xB0;
const LAPIC_SVR: u64 = 0xF0;            // spurious vector register; bit 8 enables the APIC
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INITIAL: u64 = 0x380;
const LAPIC_TIMER_DIVIDE: u64 = 0x3E0;
const TIMER_PERIODIC: u32 = 1 << 17;
const DIVIDE_BY_16: u32 = 0x3;

const IOAPIC: u64 = 0xFEC0_0000;
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const IOAPIC_REDIRECTION: u32 = 0x10;   // two 32-bit registers per pin from here
const COM1_IRQ: u32 = 4;

/// The timer's input clock is the APIC bus clock (1 GHz on QEMU and KVM's model); divided by
/// 16 and counted down from this it interrupts every 10 ms: 100 scheduler ticks a second.
pub const TIMER_HZ: u32 = 100;
const TIMER_COUNT: u32 = 1_000_000_000 / 16 / TIMER_HZ;

fn lapic_write(register: u64, value: u32) {
    mmio_write(LAPIC + register, value);
}

fn ioapic_write(register: u32, value: u32) {
    mmio_write(IOAPIC + IOREGSEL, register);
    mmio_write(IOAPIC + IOWIN, value);
}

pub fn init() {
    outb(0x21, 0xFF);                   // mask every 8259 line: the APICs deliver instead
    outb(0xA1, 0xFF);
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR as u32);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_TIMER_DIVIDE, DIVIDE_BY_16);
    lapic_write(LAPIC_LVT_TIMER, TIMER_PERIODIC | TIMER_VECTOR as u32);
    lapic_write(LAPIC_TIMER_INITIAL, TIMER_COUNT);
    // COM1: edge-triggered, active high, fixed delivery to APIC 0 (this CPU), unmasked.
    let cpu = mmio_read(LAPIC + LAPIC_ID) >> 24;
    ioapic_write(IOAPIC_REDIRECTION + 2 * COM1_IRQ, COM1_VECTOR as u32);
    ioapic_write(IOAPIC_REDIRECTION + 2 * COM1_IRQ + 1, cpu << 24);
}

pub fn end_of_interrupt() {
    lapic_write(LAPIC_EOI, 0);
}
