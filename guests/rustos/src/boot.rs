//! From the multiboot loader to Rust: the loader leaves us in 32-bit protected mode without
//! paging; long mode needs paging, so this 32-bit code builds the first page tables, turns on
//! PAE, EFER.LME and paging, and far-jumps into a 64-bit code segment.
//!
//! The boot page tables map the first 1 GiB and the 3-4 GiB window (where the LAPIC and IOAPIC
//! registers live) one-to-one with 2 MiB pages: the kernel's physical and virtual addresses
//! are the same, which keeps every address in this kernel easy to read. (1 GiB pages would be
//! shorter still, but PVM, the KVM of replayvm's build machines, cannot run them.)

use core::arch::global_asm;

global_asm!(
    r#"
    .section .multiboot, "a"
    .balign 4
multiboot_header:
    .long 0x1BADB002                      # magic
    .long 0x00010003                      # flags: align modules, memory info, addresses below
    .long -(0x1BADB002 + 0x00010003)      # checksum
    # The "a.out kludge" (flag 16): where to load the file, so the loader needs no ELF64 parser.
    .long multiboot_header                # header_addr
    .long __load_start                    # load_addr
    .long __load_end                      # load_end_addr
    .long __bss_end                       # bss_end_addr (the loader zeroes the bss)
    .long _start32                        # entry_addr

    .section .boot, "ax"
    .code32
    .global _start32
_start32:
    cli
    movl $boot_stack_top, %esp

    # PML4[0] -> PDPT; PDPT[0] -> PD0 (0-1 GiB), PDPT[3] -> PD3 (3-4 GiB)
    movl $boot_pdpt, %eax
    orl $3, %eax                          # present, writable
    movl %eax, boot_pml4
    movl $boot_pd0, %eax
    orl $3, %eax
    movl %eax, boot_pdpt
    movl $boot_pd3, %eax
    orl $3, %eax
    movl %eax, boot_pdpt + 3 * 8

    # 512 2 MiB pages in each PD: present, writable, PS (a 2 MiB page); the device window
    # uncached (PCD).
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, boot_pd0(,%ecx,8)
    movl %ecx, %eax
    shll $21, %eax
    addl $0xC0000000, %eax
    orl $0x93, %eax
    movl %eax, boot_pd3(,%ecx,8)
    incl %ecx
    cmpl $512, %ecx
    jne 1b

    movl %cr4, %eax
    orl $0x20, %eax                       # CR4.PAE
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx                # EFER
    rdmsr
    orl $0x100, %eax                      # EFER.LME: long mode once paging is on
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax                 # CR0.PG | CR0.PE
    movl %eax, %cr0

    lgdt boot_gdt_pointer
    ljmp $0x08, $start64

    .code64
start64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movabsq $boot_stack_top, %rsp
    xorq %rbp, %rbp
    call kernel_main
2:  hlt
    jmp 2b

    .section .rodata
    .balign 8
boot_gdt:                                  # replaced by gdt::init once in Rust
    .quad 0
    .quad 0x00209A0000000000              # 0x08: 64-bit kernel code
    .quad 0x0000920000000000              # 0x10: kernel data
boot_gdt_pointer:
    .word 3 * 8 - 1
    .long boot_gdt

    .section .bss
    .balign 4096
    .global boot_pml4
boot_pml4: .skip 4096
boot_pdpt: .skip 4096
boot_pd0:  .skip 4096
boot_pd3:  .skip 4096
boot_stack: .skip 16384
    .global boot_stack_top
boot_stack_top:
"#,
    options(att_syntax)
);
