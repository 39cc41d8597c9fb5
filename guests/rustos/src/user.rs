//! The ring-3 program. It is position-independent machine code (it is copied to USER_BASE in
//! its own address space), so it is written in assembly: it greets through SYS_WRITE, then
//! computes -- ROUNDS rounds of ITERATIONS xorshift steps, all in registers, so that the
//! timer must preempt it in the middle of pure ring-3 computation -- reporting each finished
//! round with SYS_PROGRESS, and exits with the final value.

use crate::gdt::{USER_CODE, USER_DATA};
use crate::memory::{self, USER_BASE, USER_STACK_TOP};
use crate::task;
use core::arch::{asm, global_asm};

global_asm!(
    r#"
    .section .rodata
    .global user_program, user_program_end
user_program:                      # rdi: rounds, rsi: iterations per round
    movq %rdi, %r14
    movq %rsi, %r15
    leaq greeting(%rip), %rdi
    movq $greeting_end - greeting, %rsi
    movq $1, %rax                  # SYS_WRITE
    int $0x80
    xorq %r12, %r12                # rounds done
    movq $0x2545F4914F6CDD1D, %r13 # the value
round:
    movq %r15, %rcx
step:                              # xorshift64: x ^= x << 13; x ^= x >> 7; x ^= x << 17
    movq %r13, %rax
    shlq $13, %rax
    xorq %rax, %r13
    movq %r13, %rax
    shrq $7, %rax
    xorq %rax, %r13
    movq %r13, %rax
    shlq $17, %rax
    xorq %rax, %r13
    decq %rcx
    jnz step
    incq %r12
    movq %r12, %rdi
    movq %r13, %rsi
    movq $2, %rax                  # SYS_PROGRESS
    int $0x80
    cmpq %r14, %r12
    jb round
    movq %r13, %rdi
    movq $3, %rax                  # SYS_EXIT
    int $0x80
greeting:
    .ascii "user: hello from ring 3\n"
greeting_end:
user_program_end:
"#,
    options(att_syntax)
);

extern "C" {
    static user_program: u8;
    static user_program_end: u8;
}

/// Rounds and iterations of the user program, packed in one task argument.
pub fn start(rounds: u32, iterations: u32) -> Option<usize> {
    let code = unsafe {
        let start = &raw const user_program;
        let len = &raw const user_program_end as usize - start as usize;
        core::slice::from_raw_parts(start, len)
    };
    let cr3 = memory::new_user_space(code);
    task::spawn("user", enter_ring3, (rounds as u64) << 32 | iterations as u64, cr3)
}

/// The user task's kernel half: drop to ring 3 at the program's start with `iretq`, which pops
/// RIP, CS, RFLAGS, RSP and SS -- user selectors, interrupts on (IF), the user stack.
fn enter_ring3(arg: u64) {
    unsafe {
        asm!(
            "push {ss}", "push {rsp}", "push {rflags}", "push {cs}", "push {rip}", "iretq",
            ss = in(reg) USER_DATA as u64, rsp = in(reg) USER_STACK_TOP,
            rflags = in(reg) 0x202u64, cs = in(reg) USER_CODE as u64, rip = in(reg) USER_BASE,
            in("rdi") arg >> 32, in("rsi") arg & 0xFFFF_FFFF,
            options(noreturn)
        )
    }
}
