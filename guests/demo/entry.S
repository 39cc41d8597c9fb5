# replayvm demo guest: kernel entry, interrupt vectors, trap return and context switch.

#define KERNBASE 0x80000000

.globl _start
_start = entry - KERNBASE            # the ELF entry point is physical: paging is off

# Paging on with entry_page_directory (the BSP at entry, each AP in ap_start32).
.macro ENABLE_PAGING
    movl    %cr4, %eax
    orl     $0x10, %eax              # CR4.PSE: 4 MiB pages
    movl    %eax, %cr4
    movl    $(entry_page_directory - KERNBASE), %eax
    movl    %eax, %cr3
    movl    %cr0, %eax
    orl     $0x80010000, %eax        # CR0.PG | CR0.WP
    movl    %eax, %cr0
.endm

.text
.globl entry
entry:
    ENABLE_PAGING
    movl    $(boot_stack + 4096), %esp
    movl    $kernel_main, %eax
    jmp     *%eax

# One stub per vector: push a zero error code where the CPU pushes none, then the vector.
.macro VECTOR n
.globl vector\n
vector\n:
.if (\n == 8) || ((\n >= 10) && (\n <= 14)) || (\n == 17)
.else
    pushl   $0
.endif
    pushl   $\n
    jmp     alltraps
.endm

.altmacro
.macro VECTORS from, to
    VECTOR %from
.if \to-\from
    VECTORS %(from+1), \to
.endif
.endm
VECTORS 0, 48
VECTOR 64
VECTOR 255

.data
.globl vector_table
vector_table:
.macro ENTRY n
    .long vector\n
.endm
.macro ENTRIES from, to
    ENTRY %from
.if \to-\from
    ENTRIES %(from+1), \to
.endif
.endm
ENTRIES 0, 48
.text

.globl alltraps
alltraps:
    pushl   %ds
    pushl   %es
    pushl   %fs
    pushl   %gs
    pushal
    movw    $0x10, %ax
    movw    %ax, %ds
    movw    %ax, %es
    pushl   %esp
    call    trap
    addl    $4, %esp
.globl trapret
trapret:
    popal
    popl    %gs
    popl    %fs
    popl    %es
    popl    %ds
    addl    $8, %esp                 # vector and error code
    iret

# switch_to(uint32_t **save_esp, uint32_t *new_esp): save callee-saved registers on this
# stack, switch stacks, restore them from the other.
.globl switch_to
switch_to:
    movl    4(%esp), %eax
    movl    8(%esp), %edx
    pushl   %ebp
    pushl   %ebx
    pushl   %esi
    pushl   %edi
    movl    %esp, (%eax)
    movl    %edx, %esp
    popl    %edi
    popl    %esi
    popl    %ebx
    popl    %ebp
    ret

# Application processors start here (copied to AP_START = 0x7000 by start_aps in kernel.c): a
# STARTUP IPI starts the AP in real mode at 0x7000; it goes to protected mode with paging, as
# `entry` does, takes the stack the BSP left at 0x6FFC and calls ap_main.
#define AP_START 0x7000
#define AP_ADDR(x) ((x) - ap_trampoline + AP_START)
.code16
.globl ap_trampoline
ap_trampoline:
    cli
    xorw    %ax, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    lgdtl   AP_ADDR(ap_gdt_descriptor)
    movl    %cr0, %eax
    orl     $1, %eax                 # CR0.PE
    movl    %eax, %cr0
    ljmpl   $0x08, $AP_ADDR(ap_start32)
.code32
ap_start32:
    movw    $0x10, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    ENABLE_PAGING
    movl    (AP_START - 4), %esp
    movl    $ap_main, %eax
    call    *%eax
1:  hlt
    jmp     1b
.p2align 3
ap_gdt:
    .quad   0
    .quad   0x00CF9A000000FFFF       # code, flat
    .quad   0x00CF92000000FFFF       # data, flat
ap_gdt_descriptor:
    .word   23
    .long   AP_ADDR(ap_gdt)
.globl ap_trampoline_end
ap_trampoline_end:
