//! The few machine instructions Rust has no words for: port I/O, interrupt flag, CR3, halt.

use core::arch::asm;

pub fn outb(port: u16, value: u8) {
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) }
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack)) }
    value
}

pub fn inw(port: u16) -> u16 {
    let value: u16;
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") value, options(nomem, nostack)) }
    value
}

/// Read a 32-bit memory-mapped device register (the LAPIC and IOAPIC are reached this way).
pub fn mmio_read(address: u64) -> u32 {
    unsafe { core::ptr::read_volatile(address as *const u32) }
}

pub fn mmio_write(address: u64, value: u32) {
    unsafe { core::ptr::write_volatile(address as *mut u32, value) }
}

/// Interrupts off; returns whether they were on, for `restore_interrupts`. The kernel has one
/// CPU, so "interrupts off" is its only lock.
pub fn disable_interrupts() -> bool {
    let flags: u64;
    unsafe { asm!("pushfq; pop {}; cli", out(reg) flags, options(nomem)) }
    flags & (1 << 9) != 0
}

pub fn restore_interrupts(were_on: bool) {
    if were_on {
        unsafe { asm!("sti", options(nomem, nostack)) }
    }
}

/// Wait for the next interrupt with interrupts on (`sti; hlt` is atomic: none slips between).
pub fn wait_for_interrupt() {
    unsafe { asm!("sti; hlt", options(nomem, nostack)) }
}

pub fn read_cr3() -> u64 {
    let value: u64;
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack)) }
    value
}

pub fn write_cr3(value: u64) {
    unsafe { asm!("mov cr3, {}", in(reg) value, options(nostack)) }
}

/// What `lgdt` and `lidt` load: a descriptor table's size (minus one) and address.
#[repr(C, packed)]
pub struct TablePointer {
    pub limit: u16,
    pub base: u64,
}
