# Real-mode test guest (loaded at 0x7C00, CS:IP = 0:7C00) for the CPU engines: port and string
# I/O, MMIO below 1 MiB, interrupts through the IVT with and without an open window, a busy loop
# that only a kick can interrupt. Ports (the test's devices):
#   0x80 out: progress marks        0x81 in: a value to echo    0x82 out: the echoed value
#   0x84 out: 16-bit value          0x86 outsb target           0x87 insw source
#   0x88 out: "make an interrupt pending now"                   0x8A out: handler ran (vector)
#   0x89 out: "make an interrupt pending in a while" (timer)
# MMIO: a device at 0xD0000 (segment 0xD000): read 4 bytes, write 4 bytes.
.code16
.globl start
start:
    cli
    xorw    %ax, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    movw    $0x7000, %sp
    movw    $handler, 0x30*4
    movw    $0, 0x30*4+2

    movb    $0x11, %al              # mark 1: started
    outb    %al, $0x80
    inb     $0x81, %al              # port read, echoed back
    outb    %al, $0x82
    movw    $0x86, %dx              # string out: 4 bytes
    movw    $message, %si
    movw    $4, %cx
    cld
    rep outsb
    movw    $0x87, %dx              # string in: 2 words
    movw    $buffer, %di
    movw    $2, %cx
    rep insw
    movw    buffer, %ax
    outw    %ax, $0x84
    movw    buffer+2, %ax
    outw    %ax, $0x84

    movw    $0xD000, %ax            # MMIO
    movw    %ax, %fs
    movl    %fs:0, %eax
    movl    %eax, %fs:4
    movb    $0x22, %al              # mark 2: I/O done
    outb    %al, $0x80

    sti                             # interrupt with IF=1: taken at once
    outb    %al, $0x88
    nop
    movb    $0x33, %al              # mark 3
    outb    %al, $0x80

    cli                             # interrupt while IF=0: needs the window
    outb    %al, $0x88
    movb    $0x44, %al              # mark 4: before sti
    outb    %al, $0x80
    sti
    nop                             # the STI shadow
    movb    $0x55, %al              # mark 5: after the interrupt
    outb    %al, $0x80

    movb    $1, phase
    outb    %al, $0x89              # a timer: only a kick gets us out of the loop below
busy:
    jmp     busy

handler:
    pushw   %ax
    movb    $0x30, %al
    outb    %al, $0x8A
    popw    %ax
    cmpb    $1, phase               # the timer's interrupt arrives in the busy loop: stop there
    je      done
    iret
done:
    movb    $0x66, %al
    outb    %al, $0x80
    hlt

message:
    .ascii  "kvm!"
buffer:
    .word   0, 0
phase:
    .byte   0
