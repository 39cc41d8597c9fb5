//! Segments in long mode: the GDT holds kernel and user code/data descriptors and the TSS. The
//! TSS's only job here is `rsp0`: the kernel stack the CPU switches to when an interrupt or a
//! system call arrives from ring 3 (the scheduler sets it to the running task's stack).

use core::arch::asm;
use crate::x86::TablePointer;
use core::mem::size_of;

pub const KERNEL_CODE: u16 = 0x08;
pub const USER_DATA: u16 = 0x18 | 3;     // RPL 3
pub const USER_CODE: u16 = 0x20 | 3;
const TSS_SELECTOR: u16 = 0x28;

#[repr(C, packed)]
pub struct Tss {
    reserved0: u32,
    pub rsp0: u64,
    rsp1: u64,
    rsp2: u64,
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

pub static mut TSS: Tss = Tss {
    reserved0: 0, rsp0: 0, rsp1: 0, rsp2: 0, reserved1: 0, ist: [0; 7], reserved2: 0,
    reserved3: 0, iomap_base: size_of::<Tss>() as u16,   // no I/O permission bitmap
};

static mut GDT: [u64; 7] = [
    0,
    0x00209A0000000000,     // 0x08 kernel code: present, DPL 0, long mode (L)
    0x0000920000000000,     // 0x10 kernel data
    0x0000F20000000000,     // 0x18 user data: DPL 3
    0x0020FA0000000000,     // 0x20 user code: DPL 3, long mode
    0, 0,                   // 0x28 the TSS: a 16-byte system descriptor, filled in by init
];

pub fn init() {
    unsafe {
        let base = &raw const TSS as u64;
        let limit = (size_of::<Tss>() - 1) as u64;
        GDT[5] = limit & 0xFFFF
            | (base & 0xFF_FFFF) << 16
            | 0x89 << 40                      // present, type 9: available 64-bit TSS
            | (base >> 24 & 0xFF) << 56;
        GDT[6] = base >> 32;
        let pointer = TablePointer { limit: (size_of::<[u64; 7]>() - 1) as u16, base: &raw const GDT as u64 };
        asm!("lgdt [{}]", in(reg) &pointer, options(readonly, nostack));
        asm!("ltr {0:x}", in(reg) TSS_SELECTOR, options(nostack));
    }
}

pub fn set_kernel_stack(top: u64) {
    unsafe { TSS.rsp0 = top }
}
