# long64: replayvm's 64-bit test guest (issue 15). A multiboot v1 kernel (ELF64 with the a.out
# kludge, so any multiboot loader takes it) whose 32-bit entry maps memory, enables PAE, EFER.LME
# and paging and far-jumps to 64-bit code, which then exercises what an engine must get exactly
# right in long mode:
#   - a 64-bit IDT (16-byte gates) and TSS (RSP0 for ring 3 -> 0, IST1 for the timer);
#   - page faults in ring 0 (a read at 0x10, error code 0; an instruction fetch at 0x20 by a
#     call to nowhere, error code 0x10 under EFER.NXE; a fetch from a no-execute page, 0x11) and
#     in ring 3 (a supervisor-only 4 KiB page: error code 5), a #UD (ud2),
#     each handler printing CR2/error code/RIP;
#   - LAPIC timer interrupts (periodic, vector 0x20) while ring 0 and ring 3 code compute;
#   - ring 3 by iretq, system calls by `int $0x80` (a DPL 3 trap gate) back to ring 0. On PVM
#     (the kvm engine here) `int n` from ring 3 arrives as #UD: the #UD handler treats the bytes
#     `cd 80` at the faulting RIP as that system call;
#   - port I/O to the UART (COM1), and the debug-exit port to end the session;
#   - built with -DWITH_SYSCALL (kernel-syscall.elf): also `syscall`/`sysretq` from ring 3
#     (EFER.SCE, STAR, LSTAR, FMASK). Not in kernel.elf: on PVM `syscall` from user mode
#     reaches the entry point still in user mode.
# kernel-pvm.elf (-DFOR_PVM) waits for its ticks with HLT (each tick arrives at an exit), ticks
# every 5 ms and masks the timer while ring 3 runs; everything else is the same. It was made for
# the kvm engine on PVM when the recorder there placed interrupts badly: measured at that commit,
# a recording of kernel.elf replayed verified in 10 of 20 runs, because an interrupt delivered at an
# interrupt-window exit (a tick due while the timer handler runs, delivered after its iretq) was
# taken as an exact position although PVM reports the window some instructions late, and ticks
# landing in native ring-3 code got landmarks no breakpoint can find there. The breakpoint itself
# was never the problem: it stops at the loop's jump target and at an iretq's return point every
# time (tests/test_kvm_engine.py). With the recorder's placement rules (window exits carry a
# landmark, ring-3 ticks wait for the next kernel entry, never mid-`rep`) kernel.elf records and
# replays verified on kvm every time (100 of 100; tests/test_long_mode.py), so kernel-pvm.elf is only
# the quieter of the two. A loop that changes memory but no register is still a kvm limit (see
# replayvm/engines/kvm.py).
# Memory: 4 KiB pages for the first 2 MiB (page 0 absent, 0x1FF000 supervisor-only), 2 MiB
# pages up to 8 MiB, the LAPIC as one 2 MiB page at 0xFEE00000. No SSE anywhere (PVM emulates
# kernel code and cannot run SSE there).

#define COM1        0x3F8
#define LAPIC       0xFEE00000
#define KCODE       0x08
#define KDATA       0x10
#define UDATA       0x1B
#define UCODE       0x23
#define TSS_SEL     0x28
#define TIMER_VEC   0x20
#define TICKS_RING0 3
#define TICKS_RING3 6
#ifdef FOR_PVM
#define TIMER_COUNT 5000000                 /* 5 ms: PVM emulates kernel code ~1000x slower */
#else
#define TIMER_COUNT 500000                  /* 0.5 ms at the LAPIC's 1 GHz */
#endif

    .section .multiboot, "a"
    .align 4
multiboot_header:
    .long 0x1BADB002
    .long 0x00010003                       # page-align, memory info, a.out kludge (ELF64)
    .long -(0x1BADB002 + 0x00010003)
    .long multiboot_header                 # header_addr
    .long multiboot_header                 # load_addr (the image starts with this header)
    .long _load_end                        # load_end_addr
    .long _bss_end                         # bss_end_addr
    .long start                            # entry_addr

    .text
    .code32
    .globl start
start:
    cli
    # pml4[0] -> pdpt, pdpt[0] -> pd0, pdpt[3] -> pd3, pd0[0] -> pt0 (user-accessible levels)
    movl    $pdpt + 7, pml4
    movl    $pd0 + 7, pdpt
    movl    $pd3 + 3, pdpt + 3*8
    movl    $pt0 + 7, pd0
    movl    $0x200000 + 0x87, pd0 + 1*8     # 2 MiB pages for 2..8 MiB
    movl    $0x400000 + 0x87, pd0 + 2*8
    movl    $0x600000 + 0x87, pd0 + 3*8
    movl    $LAPIC + 0x9B, pd3 + 0x1F7*8    # present, RW, PWT, PCD, 2 MiB
    movl    $pt0, %edi                      # 4 KiB pages 0..2 MiB, user-accessible
    movl    $7, %eax
    movl    $512, %ecx
1:  movl    %eax, (%edi)
    addl    $0x1000, %eax
    addl    $8, %edi
    loop    1b
    movl    $0, pt0                         # page 0 absent: the ring-0 page fault
    movl    $0x1FF003, pt0 + 0x1FF*8        # supervisor-only: the ring-3 page fault
#ifndef FOR_PVM
    movl    $0x80000000, pt0 + 0x1FE*8 + 4  # 0x1FE000 not executable (EFER.NXE below)
#endif
    lgdt    gdt_ptr
    movl    %cr4, %eax
    orl     $0x20, %eax                     # PAE
    movl    %eax, %cr4
    movl    $pml4, %eax
    movl    %eax, %cr3
    movl    $0xC0000080, %ecx               # EFER.LME (and NXE)
    rdmsr
#ifdef FOR_PVM
    orl     $0x100, %eax
#else
    orl     $0x900, %eax
#endif
    wrmsr
    movl    %cr0, %eax
    orl     $0x80000000, %eax               # paging: long mode is active from here
    movl    %eax, %cr0
    ljmp    $KCODE, $long_entry

    .code64
long_entry:
    movw    $KDATA, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    xorl    %eax, %eax
    movw    %ax, %fs
    movw    %ax, %gs
    movq    $kstack_top, %rsp
    # the TSS descriptor (16 bytes at GDT+0x28), RSP0 and IST1
    movq    $tss, %rax
    movw    $0x67, gdt + TSS_SEL
    movw    %ax, gdt + TSS_SEL + 2
    shrq    $16, %rax
    movb    %al, gdt + TSS_SEL + 4
    movb    $0x89, gdt + TSS_SEL + 5
    movb    $0, gdt + TSS_SEL + 6
    movb    %ah, gdt + TSS_SEL + 7
    shrq    $16, %rax
    movl    %eax, gdt + TSS_SEL + 8
    movl    $0, gdt + TSS_SEL + 12
    movq    $kstack0_top, %rax
    movq    %rax, tss + 4                   # RSP0
    movq    $ist1_top, %rax
    movq    %rax, tss + 0x24                # IST1
    movw    $TSS_SEL, %ax
    ltr     %ax
    # the IDT
    movl    $6, %edi
    movq    $ud_handler, %rsi
    movl    $0x8E00, %edx                   # interrupt gate, DPL 0
    call    set_gate
    movl    $13, %edi
    movq    $gp_handler, %rsi
    movl    $0x8E00, %edx
    call    set_gate
    movl    $14, %edi
    movq    $pf_handler, %rsi
    movl    $0x8E00, %edx
    call    set_gate
    movl    $TIMER_VEC, %edi
    movq    $timer_handler, %rsi
    movl    $0x8E01, %edx                   # interrupt gate on IST1
    call    set_gate
    movl    $0x80, %edi
    movq    $syscall_handler, %rsi
    movl    $0xEF00, %edx                   # trap gate, DPL 3
    call    set_gate
    lidt    idt_ptr
#ifdef WITH_SYSCALL
    movl    $0xC0000080, %ecx               # EFER.SCE
    rdmsr
    orl     $1, %eax
    wrmsr
    movl    $0xC0000081, %ecx               # STAR: kernel CS 0x08 (SS 0x10); sysret base 0x10
    xorl    %eax, %eax                      # (user SS 0x18, user CS 0x20)
    movl    $0x00100008, %edx
    wrmsr
    movl    $0xC0000082, %ecx               # LSTAR
    movq    $syscall_entry64, %rax
    movq    %rax, %rdx
    shrq    $32, %rdx
    wrmsr
    movl    $0xC0000084, %ecx               # FMASK: IF off on entry
    movl    $0x200, %eax
    xorl    %edx, %edx
    wrmsr
#endif

    movq    $msg_hello, %rsi
    call    puts
    movq    $0x10, %rbx
    movq    (%rbx), %rax                    # #PF: CR2 0x10, error 0 (3 bytes, skipped)
    ud2                                     # #UD (skipped)
    movq    $0x20, %rax
    call    *%rax                           # #PF on the fetch at 0x20: the handler returns
#ifndef FOR_PVM
    movq    $0x1FE000, %rax
    call    *%rax                           # #PF on a fetch from a no-execute page
#endif

    movq    $LAPIC, %rbx                    # LAPIC timer: periodic, vector 0x20
    movl    $0x1FF, 0xF0(%rbx)
    movl    $0xB, 0x3E0(%rbx)
    movl    $(0x20000 | TIMER_VEC), 0x320(%rbx)
    movl    $TIMER_COUNT, 0x380(%rbx)
    sti
    rdtsc                                   # a time-stamp read in 64-bit code (not printed:
    xorl    %eax, %eax                      # the kvm engine cannot make it exact)
    xorl    %edx, %edx
    xorl    %ecx, %ecx
#ifdef FOR_PVM
2:  hlt                                     # wait for the ticks at exits
#else
2:  incq    %rcx                            # compute while the timer ticks in ring 0
    imulq   $3, %rcx, %rdx
#endif
    cmpq    $TICKS_RING0, ticks
    jb      2b
    movq    $msg_ticks0, %rsi
    call    puts

#ifdef FOR_PVM
    movl    $(0x10000 | TIMER_VEC), 0x320(%rbx)     # timer masked while ring 3 runs
#endif
    movq    %rsp, saved_rsp                 # to ring 3
    pushq   $UDATA
    pushq   $user_stack_top
    pushq   $0x202
    pushq   $UCODE
    pushq   $user_entry
    iretq
back_in_kernel:
    movq    $msg_back, %rsi
    call    puts
    movq    ticks, %rdi
    call    print_hex
    movb    $'\n', %al
    call    putc
    movw    $0x8A00, %dx                    # the debug-exit sequence ends the session
    movw    $0x8A00, %ax
    outw    %ax, %dx
    movw    $0x8AE0, %ax
    outw    %ax, %dx
    cli
3:  hlt
    jmp     3b

# set_gate(vector %edi, handler %rsi, type/attributes/IST %edx)
set_gate:
    shlq    $4, %rdi
    addq    $idt, %rdi
    movq    %rsi, %rax
    movw    %ax, (%rdi)
    movw    $KCODE, 2(%rdi)
    movw    %dx, 4(%rdi)
    shrq    $16, %rax
    movw    %ax, 6(%rdi)
    shrq    $16, %rax
    movl    %eax, 8(%rdi)
    movl    $0, 12(%rdi)
    ret

# putc(%al) -> COM1; puts(%rsi); print_hex(%rdi). Clobber rax, rcx, rdx, rsi, rdi.
putc:
    movb    %al, %ah
    movw    $COM1 + 5, %dx                  # wait for the transmit register (LSR bit 5)
1:  inb     %dx, %al
    testb   $0x20, %al
    jz      1b
    movb    %ah, %al
    movw    $COM1, %dx
    outb    %al, %dx
    ret
puts:
    movb    (%rsi), %al
    testb   %al, %al
    jz      1f
    call    putc
    incq    %rsi
    jmp     puts
1:  ret
print_hex:
    movl    $16, %ecx
1:  rolq    $4, %rdi
    movl    %edi, %eax
    andl    $0xF, %eax
    movb    hexdigits(%rax), %al
    call    putc
    decl    %ecx
    jnz     1b
    ret

#define SAVE   pushq %rax; pushq %rcx; pushq %rdx; pushq %rsi; pushq %rdi
#define RESTORE popq %rdi; popq %rsi; popq %rdx; popq %rcx; popq %rax

pf_handler:                                 # frame after SAVE: err 40, rip 48, cs 56, rsp 72
    SAVE
    movq    $msg_pf, %rsi
    call    puts
    movq    %cr2, %rdi
    call    print_hex
    movb    $' ', %al
    call    putc
    movq    40(%rsp), %rdi
    call    print_hex
    movb    $' ', %al
    call    putc
    movq    48(%rsp), %rdi
    call    print_hex
    movb    $'\n', %al
    call    putc
    incq    faults
    movq    %cr2, %rax
    cmpq    48(%rsp), %rax
    je      1f
    addq    $3, 48(%rsp)                    # past `movq (%rbx), %rax`
    RESTORE
    addq    $8, %rsp                        # the error code
    iretq
1:  movq    72(%rsp), %rax                  # a fetch fault (a call to nowhere): return to
    movq    (%rax), %rcx                    # the caller, as its `ret` would
    movq    %rcx, 48(%rsp)
    addq    $8, 72(%rsp)
    RESTORE
    addq    $8, %rsp                        # the error code
    iretq

gp_handler:                                 # not expected: report and stop
    movq    $msg_gp, %rsi
    call    puts
    movq    8(%rsp), %rdi
    call    print_hex
    cli
1:  hlt
    jmp     1b

ud_handler:                                 # frame after SAVE: rip 40, cs 48
    SAVE
    movq    40(%rsp), %rsi
    movzwl  (%rsi), %eax
    cmpw    $0x80CD, %ax                    # `int $0x80` from ring 3 on PVM: the system call
    je      1f
    movq    $msg_ud, %rsi
    call    puts
    movq    40(%rsp), %rdi
    call    print_hex
    movb    $'\n', %al
    call    putc
    incq    faults
    addq    $2, 40(%rsp)                    # past ud2
    RESTORE
    iretq
1:  addq    $2, 40(%rsp)                    # as if the int had completed
    RESTORE
    jmp     syscall_handler

syscall_handler:                            # %rax: 1 putc(%dil), 2 back to the kernel, 3 ticks
    cmpq    $1, %rax
    je      1f
    cmpq    $2, %rax
    je      2f
    movq    ticks, %rax
    iretq
1:  pushq   %rdx
    movl    %edi, %eax
    call    putc
    popq    %rdx
    movl    $1, %eax
    iretq
2:  movq    saved_rsp, %rsp
    jmp     back_in_kernel

#ifdef WITH_SYSCALL
syscall_entry64:                            # ring 0 on the user's stack; RCX, R11 hold the return
    pushq   %rdx
    cmpq    $1, %rax
    je      1f
    movq    ticks, %rax
    popq    %rdx
    sysretq
1:  movl    %edi, %eax
    movw    $COM1, %dx
    outb    %al, %dx
    popq    %rdx
    sysretq
#endif

timer_handler:                              # on IST1
    pushq   %rax
    incq    ticks
    movq    $LAPIC + 0xB0, %rax             # EOI
    movl    $0, (%rax)
    popq    %rax
    iretq

user_entry:                                 # ring 3
    movq    $msg_user, %rsi
1:  movzbl  (%rsi), %edi
    testl   %edi, %edi
    jz      2f
    movl    $1, %eax
    int     $0x80
    incq    %rsi
    jmp     1b
2:
#ifdef WITH_SYSCALL
    movq    $msg_syscall, %rsi
5:  movzbl  (%rsi), %edi
    testl   %edi, %edi
    jz      6f
    movl    $1, %eax
    syscall
    incq    %rsi
    jmp     5b
6:
#endif
    movq    $0x1FF000, %rbx
    movq    (%rbx), %rax                    # #PF from ring 3: error 5 (present, user)
3:  movl    $20000, %ecx                    # compute; the timer preempts ring 3
4:  imulq   $7, %rcx, %rdx
    decl    %ecx
    jnz     4b
#ifndef FOR_PVM
    movl    $3, %eax
#ifdef WITH_SYSCALL
    syscall
#else
    int     $0x80
#endif
    cmpq    $TICKS_RING3, %rax
    jb      3b
#endif
    movl    $2, %eax
    int     $0x80

msg_hello:  .asciz "long64: in long mode\n"
msg_pf:     .asciz "#PF cr2 err rip "
msg_ud:     .asciz "#UD rip "
msg_gp:     .asciz "#GP err "
msg_ticks0: .asciz "long64: timer ticks in ring 0\n"
msg_user:   .asciz "long64: hello from ring 3\n"
msg_back:   .asciz "long64: back in ring 0, ticks "
msg_syscall: .asciz "long64: and by syscall\n"
hexdigits:  .ascii "0123456789abcdef"

    .data
    .align 16
gdt:
    .quad   0
    .quad   0x00AF9A000000FFFF              # 0x08 kernel code, 64-bit
    .quad   0x00CF92000000FFFF              # 0x10 kernel data
    .quad   0x00CFF2000000FFFF              # 0x18 user data
    .quad   0x00AFFA000000FFFF              # 0x20 user code, 64-bit
    .quad   0, 0                            # 0x28 TSS (filled in)
gdt_end:
gdt_ptr:
    .word   gdt_end - gdt - 1
    .quad   gdt
idt_ptr:
    .word   256*16 - 1
    .quad   idt
ticks:      .quad 0
faults:     .quad 0
saved_rsp:  .quad 0

    .bss
    .align 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd0:    .skip 4096
pd3:    .skip 4096
pt0:    .skip 4096
idt:    .skip 4096
tss:    .skip 0x68
    .align 16
    .skip 4096
ist1_top:
    .skip 4096
kstack0_top:
    .skip 8192
kstack_top:
    .skip 4096
user_stack_top:
