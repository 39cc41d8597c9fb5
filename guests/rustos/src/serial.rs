//! COM1, the 16550 UART: the kernel's console. Output polls the transmitter; input arrives by
//! interrupt (IRQ 4, routed by the IOAPIC to vector 36) into a small ring buffer.

use crate::x86::{disable_interrupts, inb, outb, restore_interrupts};
use core::fmt;

const COM1: u16 = 0x3F8;
const DATA: u16 = COM1;
const IER: u16 = COM1 + 1;          // interrupt enable
const FCR: u16 = COM1 + 2;          // FIFO control
const LCR: u16 = COM1 + 3;          // line control
const MCR: u16 = COM1 + 4;          // modem control (OUT2 gates the IRQ line on a PC)
const LSR: u16 = COM1 + 5;          // line status
const LSR_DATA_READY: u8 = 0x01;
const LSR_TX_EMPTY: u8 = 0x20;

pub fn init() {
    outb(IER, 0x00);
    outb(LCR, 0x80);                // divisor latch: 115200 baud
    outb(DATA, 0x01);
    outb(IER, 0x00);
    outb(LCR, 0x03);                // 8 bits, no parity, one stop bit
    outb(FCR, 0x00);                // no FIFO: one interrupt per byte keeps it simple
    outb(MCR, 0x08);                // OUT2: let the UART drive its interrupt line
    outb(IER, 0x01);                // interrupt when a byte has arrived
}

pub fn putc(byte: u8) {
    while inb(LSR) & LSR_TX_EMPTY == 0 {}
    outb(DATA, byte);
}

// ---------------------------------------------------------------- input
const INPUT_SIZE: usize = 128;
static mut INPUT: [u8; INPUT_SIZE] = [0; INPUT_SIZE];
static mut INPUT_HEAD: usize = 0;   // next byte to read
static mut INPUT_TAIL: usize = 0;   // next free slot

/// The COM1 interrupt: move every received byte into the ring buffer (interrupts are off).
pub fn interrupt() {
    while inb(LSR) & LSR_DATA_READY != 0 {
        let byte = inb(DATA);
        unsafe {
            if INPUT_TAIL - INPUT_HEAD < INPUT_SIZE {
                INPUT[INPUT_TAIL % INPUT_SIZE] = byte;
                INPUT_TAIL += 1;
            }
        }
    }
}

/// The next typed byte, if one is waiting.
pub fn getc() -> Option<u8> {
    let were_on = disable_interrupts();
    let byte = unsafe {
        if INPUT_HEAD == INPUT_TAIL {
            None
        } else {
            INPUT_HEAD += 1;
            Some(INPUT[(INPUT_HEAD - 1) % INPUT_SIZE])
        }
    };
    restore_interrupts(were_on);
    byte
}

pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for byte in text.bytes() {
            if byte == b'\n' {
                putc(b'\r');
            }
            putc(byte);
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write;
        // Whole lines: a task preempted halfway through would interleave its output.
        let were_on = $crate::x86::disable_interrupts();
        let _ = write!($crate::serial::Console, $($arg)*);
        $crate::x86::restore_interrupts(were_on);
    }};
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{ $crate::print!($($arg)*); $crate::print!("\n"); }};
}
