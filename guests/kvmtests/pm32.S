# 32-bit protected-mode test guest without paging (entered by the VMM in flat protected mode at
# 0x1000, segments 0x08 code / 0x10 data from a GDT the test provides). PVM's emulator runs this
# mode but not `int`/`iret`, so no interrupts here: port, string and MMIO exits only.
#   0x80 out: marks    0x81 in: value to echo    0x82 out: echo    0x86 outsl target
#   MMIO device at 0xE0000000: read 4 bytes at +0, write it back at +8.
.code32
.globl start
start:
    movb    $0x11, %al
    outb    %al, $0x80
    inl     $0x81, %eax
    outl    %eax, $0x82
    movw    $0x86, %dx
    movl    $words, %esi
    movl    $3, %ecx
    cld
    rep outsl
    movl    0xE0000000, %eax
    movl    %eax, 0xE0000008
    movb    $0x22, %al
    outb    %al, $0x80
    hlt
words:
    .long   0x11111111, 0x22222222, 0x33333333
