//! rustos: replayvm's teaching kernel in Rust, for x86-64.
//!
//! What happens, in order (kernel_main): the loader (multiboot) starts boot.rs in 32-bit mode,
//! which switches to 64-bit long mode; then the GDT and TSS (gdt.rs), the IDT (trap.rs), the
//! serial console (serial.rs), the interrupt controllers and the timer (apic.rs). From then on
//! the timer interrupts 100 times a second and the scheduler (task.rs) switches between tasks:
//! this shell, the race tasks, and a ring-3 task in its own address space (memory.rs, user.rs)
//! that talks to the kernel by system calls (syscall.rs). The shell reads COM1 input and
//! commands the rest; `disk` reads a sector of the IDE disk (ide.rs).
//!
//! One CPU, no heap, no crates beyond `core`: every piece is small enough to read in one go.

#![no_std]
#![no_main]
#![allow(static_mut_refs)]   // one CPU: shared statics are guarded by turning interrupts off

mod apic;
mod boot;
mod gdt;
mod ide;
mod memory;
mod serial;
mod syscall;
mod task;
mod trap;
mod user;
mod x86;

use core::ptr::{read_volatile, write_volatile};

#[no_mangle]
extern "C" fn kernel_main() -> ! {
    gdt::init();
    trap::init();
    serial::init();
    println!("rustos: long mode, 64-bit");
    task::init("shell");
    apic::init();
    x86::restore_interrupts(true);
    println!("rustos: LAPIC timer at {} Hz, COM1 input on IOAPIC pin 4", apic::TIMER_HZ);
    calibrate_race();
    shell();
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    x86::disable_interrupts();
    println!("rustos: PANIC: {}", info);
    loop {
        x86::outb(0x501, 1);     // QEMU's isa-debug-exit when present; then stop for good
        unsafe { core::arch::asm!("cli; hlt") }
    }
}

// ---------------------------------------------------------------- the race
//
// Two kernel tasks add 1 to a shared counter many times, with no lock: each increment is a
// load, a short delay, a store. When the timer preempts a task between its load and its store,
// the other task's increments made meanwhile are overwritten when the first one stores its
// stale value: LOST UPDATES. Whether that happens depends only on where the timer ticks land.

const RACE_WINDOW: u32 = 2;      // delay between the load and the store
const RACE_PAUSE: u32 = 40;      // delay outside the window
const RACE_TICKS: u64 = 3;       // each task runs for about this many timer ticks
static mut RACE_ITERATIONS: u64 = 1000;
static mut RACE_COUNTER: u64 = 0;
static mut RACE_DONE: u64 = 0;

fn delay(n: u32) {
    for i in 0..n {
        core::hint::black_box(i);
    }
}

#[inline(never)]
fn race_step(counter: *mut u64) {
    unsafe {
        let value = read_volatile(counter);
        delay(RACE_WINDOW);
        write_volatile(counter, value + 1);
    }
    delay(RACE_PAUSE);
}

fn race_task(_: u64) {
    for _ in 0..unsafe { RACE_ITERATIONS } {
        race_step(&raw mut RACE_COUNTER);
    }
    let were_on = x86::disable_interrupts();
    unsafe { RACE_DONE += 1 }
    x86::restore_interrupts(were_on);
}

/// How many race steps fit in one timer tick on this CPU (emulated or not), so the race spans
/// a few ticks whatever the speed and preemptions happen inside it.
fn calibrate_race() {
    let mut scratch = 0u64;
    let start = task::ticks();
    while task::ticks() == start {
        x86::wait_for_interrupt();
    }
    let start = task::ticks();
    let mut n = 0u64;
    while task::ticks() == start {
        race_step(&mut scratch);
        n += 1;
    }
    unsafe { RACE_ITERATIONS = (n * RACE_TICKS).clamp(1000, 50_000_000) }
    println!("race: {} iterations per task (about {} timer ticks)", unsafe { RACE_ITERATIONS }, RACE_TICKS);
}

fn race() {
    unsafe {
        RACE_COUNTER = 0;
        RACE_DONE = 0;
    }
    task::spawn("race-a", race_task, 0, 0);
    task::spawn("race-b", race_task, 0, 0);
    while unsafe { read_volatile(&raw const RACE_DONE) } < 2 {
        task::yield_now();
    }
    let (counter, expected) = unsafe { (RACE_COUNTER, 2 * RACE_ITERATIONS) };
    println!("race: counter={} expected={}", counter, expected);
    println!("{}", if counter == expected { "race: ok" } else { "race: LOST UPDATES" });
}

// ---------------------------------------------------------------- the shell

const LINE_MAX: usize = 80;

/// Wait for a typed byte: let the other tasks run meanwhile, or sleep until an interrupt.
fn getc() -> u8 {
    loop {
        if let Some(byte) = serial::getc() {
            return byte;
        }
        if task::others_runnable() {
            task::yield_now();
        } else {
            x86::wait_for_interrupt();
        }
    }
}

fn read_line(line: &mut [u8; LINE_MAX]) -> &str {
    let mut n: usize = 0;
    loop {
        match getc() {
            b'\r' | b'\n' => break,
            0x08 | 0x7F if n > 0 => {
                print!("\x08 \x08");            // erase the last character
                n -= 1;
            }
            byte if n < LINE_MAX => {
                print!("{}", byte as char);      // echo what is typed
                line[n] = byte;
                n += 1;
            }
            _ => {}
        }
    }
    print!("\n");
    core::str::from_utf8(&line[..n]).unwrap_or("")
}

fn number(text: &str, default: u32) -> u32 {
    text.trim().parse().unwrap_or(default)
}

fn disk() {
    let mut sector = [0u8; 512];
    match ide::read_sector(1, &mut sector) {
        Ok(()) => {
            let end = sector.iter().position(|&b| b == 0).unwrap_or(64).min(64);
            println!("disk: sector 1: {}", core::str::from_utf8(&sector[..end]).unwrap_or("?"));
        }
        Err(status) => println!("disk: error, status {:#x}", status),
    }
}

/// `user [ROUNDS [ITERATIONS]]`: run the ring-3 program and wait for it to finish.
fn user(args: &str) {
    let mut words = args.split_whitespace();
    let rounds = number(words.next().unwrap_or(""), 20);
    let iterations = number(words.next().unwrap_or(""), 100_000);
    let Some(slot) = user::start(rounds, iterations) else {
        println!("user: no free task slot");
        return;
    };
    while task::task(slot).state == task::State::Runnable {
        task::yield_now();
    }
}

fn shell() -> ! {
    let mut line = [0u8; LINE_MAX];
    loop {
        print!("$ ");
        let command = read_line(&mut line);
        let (name, args) = command.split_once(' ').unwrap_or((command, ""));
        match name {
            "" => {}
            "help" => println!("commands: echo TEXT, ticks, tasks, race, user [ROUNDS [ITERATIONS]], disk, help"),
            "echo" => println!("{}", args),
            "ticks" => println!("ticks: {}", task::ticks()),
            "tasks" => task::list(),
            "race" => race(),
            "user" => user(args),
            "disk" => disk(),
            _ => println!("unknown command: {}", name),
        }
    }
}
