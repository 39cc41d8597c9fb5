//! System calls from ring 3: `int 0x80` with the call number in RAX and arguments in RDI, RSI;
//! the result goes back in RAX. (On PVM they arrive as #UD: see trap::is_int80_as_ud.)

use crate::trap::TrapFrame;
use crate::{memory, print, println, task, x86};

pub const SYS_WRITE: u64 = 1;     // (address, length): print user bytes on the console
pub const SYS_PROGRESS: u64 = 2;  // (round, value): a CPU-bound task reports a finished round
pub const SYS_EXIT: u64 = 3;      // (value): end the task
pub const SYS_TICKS: u64 = 4;     // (): timer ticks since boot

/// What the ring-3 CPU-bound task reported last (the `user` command prints it).
pub static mut LAST_ROUND: u64 = 0;

pub fn dispatch(frame: &mut TrapFrame) {
    // System calls run with interrupts on, as in most kernels: a long one must not hold off
    // the timer. (It also matters to replayvm's kvm engine on PVM, which cannot stop native
    // ring-3 code at an exact point: an interrupt that arrives while a ring-3 task computes is
    // delivered once that task has entered the kernel and the kernel has interrupts on.)
    x86::restore_interrupts(true);
    frame.rax = match frame.rax {
        SYS_WRITE => match memory::user_bytes(frame.rdi, frame.rsi) {
            Some(bytes) => {
                for &b in bytes {
                    print!("{}", b as char);
                }
                frame.rsi
            }
            None => u64::MAX,
        },
        SYS_PROGRESS => {
            unsafe { LAST_ROUND = frame.rdi }
            0
        }
        SYS_EXIT => {
            let me = task::current();
            println!("user: {} exits with {:#018x} after {} rounds, preempted {} times ({} in ring 3)",
                     me.name, frame.rdi, unsafe { LAST_ROUND }, me.preempted, me.preempted_in_user);
            task::exit();
        }
        SYS_TICKS => task::ticks(),
        _ => u64::MAX,
    };
}
