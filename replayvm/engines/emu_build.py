"""cffi build script for replayvm.engines._uc: Unicorn's C API plus the engine's hot paths in C.

What lives in C, and why (each measured or required by exactness):
- the per-instruction hook that keeps the exact instruction count and stops a run at a given
  count or at the first instruction where a pending interrupt can be taken (EFLAGS.IF=1);
- the MMIO read path, so the LAPIC ID register (read on every lock operation by xv6, ~470k/s)
  never enters Python;
- registration of every hook (uc_hook_add is variadic, cffi cannot call it directly);
- reading the pending exception's error code and clearing QEMU's "exception in flight" state,
  which Unicorn never clears because it never runs QEMU's interrupt delivery;
- the guest's page walk (Unicorn's "virtual TLB" mode). Unicorn 2.1.4 sends every store to a
  page its TLB entry also marks executable through the slow path (~45 ns a store, to catch
  self-modifying code), and QEMU's own x86 walk marks every page executable. Walking here, data
  accesses to pages no code was ever fetched from get non-executable entries, and stores to them
  run at full speed: 5-7x faster on a `rep stosl` (bench in BENCHMARKS.md).
Unicorn itself is not linked: the engine loads libunicorn with RTLD_GLOBAL before importing us.
"""

from __future__ import annotations

import importlib.util
import os

from cffi import FFI


def unicorn_include_dir() -> str:
    spec = importlib.util.find_spec("unicorn")
    if spec is None or spec.origin is None:
        raise RuntimeError("the unicorn package is needed to build replayvm (pip install unicorn==2.1.4)")
    return os.path.join(os.path.dirname(spec.origin), "include")


# The state the C hooks share with Python: declared once, put where EMU_STATE_HERE stands in
# both the declarations for cffi and the C source.
EMU_STATE_HERE = "/* struct emu_state: EMU_STATE above */"
EMU_STATE = r"""
struct emu_state {
    uint64_t icount;          /* instructions begun (hooks run), the engine's position unit */
    uint64_t stop_at;         /* stop before beginning instruction number stop_at */
    uint32_t want_window;     /* an interrupt is pending: stop at the first instruction with IF=1 */
    uint32_t stop_reason;     /* STOP_* below, set when the C hook stopped the run */
    uint32_t prev_if;         /* IF before the previous instruction (valid while want_window) */
    uint64_t prev_addr;       /* previous instruction's address (valid while want_window) */
    uint32_t prev_size;
    uint32_t lapic_id_value;  /* served from C: reads of a pure register are not device input */
    uint64_t lapic_id_reads;
    uint32_t id_read_rip[1024];    /* where those reads come from: EIP -> count (open addressing) */
    uint64_t id_read_count[1024];
    uint64_t id_read_overflow;
    uint64_t lapic_base;
    int env_error_code_offset;    /* offsets into the CPU context, found by probing; -1 unknown */
    int env_old_exception_offset;
    int env_is_int_offset;
    int env_next_eip_offset;
    uint32_t nbreak;          /* debugger: stop before an instruction at one of these linear addresses */
    uint32_t breaks[64];
    uint64_t skip_icount;     /* ... except the one at (skip_icount, skip_addr): where a run resumes */
    uint64_t skip_addr;
    uint32_t debug_hit;       /* DEBUG_* below: why the debugger stopped the run */
    uint64_t watch_addr;      /* the (virtual) address a watchpoint saw accessed */
    uint32_t nwatch;          /* watchpoints: guest-virtual ranges, checked against each access */
    uint32_t watch_va[4];
    uint32_t watch_len[4];
    uint32_t watch_access[4]; /* 1 read, 2 write, 3 both */
    uint8_t *ram;             /* guest RAM, for the page walks */
    uint64_t ram_size;
    uint8_t *code_pages;      /* bitmap of the physical RAM pages code was fetched from since the
                                 last flush of translations: their data TLB entries stay executable */
    uint32_t fault_pending;   /* the page walk refused the last fill: a #PF, or PAE (unsupported) */
    uint32_t fault_error;     /* its #PF error code */
    uint32_t fault_fetch;     /* ... refused an instruction fetch (the instruction never began) */
    uint64_t fault_page;      /* the linear page it refused */
    uint32_t pae_seen;        /* the guest enabled PAE: the engine falls back to QEMU's own walk */
    int uc_invalid_addr_offset;   /* where Unicorn keeps the faulting address (probed); -1 unknown */
    uint64_t tlb_fills;
    uint64_t code_page_flushes;
    uint32_t env_state;       /* ENV_*: whether on_code may read IF from QEMU's CPU state */
};
"""

CDEF = r"""
typedef struct uc_struct uc_engine;
typedef struct uc_context uc_context;
typedef size_t uc_hook;
typedef int uc_err;

typedef struct uc_x86_mmr {
    uint16_t selector;
    uint64_t base;
    uint32_t limit;
    uint32_t flags;
} uc_x86_mmr;

/* struct emu_state: EMU_STATE above */

#define STOP_NONE 0
#define STOP_COUNT 1
#define STOP_WINDOW 2
#define STOP_BREAK 3
#define DEBUG_NONE 0
#define DEBUG_BREAK 1
#define DEBUG_WATCH 2
#define ENV_WRONG 2

#define UC_ARCH_X86 4
#define UC_MODE_32 4
#define UC_PROT_ALL 7
#define UC_ERR_OK 0

uc_err uc_open(int arch, int mode, uc_engine **uc);
uc_err uc_close(uc_engine *uc);
const char *uc_strerror(uc_err code);
uc_err uc_errno(uc_engine *uc);
uc_err uc_mem_map_ptr(uc_engine *uc, uint64_t address, size_t size, uint32_t perms, void *ptr);
uc_err uc_mem_unmap(uc_engine *uc, uint64_t address, size_t size);
uc_err uc_mem_read(uc_engine *uc, uint64_t address, void *bytes, uint64_t size);
uc_err uc_mem_write(uc_engine *uc, uint64_t address, const void *bytes, uint64_t size);
uc_err uc_reg_read(uc_engine *uc, int regid, void *value);
uc_err uc_reg_write(uc_engine *uc, int regid, const void *value);
uc_err uc_emu_start(uc_engine *uc, uint64_t begin, uint64_t until, uint64_t timeout, size_t count);
uc_err uc_emu_stop(uc_engine *uc);
uc_err uc_hook_del(uc_engine *uc, uc_hook hh);
uc_err uc_context_alloc(uc_engine *uc, uc_context **context);
uc_err uc_context_save(uc_engine *uc, uc_context *context);
uc_err uc_context_restore(uc_engine *uc, uc_context *context);
size_t uc_context_size(uc_engine *uc);
uc_err uc_context_free(uc_context *context);

int replayvm_uc_setup(uc_engine *uc, struct emu_state *s, void *owner, int cpu_model);
int replayvm_uc_map_mmio(uc_engine *uc, struct emu_state *s, uint64_t base, size_t size, void *owner);
int replayvm_uc_remove_cache(uc_engine *uc, uint64_t begin, uint64_t end);
int replayvm_uc_flush_tlb(uc_engine *uc);
int replayvm_uc_flush_tb(uc_engine *uc);
void replayvm_uc_forget_code_pages(struct emu_state *s);
int replayvm_uc_probe_env_layout(uc_engine *uc, struct emu_state *s);
int replayvm_uc_take_exception(uc_engine *uc, struct emu_state *s, int *error_code, int *is_int);
int replayvm_uc_add_watch_hook(uc_engine *uc, struct emu_state *s, uc_hook *out);
int replayvm_uc_use_page_walk(uc_engine *uc, struct emu_state *s, int on);
int replayvm_uc_fault_address(uc_engine *uc, struct emu_state *s, uint64_t *address);
size_t replayvm_dirty_pages(const uint8_t *ram, uint8_t *shadow, size_t npages, uint32_t *out, int update);

extern "Python" uint32_t replayvm_py_in(uc_engine *uc, uint32_t port, int size, void *owner);
extern "Python" void replayvm_py_out(uc_engine *uc, uint32_t port, int size, uint32_t value, void *owner);
extern "Python" uint64_t replayvm_py_mmio_read(uint64_t addr, unsigned size, void *owner);
extern "Python" void replayvm_py_mmio_write(uint64_t addr, unsigned size, uint64_t value, void *owner);
extern "Python" void replayvm_py_intr(uc_engine *uc, uint32_t intno, void *owner);
extern "Python" bool replayvm_py_invalid(uc_engine *uc, void *owner);
extern "Python" int replayvm_py_rdtsc(uc_engine *uc, void *owner);
"""

SOURCE = r"""
#include <stdbool.h>
#include <string.h>
#include <stdlib.h>
#include <malloc.h>
#include <unicorn/unicorn.h>

/* struct emu_state: EMU_STATE above */

#define STOP_NONE 0
#define STOP_COUNT 1
#define STOP_WINDOW 2
#define STOP_BREAK 3
#define DEBUG_NONE 0
#define DEBUG_BREAK 1
#define DEBUG_WATCH 2
#define EFLAGS_IF 0x200u

static uint32_t replayvm_py_in(uc_engine *uc, uint32_t port, int size, void *owner);
static void replayvm_py_out(uc_engine *uc, uint32_t port, int size, uint32_t value, void *owner);
static uint64_t replayvm_py_mmio_read(uint64_t addr, unsigned size, void *owner);
static void replayvm_py_mmio_write(uint64_t addr, unsigned size, uint64_t value, void *owner);
static void replayvm_py_intr(uc_engine *uc, uint32_t intno, void *owner);
static bool replayvm_py_invalid(uc_engine *uc, void *owner);
static int replayvm_py_rdtsc(uc_engine *uc, void *owner);

/* Per-instruction hook: the exact position counter and the two reasons to stop.

   While an interrupt waits for EFLAGS.IF, every instruction must look at IF. uc_reg_read(EFLAGS)
   computes all the lazy arithmetic flags to answer (a fifth of xv6's boot went there: its page
   fill runs with interrupts off and the timer pending), while IF itself sits in QEMU's CPU state
   as it is. Translated code keeps that state's address in rbp, and an inline hook (the only
   code hook there is) is called straight from translated code: on_code_entry passes rbp on.
   The first use checks it against uc_reg_read (EAX, ESP and IF must agree) and falls back to
   uc_reg_read for good if they do not. */
#define ENV_EFLAGS_OFFSET 136      /* CPUX86State: target_ulong regs[16], eip, eflags */
#define ENV_ESP_OFFSET 32
#define ENV_UNCHECKED 0
#define ENV_TRUSTED 1
#define ENV_WRONG 2
__asm__(".text\n"
        ".type replayvm_on_code_entry, @function\n"
        "replayvm_on_code_entry:\n"
        "    mov %rbp, %r8\n"
        "    jmp replayvm_on_code\n");
void replayvm_on_code_entry(uc_engine *uc, uint64_t address, uint32_t size, void *user_data);

static uint64_t env_word(const uint8_t *env, int offset)
{
    uint64_t v;
    memcpy(&v, env + offset, 8);
    return v;
}

static uint32_t interrupt_flag(uc_engine *uc, struct emu_state *s, const uint8_t *env)
{
    uint32_t eflags = 0;
    if (s->env_state == ENV_TRUSTED) return (uint32_t)env_word(env, ENV_EFLAGS_OFFSET) & EFLAGS_IF;
    uc_reg_read(uc, UC_X86_REG_EFLAGS, &eflags);
    if (s->env_state == ENV_UNCHECKED) {
        uint32_t eax = 0, esp = 0;
        uc_reg_read(uc, UC_X86_REG_EAX, &eax);
        uc_reg_read(uc, UC_X86_REG_ESP, &esp);
        s->env_state = ((uint32_t)env_word(env, 0) == eax && (uint32_t)env_word(env, ENV_ESP_OFFSET) == esp
                        && ((uint32_t)env_word(env, ENV_EFLAGS_OFFSET) & EFLAGS_IF) == (eflags & EFLAGS_IF))
                       ? ENV_TRUSTED : ENV_WRONG;
    }
    return eflags & EFLAGS_IF;
}

__attribute__((used, visibility("hidden")))
void replayvm_on_code(uc_engine *uc, uint64_t address, uint32_t size, void *user_data, const uint8_t *env)
{
    struct emu_state *s = user_data;
    if (s->icount >= s->stop_at) {
        s->stop_reason = STOP_COUNT;
        uc_emu_stop(uc);
        return;
    }
    if (s->nbreak && !(s->icount == s->skip_icount && address == s->skip_addr)) {
        uint32_t i;
        for (i = 0; i < s->nbreak; i++) {
            if (s->breaks[i] == (uint32_t)address) {
                s->stop_reason = STOP_BREAK;
                s->debug_hit = DEBUG_BREAK;
                uc_emu_stop(uc);
                return;
            }
        }
    }
    if (s->want_window) {
        uint32_t flag = interrupt_flag(uc, s, env);
        if (flag) {
            s->stop_reason = STOP_WINDOW;
            uc_emu_stop(uc);
            return;
        }
        s->prev_if = flag;
        s->prev_addr = address;
        s->prev_size = size;
    }
    s->icount++;
}

struct mmio_region {
    struct emu_state *s;
    uint64_t base;
    void *owner;
};

static uint64_t on_mmio_read(uc_engine *uc, uint64_t offset, unsigned size, void *user_data)
{
    struct mmio_region *r = user_data;
    uint64_t addr = r->base + offset;
    if (addr == r->s->lapic_base + 0x20 && size == 4) {
        struct emu_state *s = r->s;
        uint32_t eip = 0, slot, i;
        s->lapic_id_reads++;
        uc_reg_read(uc, UC_X86_REG_EIP, &eip);
        slot = (eip * 2654435761u) >> 22;
        for (i = 0; i < 1024; i++, slot = (slot + 1) & 1023) {
            if (s->id_read_count[slot] == 0) { s->id_read_rip[slot] = eip; s->id_read_count[slot] = 1; break; }
            if (s->id_read_rip[slot] == eip) { s->id_read_count[slot]++; break; }
        }
        if (i == 1024) s->id_read_overflow++;
        return s->lapic_id_value;
    }
    return replayvm_py_mmio_read(addr, size, r->owner);
}

static void on_mmio_write(uc_engine *uc, uint64_t offset, unsigned size, uint64_t value, void *user_data)
{
    struct mmio_region *r = user_data;
    replayvm_py_mmio_write(r->base + offset, size, value, r->owner);
}

static uint32_t on_in(uc_engine *uc, uint32_t port, int size, void *owner)
{
    return replayvm_py_in(uc, port, size, owner);
}

static void on_out(uc_engine *uc, uint32_t port, int size, uint32_t value, void *owner)
{
    replayvm_py_out(uc, port, size, value, owner);
}

static void on_intr(uc_engine *uc, uint32_t intno, void *owner)
{
    replayvm_py_intr(uc, intno, owner);
}

static bool on_invalid(uc_engine *uc, void *owner)
{
    return replayvm_py_invalid(uc, owner);
}

static int on_rdtsc(uc_engine *uc, void *owner)
{
    return replayvm_py_rdtsc(uc, owner);
}

int replayvm_uc_setup(uc_engine *uc, struct emu_state *s, void *owner, int cpu_model)
{
    uc_hook hh;
    uc_err err;
    if (cpu_model >= 0) {
        err = uc_ctl_set_cpu_model(uc, cpu_model);
        if (err) return err;
    }
    /* Without this, emu_start's `until` argument makes address 0 an exit: guest code at
       linear 0 (xv6's first user program) would stop the run. With exits enabled and none
       listed, only HLT, a count or a stop request ends a run. */
    err = uc_ctl_exits_enable(uc);
    if (err) return err;
    s->env_error_code_offset = -1;
    s->env_old_exception_offset = -1;
    s->env_is_int_offset = -1;
    s->env_next_eip_offset = -1;
    err = uc_hook_add(uc, &hh, UC_HOOK_CODE, (void *)replayvm_on_code_entry, s, 1, 0);
    if (err) return err;
    err = uc_hook_add(uc, &hh, UC_HOOK_INSN, (void *)on_in, owner, 1, 0, UC_X86_INS_IN);
    if (err) return err;
    err = uc_hook_add(uc, &hh, UC_HOOK_INSN, (void *)on_out, owner, 1, 0, UC_X86_INS_OUT);
    if (err) return err;
    err = uc_hook_add(uc, &hh, UC_HOOK_INTR, (void *)on_intr, owner, 1, 0);
    if (err) return err;
    err = uc_hook_add(uc, &hh, UC_HOOK_INSN_INVALID, (void *)on_invalid, owner, 1, 0);
    if (err) return err;
    err = uc_hook_add(uc, &hh, UC_HOOK_INSN, (void *)on_rdtsc, owner, 1, 0, UC_X86_INS_RDTSC);
    if (err) return err;
    return UC_ERR_OK;
}

int replayvm_uc_map_mmio(uc_engine *uc, struct emu_state *s, uint64_t base, size_t size, void *owner)
{
    struct mmio_region *r = malloc(sizeof *r);   /* lives as long as the engine; tiny */
    if (!r) return UC_ERR_NOMEM;
    r->s = s;
    r->base = base;
    r->owner = owner;
    return uc_mmio_map(uc, base, size, on_mmio_read, r, on_mmio_write, r);
}

int replayvm_uc_remove_cache(uc_engine *uc, uint64_t begin, uint64_t end)
{
    return uc_ctl_remove_cache(uc, begin, end);
}

int replayvm_uc_flush_tlb(uc_engine *uc)
{
    return uc_ctl_flush_tlb(uc);
}

/* Drop every translated block (remove_cache translates its start address through the guest's
   page tables, so it cannot cover "all of RAM" once paging is on). */
int replayvm_uc_flush_tb(uc_engine *uc)
{
    return uc_ctl_flush_tb(uc);
}

/* With no translation left, no page holds code: data entries may be non-executable again (the
   TLB must be flushed too, which the engine does right after). */
void replayvm_uc_forget_code_pages(struct emu_state *s)
{
    if (s->code_pages) memset(s->code_pages, 0, (s->ram_size >> 15) + 1);
}

/* The CPU context blob is a copy of QEMU's CPUX86State. Its debug registers dr[0..7] sit 16 bytes
   after error_code (int error_code; int exception_is_int; target_ulong exception_next_eip;) and
   old_exception follows dr[8] and four breakpoint pointers. Find dr[] by writing marks into
   DR0..DR3, then derive the rest; the engine checks the result with a real #PF self-test. */
static unsigned char *context_data(uc_engine *uc, uc_context *ctx)
{
    size_t data_size = *(size_t *)ctx;
    return (unsigned char *)ctx + (uc_context_size(uc) - data_size);
}

int replayvm_uc_probe_env_layout(uc_engine *uc, struct emu_state *s)
{
    uc_context *ctx;
    uint64_t marks[4] = {0x5eed0001u, 0x5eed0002u, 0x5eed0003u, 0x5eed0004u};
    uint64_t zero = 0;
    size_t data_size, off;
    unsigned char *data;
    int found = -1, i;
    if (uc_context_alloc(uc, &ctx)) return -1;
    for (i = 0; i < 4; i++) uc_reg_write(uc, UC_X86_REG_DR0 + i, &marks[i]);
    uc_context_save(uc, ctx);
    data = context_data(uc, ctx);
    data_size = *(size_t *)ctx;
    for (off = 0; off + sizeof marks <= data_size; off += 8) {
        if (memcmp(data + off, marks, sizeof marks) == 0) { found = (int)off; break; }
    }
    for (i = 0; i < 4; i++) uc_reg_write(uc, UC_X86_REG_DR0 + i, &zero);
    uc_context_free(ctx);
    if (found < 16) return -1;
    s->env_error_code_offset = found - 16;
    s->env_is_int_offset = found - 12;
    s->env_next_eip_offset = found - 8;
    s->env_old_exception_offset = found + 8 * 8 + 4 * (int)sizeof(void *);
    return 0;
}

/* Called from the interrupt hook: read the error code and whether the event came from an INT
   instruction, and mark the exception as delivered (old_exception = -1), which is what QEMU's own
   delivery would have done. Without this the second page fault of a session becomes a double
   fault and the third a triple fault. */
int replayvm_uc_take_exception(uc_engine *uc, struct emu_state *s, int *error_code, int *is_int)
{
    static uc_context *ctx;
    unsigned char *data;
    int none = -1;
    if (s->env_old_exception_offset < 0) return -1;
    if (!ctx && uc_context_alloc(uc, &ctx)) return -1;
    if (uc_context_save(uc, ctx)) return -1;
    data = context_data(uc, ctx);
    memcpy(error_code, data + s->env_error_code_offset, sizeof(int));
    memcpy(is_int, data + s->env_is_int_offset, sizeof(int));
    memcpy(data + s->env_old_exception_offset, &none, sizeof(int));
    return uc_context_restore(uc, ctx);
}

/* Watchpoints. Unicorn hands memory hooks physical addresses, while a debugger watches
   guest-virtual ones whose mapping changes with CR3; so one hook sees every access and maps each
   watched range through the guest's page tables at the moment of the access. Only accesses whose
   page offset can overlap a watched range pay for the walk. The access completes; the run stops
   before the next instruction begins (a count stop: uc_emu_stop here would restart it). */
static int64_t walk(uc_engine *uc, struct emu_state *s, uint32_t linear)
{
    uint32_t cr0 = 0, cr3 = 0, cr4 = 0, pde, pte;
    uint64_t table;
    uc_reg_read(uc, UC_X86_REG_CR0, &cr0);
    if (!(cr0 & 0x80000000u)) return linear;
    uc_reg_read(uc, UC_X86_REG_CR3, &cr3);
    uc_reg_read(uc, UC_X86_REG_CR4, &cr4);
    table = (cr3 & 0xFFFFF000u) + ((linear >> 22) << 2);
    if (table + 4 > s->ram_size) return -1;
    memcpy(&pde, s->ram + table, 4);
    if (!(pde & 1)) return -1;
    if ((pde & 0x80) && (cr4 & 0x10)) return (pde & 0xFFC00000u) | (linear & 0x3FFFFFu);
    table = (pde & 0xFFFFF000u) + (((linear >> 12) & 0x3FF) << 2);
    if (table + 4 > s->ram_size) return -1;
    memcpy(&pte, s->ram + table, 4);
    if (!(pte & 1)) return -1;
    return (pte & 0xFFFFF000u) | (linear & 0xFFF);
}

static void on_watch(uc_engine *uc, int type, uint64_t address, int size, int64_t value, void *user_data)
{
    struct emu_state *s = user_data;
    uint32_t i, want = (type == UC_MEM_WRITE) ? 2 : 1;
    for (i = 0; i < s->nwatch; i++) {
        uint32_t va = s->watch_va[i], len = s->watch_len[i], k;
        if (!(s->watch_access[i] & want)) continue;
        /* page offsets are the same virtual and physical: a cheap test first */
        if (len < 4096 && ((uint32_t)address - va) % 4096 >= len &&
            (va - (uint32_t)address) % 4096 >= (uint32_t)size) continue;
        for (k = 0; k < len; k += 4096 - ((va + k) & 0xFFF)) {
            int64_t pa = walk(uc, s, va + k);
            uint32_t piece = 4096 - ((va + k) & 0xFFF);
            if (piece > len - k) piece = len - k;
            if (pa < 0) continue;
            if (address < (uint64_t)pa + piece && (uint64_t)pa < address + size) {
                if (s->debug_hit != DEBUG_WATCH) {
                    s->debug_hit = DEBUG_WATCH;
                    s->watch_addr = va + k + (address > (uint64_t)pa ? address - (uint64_t)pa : 0);
                }
                s->stop_at = s->icount;
                return;
            }
        }
    }
}

int replayvm_uc_add_watch_hook(uc_engine *uc, struct emu_state *s, uc_hook *out)
{
    return uc_hook_add(uc, out, UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, (void *)on_watch, s, 1, 0);
}

/* The guest's page walk, for Unicorn's virtual TLB mode: what QEMU's x86 walk
   (target/i386/excp_helper.c, 32-bit paging without PAE) computes -- accessed and dirty bits,
   user/supervisor and read/write checks with CR0.WP, 4 MiB pages under CR4.PSE, write access only
   once the dirty bit is set, the same #PF error codes -- with one difference in what it hands
   the TLB: a data access to a page no code was fetched from gets a non-executable entry.
   PAE (and long mode) is not walked here: the engine falls back to QEMU's walk (pae_seen). */
#define PG_PRESENT 0x001u
#define PG_RW 0x002u
#define PG_USER 0x004u
#define PG_ACCESSED 0x020u
#define PG_DIRTY 0x040u
#define PG_PSE 0x080u
#define PF_PROTECT 0x1u
#define PF_WRITE 0x2u
#define PF_USER 0x4u
#define PF_RSVD 0x8u
#define CR0_PE 0x1u
#define CR0_WP 0x10000u
#define CR0_PG 0x80000000u
#define CR4_PSE 0x10u
#define CR4_PAE 0x20u
#define EFLAGS_VM 0x20000u

static uint32_t load_phys32(struct emu_state *s, uint64_t pa)
{
    uint32_t v = 0;                 /* outside RAM reads as 0, like QEMU's unassigned memory */
    if (pa + 4 <= s->ram_size) memcpy(&v, s->ram + pa, 4);
    return v;
}

static void store_phys32(struct emu_state *s, uint64_t pa, uint32_t v)
{
    if (pa + 4 <= s->ram_size) memcpy(s->ram + pa, &v, 4);
}

static int is_code_page(struct emu_state *s, uint64_t page)
{
    return page < (s->ram_size >> 12) && (s->code_pages[page >> 3] >> (page & 7)) & 1;
}

/* Whether the page at `linear` holds part of the GDT, LDT, IDT or TSS: the CPU reads those with supervisor
   rights whatever the CPL (QEMU's cpu_ld*_kernel), where this walk cannot see which TLB is
   being filled. */
static int in_system_table(uc_engine *uc, uint32_t linear)
{
    static const int tables[] = {UC_X86_REG_GDTR, UC_X86_REG_IDTR, UC_X86_REG_LDTR, UC_X86_REG_TR};
    int i;
    for (i = 0; i < 4; i++) {
        uc_x86_mmr t = {0};
        uc_reg_read(uc, tables[i], &t);
        uint64_t first = (uint32_t)t.base, last = first + t.limit;
        if (linear <= last && first <= (uint64_t)linear + 0xFFF) return 1;
    }
    return 0;
}

static bool on_tlb_fill(uc_engine *uc, uint64_t vaddr, uc_mem_type type, uc_tlb_entry *e, void *user_data)
{
    struct emu_state *s = user_data;
    uint32_t cr0 = 0, cr3 = 0, cr4 = 0, ss = 0, eflags = 0, pde, pte, ptep, error = 0;
    uint64_t pde_addr, pte_addr, paddr, page;
    int is_write = type == UC_MEM_WRITE, is_fetch = type == UC_MEM_FETCH, is_user, prot;
    uint32_t linear = (uint32_t)vaddr;
    s->tlb_fills++;
    uc_reg_read(uc, UC_X86_REG_CR0, &cr0);
    if (!(cr0 & CR0_PG)) {
        paddr = linear;
        prot = UC_PROT_READ | UC_PROT_WRITE;
        goto mapped;
    }
    uc_reg_read(uc, UC_X86_REG_CR4, &cr4);
    if (cr4 & CR4_PAE) {
        s->pae_seen = 1;
        s->fault_pending = 1;
        s->fault_fetch = is_fetch;
        s->fault_error = 0;
        s->fault_page = linear;
        return false;
    }
    uc_reg_read(uc, UC_X86_REG_CR3, &cr3);
    uc_reg_read(uc, UC_X86_REG_SS, &ss);
    uc_reg_read(uc, UC_X86_REG_EFLAGS, &eflags);
    /* QEMU's CPL follows SS (its DPL, which is its RPL once loaded) */
    is_user = (eflags & EFLAGS_VM) || (cr0 & CR0_PE && (ss & 3) == 3);
    pde_addr = (cr3 & ~0xFFFu) + ((linear >> 20) & 0xFFC);
    pde = load_phys32(s, pde_addr);
    if (!(pde & PG_PRESENT)) goto fault;
    if ((pde & PG_PSE) && (cr4 & CR4_PSE)) {
        uint64_t high = (uint64_t)(pde & 0x1FE000u) << (32 - 13);   /* PSE-36 address bits */
        if (pde & 0x200000u) { error |= PF_RSVD; goto fault_protect; }
        ptep = pde;
        pte = pde;
        pte_addr = pde_addr;
        paddr = ((pde & 0xFFC00000u) | high) + (linear & 0x3FF000u);
    } else {
        if (!(pde & PG_ACCESSED)) {
            pde |= PG_ACCESSED;
            store_phys32(s, pde_addr, pde);
        }
        pte_addr = (pde & ~0xFFFu) + ((linear >> 10) & 0xFFC);
        pte = load_phys32(s, pte_addr);
        if (!(pte & PG_PRESENT)) goto fault;
        ptep = pde & pte;
        paddr = (pte & ~0xFFFu);
    }
    if (is_user && !(ptep & PG_USER)) {
        if (!in_system_table(uc, linear)) goto fault_protect;
        is_user = 0;      /* a descriptor read QEMU makes with supervisor rights (MMU_KSMAP_IDX) */
    }
    prot = UC_PROT_READ | UC_PROT_EXEC;
    if ((ptep & PG_RW) || (!is_user && !(cr0 & CR0_WP))) prot |= UC_PROT_WRITE;
    if (is_write && !(prot & UC_PROT_WRITE)) goto fault_protect;
    if (!(pte & PG_ACCESSED) || (is_write && !(pte & PG_DIRTY))) {
        pte |= PG_ACCESSED;
        if (is_write) pte |= PG_DIRTY;
        store_phys32(s, pte_addr, pte);
    }
    if (!(pte & PG_DIRTY)) prot &= ~UC_PROT_WRITE;     /* the first write comes back to set it */
    prot &= ~UC_PROT_EXEC;
mapped:
    page = paddr >> 12;
    if (is_fetch) {
        if (page < (s->ram_size >> 12) && !is_code_page(s, page)) {
            /* Data entries handed out for this page may be dirty (stores bypass the check for
               self-modifying code): drop them before code from it is translated. */
            s->code_pages[page >> 3] |= (uint8_t)(1u << (page & 7));
            s->code_page_flushes++;
            uc_ctl_flush_tlb(uc);
        }
        prot |= UC_PROT_EXEC;
    } else if (page >= (s->ram_size >> 12) || is_code_page(s, page)) {
        prot |= UC_PROT_EXEC;
    }
    e->paddr = paddr;
    e->perms = prot;
    return true;
fault_protect:
    error |= PF_PROTECT;
fault:
    if (is_write) error |= PF_WRITE;
    if (is_user) error |= PF_USER;
    s->fault_pending = 1;
    s->fault_fetch = is_fetch;
    s->fault_error = error;
    s->fault_page = linear;
    return false;
}

/* Where Unicorn keeps the address of a refused access (uc_struct.invalid_addr): found once per
   process on scratch engines whose walk refuses a known address each, so that CR2 can be loaded
   with the exact address the guest touched. Both probes must find it at the same offset. */
static int probe_fill(uc_engine *uc, uint64_t vaddr, uc_mem_type type, uc_tlb_entry *e, void *user_data)
{
    if ((vaddr >> 12) == 0x12345 || (vaddr >> 12) == 0x2468A) return false;
    e->paddr = vaddr;
    e->perms = UC_PROT_ALL;
    return true;
}

static int probe_one(uint32_t address)
{
    uc_engine *uc;
    uc_hook hh;
    unsigned char code[6] = {0xA1, 0, 0, 0, 0, 0xF4};      /* mov eax, [address]; hlt */
    size_t size, off;
    int found = -1;
    memcpy(code + 1, &address, 4);
    if (uc_open(UC_ARCH_X86, UC_MODE_32, &uc)) return -1;
    if (uc_mem_map(uc, 0, 0x2000, UC_PROT_ALL) || uc_mem_write(uc, 0x1000, code, sizeof code)
            || uc_ctl_tlb_mode(uc, UC_TLB_VIRTUAL)
            || uc_hook_add(uc, &hh, UC_HOOK_TLB_FILL, (void *)probe_fill, NULL, 1, 0)) {
        uc_close(uc);
        return -1;
    }
    if (uc_emu_start(uc, 0x1000, 0x1006, 0, 0) == UC_ERR_EXCEPTION) {
        size = malloc_usable_size(uc);
        for (off = 0; off + 8 <= size; off += 8) {
            uint64_t v;
            memcpy(&v, (char *)uc + off, 8);
            if (v == address) { found = (int)off; break; }
        }
    }
    uc_close(uc);
    return found;
}

static int invalid_addr_offset(void)
{
    static int cached = -2;
    if (cached == -2) {
        int a = probe_one(0x12345678u), b = probe_one(0x2468ACE4u);
        cached = (a >= 0 && a == b) ? a : -1;
    }
    return cached;
}

/* Walk the guest's page tables here (on) or let QEMU do it (off); translations and the TLB are
   dropped either way. Returns -1 when the fault address cannot be located in this Unicorn. */
int replayvm_uc_use_page_walk(uc_engine *uc, struct emu_state *s, int on)
{
    static uc_hook hook;
    uc_err err;
    if (on) {
        s->uc_invalid_addr_offset = invalid_addr_offset();
        if (s->uc_invalid_addr_offset < 0) return -1;
        if (!s->code_pages) {
            s->code_pages = calloc((s->ram_size >> 15) + 1, 1);
            if (!s->code_pages) return UC_ERR_NOMEM;
        }
        err = uc_hook_add(uc, &hook, UC_HOOK_TLB_FILL, (void *)on_tlb_fill, s, 1, 0);
        if (err) return err;
        err = uc_ctl_tlb_mode(uc, UC_TLB_VIRTUAL);
    } else {
        err = uc_ctl_tlb_mode(uc, UC_TLB_CPU);
    }
    if (err) return err;
    uc_ctl_flush_tb(uc);
    return uc_ctl_flush_tlb(uc);
}

/* After a run ended with UC_ERR_EXCEPTION: the linear address the refused access touched. */
int replayvm_uc_fault_address(uc_engine *uc, struct emu_state *s, uint64_t *address)
{
    if (s->uc_invalid_addr_offset < 0) return -1;
    memcpy(address, (char *)uc + s->uc_invalid_addr_offset, 8);
    return 0;
}

/* Checkpoints: which 4 KiB pages of RAM differ from the shadow copy (RAM at the newest
   checkpoint); with `update`, the shadow is brought up to date on the way. Returns how many were
   written to out. */
size_t replayvm_dirty_pages(const uint8_t *ram, uint8_t *shadow, size_t npages, uint32_t *out, int update)
{
    size_t i, n = 0;
    for (i = 0; i < npages; i++) {
        const uint8_t *a = ram + (i << 12);
        uint8_t *b = shadow + (i << 12);
        if (memcmp(a, b, 4096) != 0) {
            if (update) memcpy(b, a, 4096);
            out[n++] = (uint32_t)i;
        }
    }
    return n;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF.replace(EMU_STATE_HERE, EMU_STATE))
ffibuilder.set_source(
    "replayvm.engines._uc",
    SOURCE.replace(EMU_STATE_HERE, EMU_STATE),
    include_dirs=[unicorn_include_dir()],
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    ffibuilder.compile(tmpdir=os.path.join(here, "..", ".."), verbose=False)
