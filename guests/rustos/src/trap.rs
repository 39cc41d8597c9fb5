//! Interrupts, exceptions and system calls: the IDT, one small assembly stub per vector that
//! saves the registers into a `TrapFrame`, and `trap`, which decides what each one means.

use crate::gdt::KERNEL_CODE;
use crate::x86::TablePointer;
use crate::{apic, println, serial, syscall, task};
use core::arch::{asm, global_asm};

pub const TIMER_VECTOR: u64 = 32;
pub const COM1_VECTOR: u64 = 36;         // IOAPIC pin 4 (COM1's IRQ) is routed here
pub const SPURIOUS_VECTOR: u64 = 255;
pub const SYSCALL_VECTOR: u64 = 0x80;
const INVALID_OPCODE: u64 = 6;
const PAGE_FAULT: u64 = 14;

/// The registers of the interrupted code, as the stubs and the CPU left them on the stack.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub r15: u64, pub r14: u64, pub r13: u64, pub r12: u64,
    pub r11: u64, pub r10: u64, pub r9: u64, pub r8: u64,
    pub rbp: u64, pub rdi: u64, pub rsi: u64, pub rdx: u64,
    pub rcx: u64, pub rbx: u64, pub rax: u64,
    pub vector: u64,
    pub error: u64,       // the CPU's error code, or 0 from the stub
    // Pushed by the CPU:
    pub rip: u64, pub cs: u64, pub rflags: u64, pub rsp: u64, pub ss: u64,
}

impl TrapFrame {
    pub fn from_user(&self) -> bool {
        self.cs & 3 == 3
    }
}

// The stubs: push a zero where the CPU pushes no error code, push the vector, save the general
// registers and call `trap` with a pointer to them; then restore and `iretq`.
global_asm!(
    r#"
    .macro stub vector, has_error
    .global trap_stub_\vector
trap_stub_\vector:
    .if \has_error == 0
    push $0
    .endif
    push $\vector
    jmp trap_common
    .endm

    .text
    .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,128,255
    stub \v, 0
    .endr
    .irp v, 8,10,11,12,13,14,17,21,29,30
    stub \v, 1
    .endr

trap_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    movq %rsp, %rdi
    cld
    call trap
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    addq $16, %rsp                   # the vector and the error code
    iretq

    .section .rodata
    .balign 8
    .global trap_stubs
trap_stubs:                          # (vector, stub address) pairs, ended by a zero address
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,128,255
    .quad \v, trap_stub_\v
    .endr
    .quad 0, 0
"#,
    options(att_syntax)
);

extern "C" {
    static trap_stubs: [[u64; 2]; 51];
}

/// A 16-byte long-mode gate: handler address, code segment, type and the lowest ring allowed
/// to raise it with `int`.
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    options: u16,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

static mut IDT: [Gate; 256] = [Gate { offset_low: 0, selector: 0, options: 0, offset_mid: 0, offset_high: 0, reserved: 0 }; 256];

pub fn init() {
    unsafe {
        for &[vector, handler] in trap_stubs.iter() {
            if handler == 0 {
                break;
            }
            // An interrupt gate (type 0xE) turns interrupts off on entry: the handlers share
            // the kernel's data with the tasks, and interrupts off is the kernel's lock.
            let dpl = if vector == SYSCALL_VECTOR { 3 } else { 0 };   // ring 3 may `int 0x80`
            IDT[vector as usize] = Gate {
                offset_low: handler as u16,
                selector: KERNEL_CODE,
                options: 0x8E00 | dpl << 13,
                offset_mid: (handler >> 16) as u16,
                offset_high: (handler >> 32) as u32,
                reserved: 0,
            };
        }
        let pointer = TablePointer { limit: (core::mem::size_of::<[Gate; 256]>() - 1) as u16, base: &raw const IDT as u64 };
        asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack));
    }
}

/// Is this #UD really a system call? On PVM (the KVM of replayvm's build machines) the guest
/// kernel itself runs in the hardware's ring 3, and an `int 0x80` executed by our ring-3 code
/// does not go through the IDT: it arrives as an invalid-opcode exception (#UD) with RIP still
/// on the `int` instruction. So: a #UD from ring 3 whose bytes are `cd 80` (int 0x80) is the
/// system call, and RIP must step over those two bytes by hand. Elsewhere (QEMU, real hardware,
/// replayvm's emu engine) `int 0x80` reaches vector 0x80 directly and this path is never taken.
fn is_int80_as_ud(frame: &TrapFrame) -> bool {
    frame.from_user()
        && crate::memory::user_bytes(frame.rip, 2).map_or(false, |bytes| bytes == [0xCD, 0x80])
}

#[no_mangle]
extern "C" fn trap(frame: &mut TrapFrame) {
    match frame.vector {
        TIMER_VECTOR => {
            task::tick(frame.from_user());
            apic::end_of_interrupt();
            task::preempt();                 // the timer is what makes scheduling preemptive
        }
        COM1_VECTOR => {
            serial::interrupt();
            apic::end_of_interrupt();
        }
        SPURIOUS_VECTOR => {}
        SYSCALL_VECTOR => syscall::dispatch(frame),
        INVALID_OPCODE if is_int80_as_ud(frame) => {
            frame.rip += 2;                  // step over `int 0x80`, as the CPU would have
            syscall::dispatch(frame);
        }
        PAGE_FAULT if frame.from_user() => {
            let address: u64;
            unsafe { asm!("mov {}, cr2", out(reg) address, options(nomem, nostack)) }
            println!("user: page fault at {:#x} (rip {:#x}): task killed", address, frame.rip);
            task::exit();
        }
        _ => {
            let cr2: u64;
            unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) }
            panic!("trap {} error {:#x} cr2 {:#x}\n{:#x?}", frame.vector, frame.error, cr2, frame);
        }
    }
}
