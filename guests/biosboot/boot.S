# biosboot: a guest that boots only through replayvm's BIOS services (`--machine pc`).
#
# Sector 0 (at 0:7C00) checks for the extended disk calls (int 0x13 AH=0x41), loads the rest of
# the image with int 0x13 AH=0x42 to 0:7E00 and jumps there. Stage 2 prints through the teletype
# (int 0x10 AH=0x0E) and the serial port (int 0x14), asks for the memory size (int 0x15 AH=0x88
# and E820), checks that a missing drive sets CF, then remaps the 8259s as pintos does, runs the
# 8254 at 100 Hz and counts ten IRQ0s in real mode with its own vector, and powers off through
# port 0xB004. Everything it prints goes to COM1 (the console) and to the text screen.
.code16
.globl start
start:
    cli
    xorw    %ax, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    movw    $0x7000, %sp
    movb    %dl, drive
    movw    $0x00E3, %ax            # int 0x14 AH=0: COM1 9600 8N1
    xorw    %dx, %dx
    int     $0x14
    movw    $hello, %si
    call    puts
    movb    $0x41, %ah              # extensions present?
    movw    $0x55AA, %bx
    movb    drive, %dl
    int     $0x13
    jc      fail
    cmpw    $0xAA55, %bx
    jne     fail
    movw    $packet, %si            # read the rest: sectors 1..STAGE2_SECTORS to 0:7E00
    movb    $0x42, %ah
    movb    drive, %dl
    int     $0x13
    jc      fail
    jmp     stage2

fail:
    movw    $failed, %si
    call    puts
    int     $0x18

# puts: the NUL-terminated string at DS:SI to the screen and to COM1
puts:
    lodsb
    testb   %al, %al
    jz      1f
    call    putc
    jmp     puts
1:  ret

putc:
    pushw   %ax
    movb    $0x0E, %ah              # teletype
    xorw    %bx, %bx
    int     $0x10
    popw    %ax
    movb    $0x01, %ah              # serial send
    xorw    %dx, %dx
    int     $0x14
    ret

drive:  .byte 0
hello:  .asciz "biosboot: sector 0\r\n"
failed: .asciz "biosboot: load failed\r\n"
    .p2align 2
packet: .byte 16, 0
        .word STAGE2_SECTORS, 0x7E00, 0
        .quad 1

    .org 510
    .word 0xAA55

# ------------------------------------------------------------------ stage 2, at 0:7E00
stage2:
    movw    $loaded, %si
    call    puts

    movb    $0x41, %ah              # a drive the machine lacks: CF must be set
    movw    $0x55AA, %bx
    movb    $0x81, %dl
    int     $0x13
    movw    $nodrive, %si
    jc      1f
    movw    $hasdrive, %si
1:  call    puts

    movb    $0x88, %ah              # KiB above 1 MiB
    int     $0x15
    movw    $extmem, %si
    call    puts_hex_ax

    xorl    %ebx, %ebx              # E820: count the entries
    xorw    %bp, %bp
    movw    $e820buf, %di
2:  movl    $0xE820, %eax
    movl    $0x534D4150, %edx
    movl    $20, %ecx
    int     $0x15
    jc      3f
    incw    %bp
    testl   %ebx, %ebx
    jnz     2b
3:  movw    %bp, %ax
    movw    $e820, %si
    call    puts_hex_ax

    movb    $0x30, %ah              # an unsupported int 0x15 function: CF set
    int     $0x15
    movw    $cfset, %si
    jc      4f
    movw    $cfclear, %si
4:  call    puts

    # The 8259s as pintos programs them: IRQ0-7 -> 0x20-0x27, IRQ8-15 -> 0x28-0x2F.
    movb    $0xFF, %al
    outb    %al, $0x21
    outb    %al, $0xA1
    movb    $0x11, %al
    outb    %al, $0x20
    movb    $0x20, %al
    outb    %al, $0x21
    movb    $0x04, %al
    outb    %al, $0x21
    movb    $0x01, %al
    outb    %al, $0x21
    movb    $0x11, %al
    outb    %al, $0xA0
    movb    $0x28, %al
    outb    %al, $0xA1
    movb    $0x02, %al
    outb    %al, $0xA1
    movb    $0x01, %al
    outb    %al, $0xA1
    movw    $tick, 0x20*4           # our own IRQ0 handler
    movw    $0, 0x20*4+2
    movb    $0xFE, %al              # only IRQ0
    outb    %al, $0x21
    # The 8254: channel 0, mode 2, 11932 counts (100 Hz).
    movb    $0x34, %al
    outb    %al, $0x43
    movw    $11932, %ax
    outb    %al, $0x40
    movb    %ah, %al
    outb    %al, $0x40
    sti
5:  hlt
    cmpw    $10, ticks
    jb      5b
    cli
    movw    ticks, %ax
    movw    $ticked, %si
    call    puts_hex_ax

    movw    $done, %si
    call    puts
    movw    $0xB004, %dx            # power off
    movw    $0x2000, %ax
    outw    %ax, %dx
    cli
6:  hlt
    jmp     6b

tick:
    pushw   %ax
    incw    %cs:ticks
    movb    $0x20, %al              # EOI
    outb    %al, $0x20
    popw    %ax
    iret

# puts_hex_ax: the string at SI, then AX as 4 hex digits, then CRLF
puts_hex_ax:
    pushw   %ax
    call    puts
    popw    %ax
    movw    $4, %cx
1:  rolw    $4, %ax
    pushw   %ax
    pushw   %cx
    andb    $0x0F, %al
    addb    $'0', %al
    cmpb    $'9', %al
    jbe     2f
    addb    $7, %al
2:  call    putc
    popw    %cx
    popw    %ax
    loop    1b
    movw    $crlf, %si
    jmp     puts

ticks:    .word 0
loaded:   .asciz "biosboot: stage 2 loaded\r\n"
nodrive:  .asciz "biosboot: drive 0x81 absent (CF)\r\n"
hasdrive: .asciz "biosboot: drive 0x81 present?\r\n"
extmem:   .asciz "biosboot: KiB above 1 MiB 0x"
e820:     .asciz "biosboot: E820 entries 0x"
cfset:    .asciz "biosboot: unknown call: CF set\r\n"
cfclear:  .asciz "biosboot: unknown call: CF clear?\r\n"
ticked:   .asciz "biosboot: IRQ0 ticks 0x"
done:     .asciz "biosboot: done\r\n"
crlf:     .asciz "\r\n"
    .p2align 4
e820buf:  .fill 24, 1, 0
    .p2align 9
end:
