//! Tasks and the round-robin scheduler.
//!
//! Every task has its own kernel stack. Switching tasks is switching stacks: `switch_stacks`
//! pushes the callee-saved registers on the old stack, saves its RSP, loads the new task's RSP
//! and pops. The timer interrupt calls `preempt` on the interrupted task's stack, so a task
//! taken off the CPU in the middle of anything (even ring-3 code: its registers are in the
//! trap frame further up that stack) resumes exactly there when it is switched back to.

use crate::{gdt, println, x86};
use core::arch::global_asm;

const MAX_TASKS: usize = 8;
const STACK_SIZE: usize = 16 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum State {
    Free,
    Runnable,
    Done,
}

#[derive(Clone, Copy)]
pub struct Task {
    pub state: State,
    pub name: &'static str,
    rsp: u64,              // saved while the task is off the CPU
    cr3: u64,              // its address space (kernel tasks: the boot page tables)
    entry: fn(u64),
    arg: u64,
    pub preempted: u64,         // timer ticks that took the CPU from it
    pub preempted_in_user: u64, // ... while it ran ring-3 code
}

static mut TASKS: [Task; MAX_TASKS] = [Task {
    state: State::Free, name: "", rsp: 0, cr3: 0, entry: idle, arg: 0, preempted: 0, preempted_in_user: 0,
}; MAX_TASKS];
static mut CURRENT: usize = 0;
static mut STACKS: [[u8; STACK_SIZE]; MAX_TASKS] = [[0; STACK_SIZE]; MAX_TASKS];
pub static mut TICKS: u64 = 0;

fn idle(_: u64) {}

global_asm!(
    r#"
    .text
    .global switch_stacks
switch_stacks:                  # (rdi: where to save the old RSP, rsi: the new RSP)
    push %rbp
    push %rbx
    push %r12
    push %r13
    push %r14
    push %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbx
    pop %rbp
    ret
"#,
    options(att_syntax)
);

extern "C" {
    fn switch_stacks(save_rsp: *mut u64, new_rsp: u64);
}

fn stack_top(slot: usize) -> u64 {
    unsafe { &raw const STACKS[slot] as u64 + STACK_SIZE as u64 }
}

/// The task running now becomes task 0 (the shell: it runs on the boot stack).
pub fn init(name: &'static str) {
    unsafe {
        TASKS[0].state = State::Runnable;
        TASKS[0].name = name;
        TASKS[0].cr3 = x86::read_cr3();
    }
}

/// Start `entry(arg)` as a new task in address space `cr3` (0: the kernel's). It first runs
/// `task_start`, from a stack made to look as if it had called `switch_stacks` itself.
pub fn spawn(name: &'static str, entry: fn(u64), arg: u64, cr3: u64) -> Option<usize> {
    let were_on = x86::disable_interrupts();
    let slot = unsafe { TASKS.iter().position(|t| t.state == State::Free || t.state == State::Done) };
    if let Some(slot) = slot {
        unsafe {
            let top = stack_top(slot) as *mut u64;
            let frame = top.sub(8);              // 6 callee-saved registers, a return address
            for i in 0..6 {
                *frame.add(i) = 0;
            }
            *frame.add(6) = task_start as *const () as u64;
            TASKS[slot] = Task {
                state: State::Runnable, name, rsp: frame as u64,
                cr3: if cr3 == 0 { TASKS[0].cr3 } else { cr3 },
                entry, arg, preempted: 0, preempted_in_user: 0,
            };
        }
    }
    x86::restore_interrupts(were_on);
    slot
}

/// A new task's first code: interrupts on (switches happen with them off), run, finish.
extern "C" fn task_start() -> ! {
    let (entry, arg) = unsafe { (TASKS[CURRENT].entry, TASKS[CURRENT].arg) };
    x86::restore_interrupts(true);
    entry(arg);
    exit();
}

pub fn exit() -> ! {
    x86::disable_interrupts();
    unsafe { TASKS[CURRENT].state = State::Done }
    schedule();
    unreachable!("a finished task was scheduled");
}

pub fn current() -> &'static mut Task {
    unsafe { &mut TASKS[CURRENT] }
}

pub fn task(slot: usize) -> Task {
    unsafe { TASKS[slot] }
}

pub fn tasks() -> [Task; MAX_TASKS] {
    unsafe { TASKS }
}

/// The timer interrupt, before `preempt`: count the tick, and whose time it took.
pub fn tick(from_user: bool) {
    unsafe {
        TICKS += 1;
        TASKS[CURRENT].preempted += 1;
        if from_user {
            TASKS[CURRENT].preempted_in_user += 1;
        }
    }
}

pub fn ticks() -> u64 {
    unsafe { core::ptr::read_volatile(&raw const TICKS) }
}

/// From the timer interrupt (interrupts off): give the CPU to the next runnable task.
pub fn preempt() {
    schedule();
}

/// Give up the CPU voluntarily (a task waiting for something).
pub fn yield_now() {
    let were_on = x86::disable_interrupts();
    schedule();
    x86::restore_interrupts(were_on);
}

/// Is any task other than the current one runnable?
pub fn others_runnable() -> bool {
    unsafe { TASKS.iter().enumerate().any(|(i, t)| i != CURRENT && t.state == State::Runnable) }
}

/// Round robin: the next runnable task after the current one. Interrupts must be off.
fn schedule() {
    unsafe {
        let old = CURRENT;
        let next = (1..=MAX_TASKS)
            .map(|i| (old + i) % MAX_TASKS)
            .find(|&i| TASKS[i].state == State::Runnable)
            .unwrap_or_else(|| panic!("no runnable task"));
        if next == old {
            return;
        }
        CURRENT = next;
        gdt::set_kernel_stack(stack_top(next));   // where ring 3 traps into, for this task
        if TASKS[next].cr3 != TASKS[old].cr3 {
            x86::write_cr3(TASKS[next].cr3);
        }
        switch_stacks(&raw mut TASKS[old].rsp, TASKS[next].rsp);
    }
}

pub fn list() {
    for (i, t) in tasks().iter().enumerate() {
        if t.state == State::Runnable {
            println!("task {}: {} (preempted {} times)", i, t.name, t.preempted);
        }
    }
}
