"""cffi build script for replayvm.engines._kvm: the KVM API, compiled against <linux/kvm.h>.

Struct layouts and ioctl numbers come from the kernel headers through the compiler (`...` in the
declarations below), never from hand-copied offsets. Two tiny C wrappers make ioctl's variadic
argument concrete and return -errno on failure.
"""

from __future__ import annotations

import os

from cffi import FFI

CDEF = r"""
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};
struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type, present, dpl, db, s, l, g, avl, unusable;
    ...;
};
struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    ...;
};
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    ...;
};
struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};
struct kvm_interrupt { uint32_t irq; };
struct kvm_guest_debug_arch { uint64_t debugreg[8]; };
struct kvm_guest_debug {
    uint32_t control;
    struct kvm_guest_debug_arch arch;
    ...;
};
struct kvm_debug_exit_arch {
    uint32_t exception;
    uint32_t pad;
    uint64_t pc;
    uint64_t dr6, dr7;
};
struct kvm_cpuid_entry2 {
    uint32_t function, index, flags, eax, ebx, ecx, edx;
    ...;
};
struct kvm_cpuid2 {
    uint32_t nent;
    struct kvm_cpuid_entry2 entries[];
    ...;
};
struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct { uint64_t hardware_exit_reason; } hw;
        struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
        struct { uint8_t direction; uint8_t size; uint16_t port; uint32_t count; uint64_t data_offset; } io;
        struct { struct kvm_debug_exit_arch arch; } debug;
        struct { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; } mmio;
        struct { uint32_t suberror; uint32_t ndata; uint64_t data[16]; } internal;
        char padding[256];
    };
    ...;
};

#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_CHECK_EXTENSION ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_VCPU ...
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_INTERRUPT ...
#define KVM_SET_CPUID2 ...
#define KVM_SET_GUEST_DEBUG ...

#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...
#define KVM_GUESTDBG_ENABLE ...
#define KVM_GUESTDBG_SINGLESTEP ...
#define KVM_GUESTDBG_USE_HW_BP ...
#define KVM_MAX_CPUID_ENTRIES ...

int replayvm_ioctl_ptr(int fd, unsigned long request, void *arg);
int replayvm_ioctl_int(int fd, unsigned long request, unsigned long arg);
int replayvm_sync_sregs(int kvm_fd, struct kvm_run *run);
uint64_t replayvm_synced_cr3(struct kvm_run *run);
void replayvm_set_synced_cr3(struct kvm_run *run, uint64_t cr3);
"""

SOURCE = r"""
#include <errno.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#define KVM_MAX_CPUID_ENTRIES 256

int replayvm_ioctl_ptr(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

int replayvm_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

/* KVM copies the special registers into the run page at every exit when asked (KVM_CAP_SYNC_REGS):
   CR3 at an exit is then a memory read instead of a KVM_GET_SREGS. 1 if asked, 0 if the host
   cannot. */
int replayvm_sync_sregs(int kvm_fd, struct kvm_run *run)
{
    int caps = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS);
    if (caps <= 0 || !(caps & KVM_SYNC_X86_SREGS))
        return 0;
    run->kvm_valid_regs |= KVM_SYNC_X86_SREGS;
    return 1;
}

uint64_t replayvm_synced_cr3(struct kvm_run *run)
{
    return run->s.regs.sregs.cr3;
}

/* KVM_SET_SREGS does not touch the copy: keep it true until the next exit rewrites it. */
void replayvm_set_synced_cr3(struct kvm_run *run, uint64_t cr3)
{
    run->s.regs.sregs.cr3 = cr3;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("replayvm.engines._kvm", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    ffibuilder.compile(tmpdir=os.path.join(here, "..", ".."), verbose=False)
