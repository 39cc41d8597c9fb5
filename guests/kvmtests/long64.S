# 64-bit long-mode test guest for the kvm engine (PVM runs 64-bit code; emu does not: replayvm's
# IDT delivery is 32-bit only). The VMM enters it in long mode at 0x1000 with identity-mapped
# 2 MiB pages (set up by the test). It checks port and MMIO exits, then installs a 64-bit IDT
# gate and spins without exits, so only a kick can deliver the timer interrupt.
#   0x80 out: marks   0x81 in: value echoed to 0x82   0x89 out: "arm the timer"   0x8A out: handler
#   MMIO at 0x200000 (2 MiB, beyond RAM): read 4 bytes, write them back at +8.
.code64
.globl start
start:
    movb    $0x11, %al
    outb    %al, $0x80
    inb     $0x81, %al
    outb    %al, $0x82
    movl    0x200000, %eax
    movl    %eax, 0x200008
    leaq    handler(%rip), %rax            # 64-bit interrupt gate for vector 0x30 at 0x6000
    movw    %ax, 0x6000 + 0x30*16
    movw    $0x08, 0x6000 + 0x30*16 + 2
    movw    $0x8E00, 0x6000 + 0x30*16 + 4
    shrq    $16, %rax
    movw    %ax, 0x6000 + 0x30*16 + 6
    shrq    $16, %rax
    movl    %eax, 0x6000 + 0x30*16 + 8
    movl    $0, 0x6000 + 0x30*16 + 12
    lidt    idtr(%rip)
    movb    $0x22, %al
    outb    %al, $0x80
    sti
    outb    %al, $0x89
busy:
    jmp     busy
handler:
    movb    $0x30, %al
    outb    %al, $0x8A
    movb    $0x66, %al
    outb    %al, $0x80
    hlt
idtr:
    .word   0xFFF
    .quad   0x6000
