# smp64: replayvm's two-CPU test guest for the kvm engine on PVM (issue 13), and for emu too.
# A multiboot v1 kernel (ELF64 with the a.out kludge) whose 32-bit entry switches the BSP to
# long mode (2 MiB pages, physical = virtual). The BSP then starts the AP as a PC does: INIT and
# STARTUP IPIs through its local APIC, the AP starting in real mode at a trampoline the BSP
# copied to 0x8000, which goes to protected mode and on to long mode with the BSP's page tables.
# Then both CPUs work with device exits and share memory:
#   - each prints which CPU it is, its local APIC's ID and the initial APIC ID CPUID leaf 1
#     gives it (each vCPU has its own);
#   - ROUNDS times each: take a spinlock (xchg; waiters spin on memory with no exit at all),
#     bump a locked counter around a UART write of its CPU's digit (exits inside the critical
#     section: a CPU switched away there leaves the other spinning until it is switched back),
#     then bump a racy counter with a port write between load and store (a switch there loses
#     an update);
#   - the BSP first spins on memory until the AP is up (no exits), and at the end waits for the
#     AP with HLT, woken by a fixed IPI the AP sends when it is done (vector 0x40);
#   - the BSP prints both counters and ends the session through the debug-exit port.
# Only what PVM runs: real mode, 32-bit protected mode without paging, 64-bit ring 0; no SSE, no
# `int n`/`iret` in 32-bit code.

#define COM1        0x3F8
#define POST        0x80
#define LAPIC       0xFEE00000
#define KCODE       0x08
#define KDATA       0x10
#define CODE32      0x18
#define TRAMPOLINE  0x8000                 /* STARTUP vector 0x08 */
#define ROUNDS      40
#define WAKE_VEC    0x40

    .section .multiboot, "a"
    .align 4
multiboot_header:
    .long 0x1BADB002
    .long 0x00010003                       # page-align, memory info, a.out kludge (ELF64)
    .long -(0x1BADB002 + 0x00010003)
    .long multiboot_header                 # header_addr
    .long multiboot_header                 # load_addr
    .long _load_end                        # load_end_addr
    .long _bss_end                         # bss_end_addr
    .long start                            # entry_addr

    .text
    .code32
    .globl start
start:
    cli
    movl    $pdpt + 3, pml4                 # pml4[0] -> pdpt; pdpt[0] -> pd0, pdpt[3] -> pd3
    movl    $pd0 + 3, pdpt
    movl    $pd3 + 3, pdpt + 3*8
    movl    $0x83, pd0                      # 2 MiB pages for 0..8 MiB
    movl    $0x200000 + 0x83, pd0 + 1*8
    movl    $0x400000 + 0x83, pd0 + 2*8
    movl    $0x600000 + 0x83, pd0 + 3*8
    movl    $LAPIC + 0x9B, pd3 + 0x1F7*8    # the local APIC: present, RW, PWT, PCD, 2 MiB
    lgdt    gdt_ptr
    call    enter_long_mode_32
    ljmp    $KCODE, $bsp_long

# PAE, the page tables, EFER.LME, paging: long mode (compatibility) from here. Both CPUs.
enter_long_mode_32:
    movl    %cr4, %eax
    orl     $0x20, %eax
    movl    %eax, %cr4
    movl    $pml4, %eax
    movl    %eax, %cr3
    movl    $0xC0000080, %ecx
    rdmsr
    orl     $0x100, %eax
    wrmsr
    movl    %cr0, %eax
    orl     $0x80000000, %eax
    movl    %eax, %cr0
    ret

    .code64
bsp_long:
    call    load_segments
    movq    $stack0_top, %rsp
    movl    $WAKE_VEC, %edi                 # the IDT: the wake-up IPI's vector only
    movq    $wake_handler, %rsi
    movq    %rsi, %rax
    shlq    $4, %rdi
    addq    $idt, %rdi
    movw    %ax, (%rdi)
    movw    $KCODE, 2(%rdi)
    movw    $0x8E00, 4(%rdi)                # interrupt gate, DPL 0
    shrq    $16, %rax
    movw    %ax, 6(%rdi)
    shrq    $16, %rax
    movl    %eax, 8(%rdi)
    call    cpu_setup
    xorl    %r12d, %r12d                    # this CPU: 0
    call    hello

    movq    $tramp_start, %rsi              # the AP's trampoline to 0x8000
    movq    $TRAMPOLINE, %rdi
    movq    $(tramp_end - tramp_start), %rcx
    rep movsb
    movq    $LAPIC, %rbx
    movl    $(1 << 24), 0x310(%rbx)         # INIT to APIC ID 1 (level, assert)
    movl    $0x4500, 0x300(%rbx)
    movl    $(1 << 24), 0x310(%rbx)         # STARTUP at vector 0x08: 0x8000
    movl    $(0x4600 | (TRAMPOLINE >> 12)), 0x300(%rbx)
1:  pause                                   # wait for the AP on memory alone: no exits
    cmpl    $0, ap_up
    je      1b
    call    take_lock
    movq    $msg_sees, %rsi
    call    puts
    call    drop_lock

    call    work
2:  cli                                     # wait for the AP with HLT; its IPI wakes us
    cmpl    $0, ap_done
    jne     3f
    sti
    hlt
    jmp     2b
3:  movq    $msg_locked, %rsi
    call    puts
    movq    locked_counter, %rdi
    call    print_dec
    movq    $msg_racy, %rsi
    call    puts
    movq    racy_counter, %rdi
    call    print_dec
    movq    $msg_of, %rsi
    call    puts
    movq    $(2 * ROUNDS), %rdi
    call    print_dec
    movq    $msg_wakes, %rsi
    call    puts
    movq    wakes, %rdi
    call    print_dec
    movb    $'\n', %al
    call    putc
    movw    $0x8A00, %dx                    # the debug-exit sequence ends the session
    movw    $0x8A00, %ax
    outw    %ax, %dx
    movw    $0x8AE0, %ax
    outw    %ax, %dx
    cli
4:  hlt
    jmp     4b

ap_long:                                    # the AP, in long mode
    call    load_segments
    movq    $stack1_top, %rsp
    call    cpu_setup
    movl    $1, %r12d                       # this CPU: 1
    movl    $1, ap_up
    call    hello
    call    work
    movl    $1, ap_done
    movq    $LAPIC, %rbx                    # wake the BSP: a fixed IPI to APIC ID 0
    movl    $0, 0x310(%rbx)
    movl    $WAKE_VEC, 0x300(%rbx)
    cli
5:  hlt                                     # halted for good (IF=0)
    jmp     5b

load_segments:
    movw    $KDATA, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    xorl    %eax, %eax
    movw    %ax, %fs
    movw    %ax, %gs
    ret

cpu_setup:                                  # the IDT, the local APIC on (spurious vector 0xFF)
    lidt    idt_ptr
    movq    $LAPIC, %rbx
    movl    $0x1FF, 0xF0(%rbx)
    movl    $0, 0x80(%rbx)                  # TPR 0
    ret

# hello: "smp64: cpuN up (apic id A, cpuid apic id B)" under the lock; N in %r12
hello:
    movq    $LAPIC, %rbx
    movl    0x20(%rbx), %r13d
    shrl    $24, %r13d                      # the local APIC's ID
    movl    $1, %eax
    cpuid
    shrl    $24, %ebx                       # CPUID.1 EBX[31:24]: the initial APIC ID
    movl    %ebx, %r14d
    call    take_lock
    movq    $msg_cpu, %rsi
    call    puts
    movq    %r12, %rdi
    call    print_dec
    movq    $msg_up, %rsi
    call    puts
    movq    %r13, %rdi
    call    print_dec
    movq    $msg_cpuid, %rsi
    call    puts
    movq    %r14, %rdi
    call    print_dec
    movq    $msg_close, %rsi
    call    puts
    call    drop_lock
    ret

# work: ROUNDS rounds of the locked and the racy counter (see the top); then "cpuN done"
work:
    movl    $ROUNDS, %r13d
1:  call    take_lock
    movq    locked_counter, %r14
    leal    '0'(%r12), %eax                 # this CPU's digit, inside the critical section
    call    putc
    incq    %r14
    movq    %r14, locked_counter
    call    drop_lock
    movq    racy_counter, %r15              # load ...
    movb    %r12b, %al
    outb    %al, $POST                      # ... an exit: a switch here loses an update ...
    incq    %r15
    movq    %r15, racy_counter              # ... store
    decl    %r13d
    jnz     1b
    call    take_lock
    movq    $msg_nl_cpu, %rsi
    call    puts
    movq    %r12, %rdi
    call    print_dec
    movq    $msg_done, %rsi
    call    puts
    call    drop_lock
    ret

take_lock:
1:  movl    $1, %eax
    xchgl   %eax, lock
    testl   %eax, %eax
    jz      3f
2:  pause                                   # spin on memory until it looks free
    cmpl    $0, lock
    jne     2b
    jmp     1b
3:  ret

drop_lock:
    movl    $0, lock
    ret

wake_handler:
    pushq   %rax
    incq    wakes
    movq    $LAPIC + 0xB0, %rax             # EOI
    movl    $0, (%rax)
    popq    %rax
    iretq

# putc(%al) -> COM1; puts(%rsi); print_dec(%rdi). Clobber rax, rcx, rdx, rsi, rdi.
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
print_dec:
    movq    %rdi, %rax
    movl    $10, %ecx
    xorl    %esi, %esi                      # digits pushed
1:  xorl    %edx, %edx
    divq    %rcx
    addl    $'0', %edx
    pushq   %rdx
    incl    %esi
    testq   %rax, %rax
    jnz     1b
2:  popq    %rax
    pushq   %rsi
    call    putc
    popq    %rsi
    decl    %esi
    jnz     2b
    ret

# The AP's first code: real mode at 0x800:0 (copied to TRAMPOLINE by the BSP), to protected
# mode with the kernel's GDT, then long mode as the BSP entered it.
    .code16
tramp_start:
    cli
    xorw    %ax, %ax
    movw    %ax, %ds
    lgdtl   TRAMPOLINE + (tramp_gdt_ptr - tramp_start)
    movl    %cr0, %eax
    orl     $1, %eax
    movl    %eax, %cr0
    ljmpl   $CODE32, $(TRAMPOLINE + (tramp32 - tramp_start))
    .code32
tramp32:
    movw    $KDATA, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    movl    $(TRAMPOLINE + 0xF00), %esp     # a stack for the call below (by its absolute
    movl    $enter_long_mode_32, %eax       # address: this code runs away from where it
    call    *%eax                           # was linked)
    ljmp    $KCODE, $ap_long
    .align 8
tramp_gdt_ptr:
    .word   gdt_end - gdt - 1
    .long   gdt
tramp_end:

    .section .rodata
msg_cpu:    .asciz "smp64: cpu"
msg_up:     .asciz " up (apic id "
msg_cpuid:  .asciz ", cpuid apic id "
msg_close:  .asciz ")\n"
msg_sees:   .asciz "smp64: cpu0 sees cpu1 up\n"
msg_nl_cpu: .asciz "\nsmp64: cpu"
msg_done:   .asciz " done\n"
msg_locked: .asciz "smp64: locked counter "
msg_racy:   .asciz ", racy counter "
msg_of:     .asciz ", of "
msg_wakes:  .asciz "; wake-ups "

    .data
    .align 16
gdt:
    .quad   0
    .quad   0x00AF9A000000FFFF              # 0x08 kernel code, 64-bit
    .quad   0x00CF92000000FFFF              # 0x10 kernel data
    .quad   0x00CF9A000000FFFF              # 0x18 code, 32-bit (the AP's trampoline)
gdt_end:
gdt_ptr:
    .word   gdt_end - gdt - 1
    .quad   gdt
idt_ptr:
    .word   256*16 - 1
    .quad   idt
    .align 8
lock:           .long 0
ap_up:          .long 0
ap_done:        .long 0
    .align 8
locked_counter: .quad 0
racy_counter:   .quad 0
wakes:          .quad 0

    .bss
    .align 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd0:    .skip 4096
pd3:    .skip 4096
idt:    .skip 4096
    .skip 8192
stack0_top:
    .skip 8192
stack1_top:
