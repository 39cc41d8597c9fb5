//! The IDE disk, by programmed I/O: the simplest way to read a sector. Tell the controller
//! which sector (28-bit LBA), ask it to read, wait until it has the data, then take the 256
//! 16-bit words from its data port. Its interrupt is turned off (nIEN): we poll the status.

use crate::x86::{inb, inw, outb};

const DATA: u16 = 0x1F0;
const SECTOR_COUNT: u16 = 0x1F2;
const LBA_LOW: u16 = 0x1F3;
const LBA_MID: u16 = 0x1F4;
const LBA_HIGH: u16 = 0x1F5;
const DRIVE: u16 = 0x1F6;
const STATUS_COMMAND: u16 = 0x1F7;
const CONTROL: u16 = 0x3F6;
const STATUS_BUSY: u8 = 0x80;
const STATUS_DRQ: u8 = 0x08;        // data request: the sector is ready to be read
const STATUS_ERROR: u8 = 0x01;
const COMMAND_READ: u8 = 0x20;
const NO_INTERRUPT: u8 = 0x02;

pub fn read_sector(lba: u32, buffer: &mut [u8; 512]) -> Result<(), u8> {
    outb(CONTROL, NO_INTERRUPT);
    while inb(STATUS_COMMAND) & STATUS_BUSY != 0 {}
    outb(DRIVE, 0xE0 | (lba >> 24 & 0x0F) as u8);   // master, LBA mode
    outb(SECTOR_COUNT, 1);
    outb(LBA_LOW, lba as u8);
    outb(LBA_MID, (lba >> 8) as u8);
    outb(LBA_HIGH, (lba >> 16) as u8);
    outb(STATUS_COMMAND, COMMAND_READ);
    loop {
        let status = inb(STATUS_COMMAND);
        if status & STATUS_ERROR != 0 {
            return Err(status);
        }
        if status & STATUS_BUSY == 0 && status & STATUS_DRQ != 0 {
            break;
        }
    }
    for pair in buffer.chunks_exact_mut(2) {
        pair.copy_from_slice(&inw(DATA).to_le_bytes());
    }
    Ok(())
}
