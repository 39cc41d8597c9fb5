# replayvm demo guest: boot sector. Loaded by the VMM at 0x7C00 in real mode (CS:IP = 0:7C00,
# DL = 0x80), no BIOS services used. Opens A20, enters 32-bit protected mode, reads the kernel ELF
# from sector 1 onward over IDE PIO (polling), loads its segments and jumps to its entry.

#define KERNEL_ELF   0x10000        /* scratch place for the ELF headers (first 4 KiB) */
#define SECTOR_SIZE  512

.code16
.globl start
start:
    cli
    cld
    xorw    %ax, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    movw    $start, %sp

    # A20 through the keyboard controller: wait for an empty input buffer, then write the
    # output port with A20 set.
1:  inb     $0x64, %al
    testb   $0x02, %al
    jnz     1b
    movb    $0xD1, %al
    outb    %al, $0x64
2:  inb     $0x64, %al
    testb   $0x02, %al
    jnz     2b
    movb    $0xDF, %al
    outb    %al, $0x60

    lgdt    gdtdesc
    movl    %cr0, %eax
    orl     $1, %eax
    movl    %eax, %cr0
    ljmp    $0x08, $protected

.code32
protected:
    movw    $0x10, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    xorw    %ax, %ax
    movw    %ax, %fs
    movw    %ax, %gs
    movl    $start, %esp
    call    load_kernel
    # load_kernel returns only if the kernel is not a valid ELF: say so and stop.
    movw    $0x8A00, %dx
    movw    $0x8A00, %ax
    outw    %ax, %dx
    movw    $0x8AE0, %ax
    outw    %ax, %dx
spin:
    hlt
    jmp     spin

# Wait until the drive is ready (BSY clear, DRDY set).
wait_disk:
    movw    $0x1F7, %dx
1:  inb     %dx, %al
    andb    $0xC0, %al
    cmpb    $0x40, %al
    jne     1b
    ret

# read_sector(edi = destination, eax = LBA): one sector over PIO.
read_sector:
    pushl   %eax
    call    wait_disk
    popl    %eax
    movl    %eax, %ebx
    movw    $0x1F2, %dx
    movb    $1, %al
    outb    %al, %dx
    movl    %ebx, %eax
    movw    $0x1F3, %dx
    outb    %al, %dx
    shrl    $8, %eax
    incw    %dx
    outb    %al, %dx
    shrl    $8, %eax
    incw    %dx
    outb    %al, %dx
    shrl    $8, %eax
    andb    $0x0F, %al
    orb     $0xE0, %al
    incw    %dx
    outb    %al, %dx
    movb    $0x20, %al              # READ SECTORS
    incw    %dx
    outb    %al, %dx
    call    wait_disk
    movw    $0x1F0, %dx
    movl    $SECTOR_SIZE/4, %ecx
    rep insl
    ret

# read_bytes(edi = destination, esi = byte offset in the kernel image, ecx = count), sector
# granular: rounds the destination down to the sector boundary of the offset.
read_bytes:
    pushl   %ebp
    movl    %esp, %ebp
    movl    %esi, %eax
    andl    $(SECTOR_SIZE-1), %eax
    subl    %eax, %edi               # destination of the whole first sector
    addl    %edi, %ecx
    addl    %eax, %ecx               # end address
    pushl   %ecx
    movl    %esi, %eax
    shrl    $9, %eax
    incl    %eax                     # kernel starts at sector 1
1:  cmpl    (%esp), %edi
    jae     2f
    pushl   %eax
    call    read_sector              # advances edi by a sector
    popl    %eax
    incl    %eax
    jmp     1b
2:  movl    %ebp, %esp
    popl    %ebp
    ret

load_kernel:
    movl    $KERNEL_ELF, %edi
    xorl    %esi, %esi
    movl    $4096, %ecx
    call    read_bytes
    cmpl    $0x464C457F, KERNEL_ELF  # "\x7FELF"
    jne     3f
    movl    KERNEL_ELF+28, %ebx      # e_phoff
    addl    $KERNEL_ELF, %ebx
    movzwl  KERNEL_ELF+44, %ebp      # e_phnum
1:  testl   %ebp, %ebp
    jz      2f
    cmpl    $1, (%ebx)               # PT_LOAD
    jne     4f
    movl    12(%ebx), %edi           # p_paddr
    movl    4(%ebx), %esi            # p_offset
    movl    16(%ebx), %ecx           # p_filesz
    pushl   %ebx
    pushl   %ebp
    call    read_bytes
    popl    %ebp
    popl    %ebx
    movl    12(%ebx), %edi           # zero the rest: p_memsz - p_filesz
    addl    16(%ebx), %edi
    movl    20(%ebx), %ecx
    subl    16(%ebx), %ecx
    xorl    %eax, %eax
    rep stosb
4:  addl    $32, %ebx
    decl    %ebp
    jmp     1b
2:  movl    KERNEL_ELF+24, %eax      # e_entry
    jmp     *%eax
3:  ret

.p2align 3
gdt:
    .quad   0
    .quad   0x00CF9A000000FFFF       # 0x08: code, flat 4 GiB
    .quad   0x00CF92000000FFFF       # 0x10: data, flat 4 GiB
gdtdesc:
    .word   gdtdesc - gdt - 1
    .long   gdt
