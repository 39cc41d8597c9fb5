/*
 * replayvm demo guest kernel.
 *
 * Boots like xv6 (boot sector -> protected mode -> paging), then: prints a banner and the CMOS
 * date, writes and reads back a disk sector through IRQ 14, and runs ring-3 tasks under a
 * preemptive round-robin scheduler driven by the LAPIC timer (100 Hz):
 *   - two "race" tasks that increment a shared counter without a lock: a timer interrupt that
 *     lands between a task's load and its store loses the other task's updates, so the result
 *     depends on exactly where the interrupts land -- the bug replay is meant to catch;
 *   - a shell reading serial input (IRQ 4): echo, ticks, race, spin N, date, disk, help.
 * System calls are `int $0x40` (eax = number, ebx/ecx = arguments).
 *
 * With several CPUs in the MP table (replayvm record --cpus N), the BSP starts the others as
 * xv6's startothers does (CMOS shutdown code, warm-reset vector, INIT, two STARTUP IPIs to a
 * real-mode trampoline at 0x7000); they wait halted. The shell's `race` then races across two
 * CPUs: the BSP wakes CPU 1 with an IPI and both increment one counter without a lock, CPU 1
 * as soon as the machine runs it; an update is lost when a CPU is switched out between its load
 * and its store while the other increments.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

/* Functions a debugger or a symbolised trace should see keep their own symbol. */
#define VISIBLE __attribute__((noinline))

#define KERNBASE 0x80000000u
#define P2V(a) ((void *)((u32)(a) + KERNBASE))
#define V2P(a) ((u32)(a) - KERNBASE)

/* ------------------------------------------------------------------ port and CPU helpers */
static inline u8 inb(u16 port) { u8 v; asm volatile("inb %1, %0" : "=a"(v) : "d"(port)); return v; }
static inline void outb(u16 port, u8 v) { asm volatile("outb %0, %1" : : "a"(v), "d"(port)); }
static inline void insl(u16 port, void *dst, int n)
{ asm volatile("cld; rep insl" : "+D"(dst), "+c"(n) : "d"(port) : "memory"); }
static inline void outsl(u16 port, const void *src, int n)
{ asm volatile("cld; rep outsl" : "+S"(src), "+c"(n) : "d"(port)); }
static inline void sti(void) { asm volatile("sti"); }
static inline void cli(void) { asm volatile("cli"); }
static inline void halt(void) { asm volatile("hlt"); }

/* ------------------------------------------------------------------ paging */
#define PDE_P 0x001
#define PDE_W 0x002
#define PDE_U 0x004
#define PDE_PCD 0x010
#define PDE_PS 0x080

/* 0-4 MiB identity (for the switch), KERNBASE -> 0 (user-accessible: the ring-3 tasks are
 * functions of this image), and the IOAPIC/LAPIC window identity-mapped uncached. */
__attribute__((aligned(4096))) u32 entry_page_directory[1024] = {
    [0] = 0 | PDE_P | PDE_W | PDE_PS,
    [KERNBASE >> 22] = 0 | PDE_P | PDE_W | PDE_U | PDE_PS,
    [0xFEC00000u >> 22] = 0xFEC00000u | PDE_P | PDE_W | PDE_PCD | PDE_PS,
};
__attribute__((aligned(16))) u8 boot_stack[4096];

/* ------------------------------------------------------------------ serial console */
#define COM1 0x3F8
static int uart_present;

static void uart_init(void)
{
    outb(COM1 + 2, 0);              /* FIFO off, as xv6 */
    outb(COM1 + 3, 0x80);           /* divisor latch */
    outb(COM1 + 0, 115200 / 9600);
    outb(COM1 + 1, 0);
    outb(COM1 + 3, 0x03);           /* 8N1 */
    outb(COM1 + 4, 0);
    outb(COM1 + 1, 0x01);           /* interrupt on received data */
    uart_present = inb(COM1 + 5) != 0xFF;
    (void)inb(COM1 + 2);
    (void)inb(COM1 + 0);
}

static void putc(char c)
{
    if (!uart_present)
        return;
    for (int i = 0; i < 128 && !(inb(COM1 + 5) & 0x20); i++)
        ;
    outb(COM1, c);
}

static void puts(const char *s) { while (*s) putc(*s++); }

static void putu(u32 v)
{
    char buf[12];
    int i = 0;
    do { buf[i++] = '0' + v % 10; v /= 10; } while (v);
    while (i) putc(buf[--i]);
}

static void putx(u32 v)
{
    puts("0x");
    for (int shift = 28; shift >= 0; shift -= 4)
        putc("0123456789abcdef"[(v >> shift) & 0xF]);
}

static void put2(u32 v) { putc('0' + v / 10 % 10); putc('0' + v % 10); }

/* ------------------------------------------------------------------ segments, TSS, IDT */
struct tss {
    u32 link, esp0, ss0, unused[23];
    u16 trap, iomap;
} __attribute__((packed));

static struct tss tss;
static u32 gdt[12];
static u32 idt[512];
extern u32 vector_table[];
extern void vector64(void), vector255(void);

#define SEG_KCODE 0x08
#define SEG_KDATA 0x10
#define SEG_UCODE 0x1B
#define SEG_UDATA 0x23
#define SEG_TSS 0x28

static void set_descriptor(int index, u32 base, u32 limit, u32 access, u32 flags)
{
    gdt[2 * index] = (limit & 0xFFFF) | (base << 16);
    gdt[2 * index + 1] = ((base >> 16) & 0xFF) | (access << 8) | (limit & 0xF0000) | (flags << 20)
                       | (base & 0xFF000000);
}

static void set_gate(int vector, void (*handler)(void), int dpl)
{
    u32 addr = (u32)handler;
    idt[2 * vector] = (addr & 0xFFFF) | (SEG_KCODE << 16);
    idt[2 * vector + 1] = (addr & 0xFFFF0000) | 0x8E00 | (dpl << 13);
}

/* Load the GDT, the kernel's segments, the IDT and (the BSP only: one TSS) the task register. */
static void use_tables(int with_tss)
{
    struct { u16 limit; u32 base; } __attribute__((packed)) gdtr, idtr;
    gdtr.limit = sizeof gdt - 1;
    gdtr.base = (u32)gdt;
    idtr.limit = sizeof idt - 1;
    idtr.base = (u32)idt;
    asm volatile("lgdt %0" : : "m"(gdtr));
    asm volatile("ljmp %0, $1f; 1:" : : "i"(SEG_KCODE));
    asm volatile("movw %w0, %%ds; movw %w0, %%es; movw %w0, %%ss" : : "r"(SEG_KDATA));
    if (with_tss)
        asm volatile("ltr %w0" : : "r"(SEG_TSS));
    asm volatile("lidt %0" : : "m"(idtr));
}

static void load_tables(void)
{
    set_descriptor(1, 0, 0xFFFFF, 0x9A, 0xC);
    set_descriptor(2, 0, 0xFFFFF, 0x92, 0xC);
    set_descriptor(3, 0, 0xFFFFF, 0xFA, 0xC);
    set_descriptor(4, 0, 0xFFFFF, 0xF2, 0xC);
    set_descriptor(5, (u32)&tss, sizeof tss - 1, 0x89, 0x0);
    tss.ss0 = SEG_KDATA;
    tss.iomap = 0xFFFF;                     /* no I/O bitmap: ring 3 may not touch ports */
    for (int v = 0; v <= 48; v++)
        set_gate(v, (void (*)(void))vector_table[v], 0);
    set_gate(64, vector64, 3);              /* system calls, callable from ring 3 */
    set_gate(255, vector255, 0);
    use_tables(1);
}

/* ------------------------------------------------------------------ LAPIC and IOAPIC */
#define LAPIC ((volatile u32 *)0xFEE00000u)
#define IOAPIC ((volatile u32 *)0xFEC00000u)
#define LAPIC_EOI (0xB0 / 4)
#define VECTOR_TIMER 32
#define IRQ_COM1 4
#define IRQ_IDE 14

static void lapic_init(void)
{
    LAPIC[0xF0 / 4] = 0x100 | 0xFF;          /* enable, spurious vector 255 */
    LAPIC[0x3E0 / 4] = 0xB;                  /* divide by 1 */
    LAPIC[0x320 / 4] = 0x20000 | VECTOR_TIMER;  /* periodic */
    LAPIC[0x380 / 4] = 10000000;             /* 100 Hz at a 1 GHz bus */
    LAPIC[0x350 / 4] = 0x10000;              /* LINT0/1 masked */
    LAPIC[0x360 / 4] = 0x10000;
    LAPIC[0x280 / 4] = 0;
    LAPIC[0x280 / 4] = 0;
    LAPIC[LAPIC_EOI] = 0;
    LAPIC[0x80 / 4] = 0;                     /* accept every priority */
}

static void ioapic_route(int irq, int vector)
{
    IOAPIC[0] = 0x10 + 2 * irq;
    IOAPIC[4] = vector;                      /* edge, active high, unmasked */
    IOAPIC[0] = 0x10 + 2 * irq + 1;
    IOAPIC[4] = 0;                           /* to CPU 0 */
}

/* ------------------------------------------------------------------ CMOS clock */
static u8 cmos(u8 reg) { outb(0x70, reg); return inb(0x71); }
static u32 bcd(u8 v) { return (v >> 4) * 10 + (v & 0xF); }

static void print_date(void)
{
    while (cmos(0x0A) & 0x80)
        ;
    u32 s = bcd(cmos(0)), m = bcd(cmos(2)), h = bcd(cmos(4));
    u32 d = bcd(cmos(7)), mo = bcd(cmos(8)), y = bcd(cmos(9));
    puts("date: 20"); put2(y); putc('-'); put2(mo); putc('-'); put2(d); putc(' ');
    put2(h); putc(':'); put2(m); putc(':'); put2(s); puts(" UTC\n");
}

/* ------------------------------------------------------------------ IDE, interrupt driven */
#define DISK_TEST_SECTOR 2000               /* in the image's spare area (see recipe.py) */
static volatile int ide_interrupts;
static u32 sector_buffer[128], sector_check[128];

static void ide_wait(void) { while ((inb(0x1F7) & 0xC0) != 0x40) ; }

static void ide_command(u32 lba, u8 command)
{
    ide_wait();
    outb(0x3F6, 0);                          /* interrupts on */
    outb(0x1F2, 1);
    outb(0x1F3, lba);
    outb(0x1F4, lba >> 8);
    outb(0x1F5, lba >> 16);
    outb(0x1F6, 0xE0 | ((lba >> 24) & 0x0F));
    outb(0x1F7, command);
}

static void wait_ide_interrupt(int before)
{
    while (ide_interrupts == before)         /* interrupts are enabled: sleep until IRQ 14 */
        halt();
}

VISIBLE static void disk_test(void)
{
    static u32 round;
    round++;
    for (int i = 0; i < 128; i++)
        sector_buffer[i] = 0xC0DE0000u + i * 7 + round;
    int before = ide_interrupts;
    ide_command(DISK_TEST_SECTOR, 0x30);
    outsl(0x1F0, sector_buffer, 128);
    wait_ide_interrupt(before);
    before = ide_interrupts;
    ide_command(DISK_TEST_SECTOR, 0x20);
    wait_ide_interrupt(before);
    ide_wait();
    insl(0x1F0, sector_check, 128);
    for (int i = 0; i < 128; i++) {
        if (sector_check[i] != sector_buffer[i]) {
            puts("disk: MISMATCH at word "); putu(i); puts(": "); putx(sector_check[i]);
            puts(" != "); putx(sector_buffer[i]); putc('\n');
            return;
        }
    }
    puts("disk: ok (sector "); putu(DISK_TEST_SECTOR); puts(" written and read back)\n");
}

/* ------------------------------------------------------------------ tasks and scheduling */
struct trapframe {
    u32 edi, esi, ebp, esp_ignored, ebx, edx, ecx, eax;
    u32 gs, fs, es, ds;
    u32 vector, error;
    u32 eip, cs, eflags, esp, ss;           /* esp/ss only when coming from ring 3 */
};

enum task_state { UNUSED, RUNNABLE, WAITING_INPUT, WAITING_RACE, DONE };
#define TASKS 5
#define STACK_SIZE 4096

struct task {
    enum task_state state;
    const char *name;
    u32 *saved_esp;
    __attribute__((aligned(16))) u8 kernel_stack[STACK_SIZE];
    __attribute__((aligned(16))) u8 user_stack[STACK_SIZE];
};

static struct task tasks[TASKS];
static struct task *current;                 /* 0 while the boot code runs */
static u32 *scheduler_esp;
static volatile u32 ticks;
extern void trapret(void);
extern void switch_to(u32 **save, u32 *next);

static struct task *spawn(int slot, const char *name, void (*user_entry)(void))
{
    struct task *t = &tasks[slot];
    t->name = name;
    u32 *sp = (u32 *)(t->kernel_stack + STACK_SIZE);
    struct trapframe *tf = (struct trapframe *)((u8 *)sp - sizeof *tf);
    for (u32 *p = (u32 *)tf; p < sp; p++) *p = 0;
    tf->cs = SEG_UCODE;
    tf->ds = tf->es = tf->fs = tf->gs = tf->ss = SEG_UDATA;
    tf->eflags = 0x202;                      /* IF: the timer preempts ring 3 */
    tf->eip = (u32)user_entry;
    tf->esp = (u32)(t->user_stack + STACK_SIZE);
    sp = (u32 *)tf;
    *--sp = (u32)trapret;                    /* switch_to "returns" into trapret -> iret */
    for (int i = 0; i < 4; i++) *--sp = 0;   /* ebp, ebx, esi, edi */
    t->saved_esp = sp;
    t->state = RUNNABLE;
    return t;
}

VISIBLE static void yield(void)
{
    struct task *t = current;
    current = 0;
    switch_to(&t->saved_esp, scheduler_esp);
}

VISIBLE static void scheduler(void)
{
    int next = 0;
    for (;;) {
        int ran = 0;
        for (int i = 0; i < TASKS; i++) {
            struct task *t = &tasks[(next + i) % TASKS];
            if (t->state != RUNNABLE)
                continue;
            next = (next + i + 1) % TASKS;
            current = t;
            tss.esp0 = (u32)(t->kernel_stack + STACK_SIZE);
            switch_to(&scheduler_esp, t->saved_esp);
            ran = 1;
            break;
        }
        if (!ran) {                          /* nothing to run: wait for an interrupt */
            sti();
            halt();
            cli();
        }
    }
}

/* ------------------------------------------------------------------ console input */
#define LINE_MAX 128
static char input_ring[256];
static volatile u32 input_read, input_write;

VISIBLE static void uart_interrupt(void)
{
    while (inb(COM1 + 5) & 1) {
        char c = inb(COM1);
        if (c == '\r') c = '\n';
        if (input_write - input_read < sizeof input_ring)
            input_ring[input_write++ % sizeof input_ring] = c;
    }
    for (int i = 0; i < TASKS; i++)
        if (tasks[i].state == WAITING_INPUT)
            tasks[i].state = RUNNABLE;
}

/* ------------------------------------------------------------------ the race */
#define RACE_WINDOW 2                        /* delay between the load and the store */
#define RACE_PAUSE 40                        /* delay outside the window */
#define RACE_TICKS 3                         /* each task runs for about this many timer ticks */
static u32 race_iterations = 3000;           /* calibrated at boot against the timer */
static volatile u32 race_counter;
static volatile int race_tasks_done;
static u32 race_runs;

static int syscall(int number, u32 a, u32 b)
{
    int ret;
    asm volatile("int $0x40" : "=a"(ret) : "a"(number), "b"(a), "c"(b) : "memory");
    return ret;
}

enum { SYS_WRITE = 1, SYS_GETC, SYS_TICKS, SYS_YIELD, SYS_EXIT, SYS_RACE, SYS_DATE, SYS_DISK, SYS_SMP_RACE };

/* Ring 3. The load and the store are separate instructions with a short delay between them: a
 * timer interrupt in that window lets the other task run, and its increments are overwritten.
 * Most of each iteration is outside the window, so whether updates are lost depends on exactly
 * where the interrupts land. */
VISIBLE static inline void race_step(volatile u32 *counter)
{
    u32 value = *counter;
    for (volatile int d = 0; d < RACE_WINDOW; d++)
        ;
    *counter = value + 1;
    for (volatile int d = 0; d < RACE_PAUSE; d++)
        ;
}

VISIBLE static void race_task(void)
{
    for (u32 i = 0; i < race_iterations; i++)
        race_step(&race_counter);
    syscall(SYS_EXIT, 0, 0);
}

/* How many race iterations fit in one timer tick on this CPU (emulated or not): the race then
 * spans a few ticks whatever the speed, so preemptions happen inside it. */
static VISIBLE void calibrate_race(void)
{
    volatile u32 scratch = 0;
    u32 start, n = 0;
    sti();
    for (start = ticks; ticks == start; )
        halt();
    for (start = ticks; ticks == start; n++)
        race_step(&scratch);
    cli();
    race_iterations = n * RACE_TICKS;
    if (race_iterations < 1000) race_iterations = 1000;
    if (race_iterations > 50000000) race_iterations = 50000000;
    puts("race: "); putu(race_iterations); puts(" iterations per task (about ");
    putu(RACE_TICKS); puts(" timer ticks)\n");
}

VISIBLE static void start_race(void)
{
    race_counter = 0;
    race_tasks_done = 0;
    race_runs++;
    spawn(1, "race-a", race_task);
    spawn(2, "race-b", race_task);
}

VISIBLE static void report_race(void)
{
    puts("race: counter="); putu(race_counter); puts(" expected="); putu(2 * race_iterations);
    puts(race_counter == 2 * race_iterations ? "\nrace: ok\n" : "\nrace: LOST UPDATES\n");
}

/* ------------------------------------------------------------------ several CPUs */
#define AP_START 0x7000                      /* the trampoline's real-mode page (entry.S) */
#define VECTOR_WAKE 48                       /* the IPI that wakes an AP */
#define MAX_CPUS 8
#define SMP_RACE_ITERATIONS 40               /* per CPU: well under one of the machine's turns */
#define SMP_RACE_WINDOW 10                   /* a wider window than race_step's: about half of */
#define SMP_RACE_PAUSE 10                    /* each iteration is between the load and the store */
extern u8 ap_trampoline[], ap_trampoline_end[];
static int ncpu = 1;
static volatile int aps_started;
static volatile u32 smp_round, smp_done;
static __attribute__((aligned(16))) u8 ap_stacks[MAX_CPUS][STACK_SIZE];

/* The processors the MP table lists (the floating pointer is in the EBDA's first KiB). */
static int count_cpus(void)
{
    for (u8 *p = P2V(0x9FC00); p < (u8 *)P2V(0xA0000); p += 16) {
        if (p[0] != '_' || p[1] != 'M' || p[2] != 'P' || p[3] != '_')
            continue;
        u8 *table = P2V(*(u32 *)(p + 4)), *entry = table + 44;
        int n = 0;
        for (int i = 0; i < *(u16 *)(table + 34); i++) {
            if (*entry == 0) { n++; entry += 20; } else entry += 8;
        }
        return n > MAX_CPUS ? MAX_CPUS : n ? n : 1;
    }
    return 1;
}

static void lapic_icr(u32 apic_id, u32 low)
{
    LAPIC[0x310 / 4] = apic_id << 24;
    LAPIC[0x300 / 4] = low;
    while (LAPIC[0x300 / 4] & 0x1000)        /* delivery status */
        ;
}

/* xv6's startothers/lapicstartap: shutdown code 0x0A and the warm-reset vector for a BIOS that
 * would take the INIT, then INIT (assert, de-assert) and two STARTUP IPIs with the page. */
static VISIBLE void start_aps(void)
{
    u8 *code = P2V(AP_START);
    for (u8 *p = ap_trampoline; p < ap_trampoline_end; p++)
        *code++ = *p;
    for (int cpu = 1; cpu < ncpu; cpu++) {
        *(u32 *)P2V(AP_START - 4) = (u32)(ap_stacks[cpu] + STACK_SIZE);
        outb(0x70, 0x0F);
        outb(0x71, 0x0A);
        *(u16 *)P2V(0x467) = 0;
        *(u16 *)P2V(0x469) = AP_START >> 4;
        lapic_icr(cpu, 0x500 | 0x8000 | 0x4000);    /* INIT, level, assert */
        lapic_icr(cpu, 0x500 | 0x8000);             /* INIT, level, de-assert */
        for (int i = 0; i < 2; i++)
            lapic_icr(cpu, 0x600 | (AP_START >> 12));   /* STARTUP at 0x7000 */
        while (aps_started < cpu)
            ;
    }
}

/* One increment of the SMP race: load, a delay, store, a pause. */
static VISIBLE void smp_race_step(volatile u32 *counter)
{
    u32 value = *counter;
    for (volatile int d = 0; d < SMP_RACE_WINDOW; d++)
        ;
    *counter = value + 1;
    for (volatile int d = 0; d < SMP_RACE_PAUSE; d++)
        ;
}

/* An AP: the kernel's segments and interrupt table (no TSS: it stays in ring 0), its LAPIC on
 * with no timer, then wait halted for the BSP's IPIs; CPU 1 takes part in the SMP race. */
void ap_main(void)
{
    use_tables(0);
    LAPIC[0xF0 / 4] = 0x100 | 0xFF;
    LAPIC[0x350 / 4] = 0x10000;
    LAPIC[0x360 / 4] = 0x10000;
    LAPIC[0x80 / 4] = 0;
    u32 id = LAPIC[0x20 / 4] >> 24;
    puts("cpu"); putu(id); puts(": started\n");
    u32 eax = 1, ebx, ecx = 0, edx;
    __asm__ volatile("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
    if (ebx >> 24 != id) {                /* a kernel may take its CPU's number from CPUID */
        puts("cpu"); putu(id); puts(": CPUID leaf 1 says APIC ID "); putu(ebx >> 24); putc('\n');
    }
    aps_started++;
    u32 seen = 0;
    for (;;) {
        while (smp_round == seen) {
            sti();
            halt();
            cli();
        }
        seen = smp_round;
        if (id == 1) {
            for (u32 i = 0; i < SMP_RACE_ITERATIONS; i++)
                smp_race_step(&race_counter);
            smp_done = seen;
        }
    }
}

/* The race across two CPUs (BSP and CPU 1), in the kernel with interrupts off. */
static VISIBLE u32 smp_race(void)
{
    race_counter = 0;
    u32 round = ++smp_round;
    lapic_icr(1, VECTOR_WAKE);               /* fixed delivery: wake CPU 1 */
    for (u32 i = 0; i < SMP_RACE_ITERATIONS; i++)
        smp_race_step(&race_counter);
    while (smp_done != round)
        ;
    puts("race: counter="); putu(race_counter); puts(" expected="); putu(2 * SMP_RACE_ITERATIONS);
    puts(" (2 CPUs)");
    puts(race_counter == 2 * SMP_RACE_ITERATIONS ? "\nrace: ok\n" : "\nrace: LOST UPDATES\n");
    return race_counter;
}

/* ------------------------------------------------------------------ the shell (ring 3) */
static int u_strlen(const char *s) { int n = 0; while (s[n]) n++; return n; }
static void u_puts(const char *s) { syscall(SYS_WRITE, (u32)s, u_strlen(s)); }
static int u_starts(const char *s, const char *prefix)
{
    while (*prefix) if (*s++ != *prefix++) return 0;
    return 1;
}

static void u_putu(u32 v)
{
    char buf[12];
    int i = 11;
    buf[i] = 0;
    do { buf[--i] = '0' + v % 10; v /= 10; } while (v);
    u_puts(buf + i);
}

static u32 u_atou(const char *s)
{
    u32 v = 0;
    while (*s >= '0' && *s <= '9') v = v * 10 + (*s++ - '0');
    return v;
}

VISIBLE static void shell_task(void)
{
    char line[LINE_MAX];
    syscall(SYS_RACE, 0, 0);                 /* wait for the boot race's result */
    for (;;) {
        u_puts("$ ");
        int n = 0;
        for (;;) {
            char c = syscall(SYS_GETC, 0, 0);
            if (c == '\n') break;
            if ((c == '\b' || c == 0x7F)) { if (n) n--; continue; }
            if (n < LINE_MAX - 1) line[n++] = c;
        }
        line[n] = 0;
        if (n == 0) continue;
        if (u_starts(line, "echo ")) { u_puts(line + 5); u_puts("\n"); }
        else if (u_starts(line, "echo")) u_puts("\n");
        else if (u_starts(line, "ticks")) { u_puts("ticks: "); u_putu(syscall(SYS_TICKS, 0, 0)); u_puts("\n"); }
        else if (u_starts(line, "race")) { if (syscall(SYS_SMP_RACE, 0, 0) < 0) syscall(SYS_RACE, 1, 0); }
        else if (u_starts(line, "spin")) {
            u32 millions = line[4] == ' ' ? u_atou(line + 5) : 1;
            u32 sum = 0;
            for (u32 i = 0; i < millions * 1000000u; i++)
                sum = sum * 31 + i;
            u_puts("spin: done "); u_putu(sum); u_puts("\n");
        }
        else if (u_starts(line, "date")) syscall(SYS_DATE, 0, 0);
        else if (u_starts(line, "disk")) syscall(SYS_DISK, 0, 0);
        else if (u_starts(line, "help")) u_puts("commands: echo TEXT, ticks, race, spin N, date, disk, help\n");
        else { u_puts("unknown command: "); u_puts(line); u_puts("\n"); }
    }
}

/* ------------------------------------------------------------------ traps */
VISIBLE static int system_call(struct trapframe *tf)
{
    switch (tf->eax) {
    case SYS_WRITE: {
        const char *s = (const char *)tf->ebx;
        for (u32 i = 0; i < tf->ecx; i++) putc(s[i]);
        return tf->ecx;
    }
    case SYS_GETC:
        for (;;) {
            if (input_read != input_write) {
                char c = input_ring[input_read++ % sizeof input_ring];
                if (c == '\b' || c == 0x7F) puts("\b \b"); else putc(c);   /* echo */
                return c;
            }
            current->state = WAITING_INPUT;
            yield();
        }
    case SYS_TICKS:
        return ticks;
    case SYS_YIELD:
        yield();
        return 0;
    case SYS_EXIT:
        current->state = DONE;
        if (current == &tasks[1] || current == &tasks[2]) {
            if (++race_tasks_done == 2) {
                report_race();
                for (int i = 0; i < TASKS; i++)
                    if (tasks[i].state == WAITING_RACE) tasks[i].state = RUNNABLE;
            }
        }
        yield();
        return 0;
    case SYS_RACE:
        if (tf->ebx) start_race();
        while (race_tasks_done < 2) {
            current->state = WAITING_RACE;
            yield();
        }
        return race_counter;
    case SYS_DATE:
        print_date();
        return 0;
    case SYS_SMP_RACE:
        return ncpu > 1 ? (int)smp_race() : -1;
    case SYS_DISK:
        sti();                               /* wait for IRQ 14 with interrupts on */
        disk_test();
        cli();
        return 0;
    }
    return -1;
}

void trap(struct trapframe *tf)
{
    if (tf->vector == VECTOR_TIMER) {
        ticks++;
        LAPIC[LAPIC_EOI] = 0;
        if (current && (tf->cs & 3))         /* preempt ring-3 code */
            yield();
        return;
    }
    if (tf->vector == 32 + IRQ_COM1) {
        uart_interrupt();
        LAPIC[LAPIC_EOI] = 0;
        return;
    }
    if (tf->vector == 32 + IRQ_IDE) {
        ide_interrupts++;
        LAPIC[LAPIC_EOI] = 0;
        return;
    }
    if (tf->vector == 64) {
        tf->eax = system_call(tf);
        return;
    }
    if (tf->vector == VECTOR_WAKE) {         /* an IPI: the BSP has work for this AP */
        LAPIC[LAPIC_EOI] = 0;
        return;
    }
    if (tf->vector == 255)
        return;                              /* spurious */
    u32 cr2;
    asm volatile("mov %%cr2, %0" : "=r"(cr2));
    puts("\nunexpected trap "); putu(tf->vector); puts(" error "); putx(tf->error);
    puts(" eip "); putx(tf->eip); puts(" cr2 "); putx(cr2);
    puts(current ? " in task " : " in kernel"); if (current) puts(current->name);
    puts("\nhalted\n");
    for (;;) { cli(); halt(); }
}

/* ------------------------------------------------------------------ boot */
void kernel_main(void)
{
    outb(0x21, 0xFF);                        /* mask both 8259 PICs */
    outb(0xA1, 0xFF);
    uart_init();
    load_tables();
    puts("replayvm demo guest\n");
    print_date();
    lapic_init();
    for (int irq = 0; irq < 24; irq++) {     /* mask every IOAPIC pin, then route ours */
        IOAPIC[0] = 0x10 + 2 * irq;
        IOAPIC[4] = 0x10000 | (32 + irq);
    }
    ioapic_route(IRQ_COM1, 32 + IRQ_COM1);
    ioapic_route(IRQ_IDE, 32 + IRQ_IDE);
    ncpu = count_cpus();
    if (ncpu > 1) {
        puts("cpus: "); putu(ncpu); putc('\n');
        start_aps();
    }
    sti();
    disk_test();
    cli();
    calibrate_race();
    start_race();
    spawn(0, "shell", shell_task);
    puts("tasks: race-a race-b shell\n");
    scheduler();
}
