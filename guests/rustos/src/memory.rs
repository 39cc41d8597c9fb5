//! Physical pages and address spaces.
//!
//! The kernel lives in the boot page tables (boot.rs): the first 1 GiB mapped one-to-one with
//! 2 MiB pages, kernel-only. A user task gets its own top-level table (its own CR3) that shares
//! the kernel's first entry -- so the kernel keeps running after a switch -- and adds, under
//! entry 1, the user's pages at USER_BASE (512 GiB) as 4 KiB pages with the user bit set. Ring-3
//! code cannot touch the kernel's pages (no user bit there), nor another task's (not mapped).

use crate::x86::read_cr3;

pub const PAGE: u64 = 4096;
pub const USER_BASE: u64 = 0x80_0000_0000;          // PML4 entry 1
pub const USER_PAGES: u64 = 16;                      // 64 KiB of user space per task
pub const USER_STACK_TOP: u64 = USER_BASE + USER_PAGES * PAGE;
const PRESENT: u64 = 1;
const WRITABLE: u64 = 2;
const USER: u64 = 4;

extern "C" {
    static __bss_end: u8;
}

static mut NEXT_FREE: u64 = 0;

/// One zeroed 4 KiB page of physical memory (= its kernel address: memory is mapped 1:1).
/// Pages are never given back: a teaching kernel runs few tasks.
pub fn alloc_page() -> u64 {
    unsafe {
        if NEXT_FREE == 0 {
            NEXT_FREE = (&raw const __bss_end as u64 + PAGE - 1) & !(PAGE - 1);
        }
        let page = NEXT_FREE;
        NEXT_FREE += PAGE;
        core::ptr::write_bytes(page as *mut u8, 0, PAGE as usize);
        page
    }
}

fn table(physical: u64) -> &'static mut [u64; 512] {
    unsafe { &mut *(physical as *mut [u64; 512]) }
}

/// A new address space holding `code` at USER_BASE and a stack below USER_STACK_TOP; returns
/// its CR3. Each level of the walk to a user page must have the user bit set.
pub fn new_user_space(code: &[u8]) -> u64 {
    let pml4 = alloc_page();
    let kernel_pml4 = table(read_cr3() & !0xFFF);
    table(pml4)[0] = kernel_pml4[0];                 // the kernel, supervisor-only
    let pdpt = alloc_page();
    let pd = alloc_page();
    let pt = alloc_page();
    table(pml4)[1] = pdpt | PRESENT | WRITABLE | USER;
    table(pdpt)[0] = pd | PRESENT | WRITABLE | USER;
    table(pd)[0] = pt | PRESENT | WRITABLE | USER;
    for i in 0..USER_PAGES as usize {
        let page = alloc_page();
        table(pt)[i] = page | PRESENT | WRITABLE | USER;
        let offset = i * PAGE as usize;
        if offset < code.len() {
            let chunk = &code[offset..code.len().min(offset + PAGE as usize)];
            unsafe { core::ptr::copy_nonoverlapping(chunk.as_ptr(), page as *mut u8, chunk.len()) }
        }
    }
    pml4
}

/// `len` bytes of the current user space at `address`, or None if any is outside it. The
/// kernel reads them through the user's own mapping (the current CR3).
pub fn user_bytes(address: u64, len: u64) -> Option<&'static [u8]> {
    if address < USER_BASE || address.checked_add(len)? > USER_STACK_TOP {
        return None;
    }
    Some(unsafe { core::slice::from_raw_parts(address as *const u8, len as usize) })
}
