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
    uint64_t breaks[64];
    uint64_t skip_icount;     /* ... except the one at (skip_icount, skip_addr): where a run resumes */
    uint64_t skip_addr;
    uint32_t debug_hit;       /* DEBUG_* below: why the debugger stopped the run */
    uint64_t watch_addr;      /* the (virtual) address a watchpoint saw accessed */
    uint32_t nwatch;          /* watchpoints: guest-virtual ranges, checked against each access */
    uint64_t watch_va[4];
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
    /* Exact counting per translation block (BLOCKS_SOURCE below). */
    uint32_t counting_blocks; /* 1: blocks without the per-instruction hook may run */
    uint32_t always_precise;  /* the per-instruction hook everywhere from now on (PAE) */
    uint64_t block_start;     /* icount when the fast block under way began */
    const void *fast_tb;      /* that block (QEMU's TranslationBlock); NULL when none */
    uint64_t precise_until;   /* blocks begun while icount < this run with the per-instruction hook */
    uint32_t window_shadow;   /* a window stop at a block start found QEMU's STI-shadow flag set */
    uint32_t fast_error;      /* FAST_ERROR_*: exact counting was lost (the engine raises) */
    uint32_t precise_mode;    /* the kind of block translated now: hflags bit and hook range agree */
    uint8_t *env;             /* QEMU's CPUX86State, seen by the block hook */
    uint8_t *cpu;             /* QEMU's CPUState (probed) */
    uint8_t *code_hook;       /* our per-instruction hook's struct hook: its range picks the mode */
    int icount_decr_offset;   /* from env: the exit-request word TB starts test (probed) */
    int mem_io_pc_offset;     /* in CPUState: host return address of the MMIO access (probed) */
    uint64_t fast_blocks;     /* fast blocks begun */
    uint64_t mode_switches;
    uint64_t fast_leaves;     /* device accesses that sent a fast block back to its instruction */
    uint32_t bulk_io;         /* BULK_*: whether `rep outs` may hand the device many elements at once */
    uint32_t stos_in_bulk;    /* 1: rep stos iterations may be done at a block's start */
    uc_engine *uc;
    uint64_t bulk_runs;       /* rep outs handed over in bulk, and the iterations they covered */
    uint64_t bulk_elements;
    uint64_t stos_runs;       /* rep stos iterations done at once at a block's start */
    uint64_t stos_elements;
    uint64_t precise_blocks;  /* blocks begun with the per-instruction hook (while counting blocks) */
    uint32_t pae_walk;        /* 1: PAE and 4-level tables are walked here too (a 64-bit vCPU) */
    uint32_t cpuid1[4];       /* several CPUs: CPUID leaf 1 (EAX..EDX) but for the APIC ID byte */
    uint32_t cpuid_long;      /* 1: a 64-bit vCPU (CPUID writes RAX..RDX whole) */
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
#define STOP_RESUME 4
#define DEBUG_NONE 0
#define DEBUG_BREAK 1
#define DEBUG_WATCH 2
#define ENV_WRONG 2
#define FAST_ERROR_NONE 0

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
int replayvm_uc_hook_cpuid(uc_engine *uc, struct emu_state *s, void *owner);
int replayvm_uc_map_mmio(uc_engine *uc, struct emu_state *s, uint64_t base, size_t size, void *owner);
int replayvm_uc_remove_cache(uc_engine *uc, uint64_t begin, uint64_t end);
int replayvm_uc_flush_tlb(uc_engine *uc);
int replayvm_uc_flush_tb(uc_engine *uc);
void replayvm_uc_forget_code_pages(struct emu_state *s);
int replayvm_uc_probe_env_layout(uc_engine *uc, struct emu_state *s);
int replayvm_uc_take_exception(uc_engine *uc, struct emu_state *s, int *error_code, int *is_int);
int replayvm_uc_load_segment(uc_engine *uc, int seg, uint32_t selector, uint64_t base, uint32_t limit, uint32_t flags);
int replayvm_uc_add_watch_hook(uc_engine *uc, struct emu_state *s, uc_hook *out);
int replayvm_uc_use_page_walk(uc_engine *uc, struct emu_state *s, int on);
int replayvm_uc_fault_address(uc_engine *uc, struct emu_state *s, uint64_t *address);
int replayvm_uc_use_blocks(uc_engine *uc, struct emu_state *s);
void replayvm_uc_settle_fault(struct emu_state *s);
const char *replayvm_fast_error_text(uint32_t code);
int replayvm_uc_context_restore(uc_engine *uc, struct emu_state *s, uc_context *ctx);
int replayvm_uc_context_save(uc_engine *uc, uc_context *ctx);
uint32_t replayvm_uc_context_hflags(uc_engine *uc, uc_context *ctx);
size_t replayvm_dirty_pages(const uint8_t *ram, uint8_t *shadow, size_t npages, uint32_t *out, int update);

extern "Python" uint32_t replayvm_py_in(uc_engine *uc, uint32_t port, int size, void *owner);
extern "Python" void replayvm_py_out(uc_engine *uc, uint32_t port, int size, uint32_t value, void *owner);
extern "Python" uint64_t replayvm_py_mmio_read(uint64_t addr, unsigned size, void *owner);
extern "Python" void replayvm_py_mmio_write(uint64_t addr, unsigned size, uint64_t value, void *owner);
extern "Python" void replayvm_py_intr(uc_engine *uc, uint32_t intno, void *owner);
extern "Python" bool replayvm_py_invalid(uc_engine *uc, void *owner);
extern "Python" int replayvm_py_rdtsc(uc_engine *uc, void *owner);
extern "Python" void replayvm_py_syscall(uc_engine *uc, void *owner);
extern "Python" void replayvm_py_io_refused(uc_engine *uc, void *owner);
extern "Python" uint32_t replayvm_py_out_budget(uc_engine *uc, uint32_t port, int size, uint32_t count, void *owner);
extern "Python" void replayvm_py_out_run(uc_engine *uc, uint32_t port, int size, const uint8_t *data, uint32_t count, void *owner);
extern "Python" uint32_t replayvm_py_in_budget(uc_engine *uc, uint32_t port, int size, uint32_t count, void *owner);
extern "Python" int replayvm_py_in_run(uc_engine *uc, uint32_t port, int size, uint8_t *data, uint32_t count, void *owner);
#define BULK_OFF 2
"""

SOURCE = r"""
#include <stdbool.h>
#include <string.h>
#include <stdlib.h>
#include <malloc.h>
#include <dlfcn.h>
#include <stddef.h>
#include <unicorn/unicorn.h>

/* struct emu_state: EMU_STATE above */

#define STOP_NONE 0
#define STOP_COUNT 1
#define STOP_WINDOW 2
#define STOP_BREAK 3
#define STOP_RESUME 4
#define DEBUG_NONE 0
#define DEBUG_BREAK 1
#define DEBUG_WATCH 2
#define EFLAGS_IF 0x200u
#define CR0_PE_BIT 0x1u

static uint32_t replayvm_py_in(uc_engine *uc, uint32_t port, int size, void *owner);
static void replayvm_py_out(uc_engine *uc, uint32_t port, int size, uint32_t value, void *owner);
static uint64_t replayvm_py_mmio_read(uint64_t addr, unsigned size, void *owner);
static void replayvm_py_mmio_write(uint64_t addr, unsigned size, uint64_t value, void *owner);
static void replayvm_py_intr(uc_engine *uc, uint32_t intno, void *owner);
static bool replayvm_py_invalid(uc_engine *uc, void *owner);
static int replayvm_py_rdtsc(uc_engine *uc, void *owner);
static void replayvm_py_syscall(uc_engine *uc, void *owner);
static void replayvm_py_io_refused(uc_engine *uc, void *owner);
static uint32_t replayvm_py_out_budget(uc_engine *uc, uint32_t port, int size, uint32_t count, void *owner);
static void replayvm_py_out_run(uc_engine *uc, uint32_t port, int size, const uint8_t *data, uint32_t count, void *owner);
static uint32_t replayvm_py_in_budget(uc_engine *uc, uint32_t port, int size, uint32_t count, void *owner);
static int replayvm_py_in_run(uc_engine *uc, uint32_t port, int size, uint8_t *data, uint32_t count, void *owner);

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

/* A control register, read whole: an engine opened in UC_MODE_64 (a 64-bit guest) answers CR0-CR4
   as 8 bytes, one in UC_MODE_32 as 4 (into the low half here). */
static uint64_t read_cr(uc_engine *uc, int regid)
{
    uint64_t v = 0;
    uc_reg_read(uc, regid, &v);
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
            if (s->breaks[i] == address) {
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

/* ---- Exact counting per translation block ----------------------------------------------

   The per-instruction hook above is exact but costs: Unicorn syncs EIP and the lazy flags
   around every hooked instruction. Most of the time nothing needs that. So QEMU's cache holds
   two kinds of translated block side by side:
   - fast blocks, translated while our code hook's range covers no address: no per-instruction
     hook at all. Their block hook adds the block's instruction count (TranslationBlock.icount)
     as the block begins;
   - precise blocks, translated with the code hook covering everything: the reference engine.
   The two are told apart by a bit of hflags no QEMU feature uses (PRECISE_HFLAG): it is part of
   the flags QEMU looks blocks up by, so the same guest address can have one of each.

   The block hook runs first in every block. It picks the kind each block should be, and when
   the one running is the wrong kind it sets hflags and the hook range and leaves through
   cpu_loop_exit_noexc, so that QEMU looks the block up again: nothing of it has run yet.
   A fast block is only right when nothing can stop or observe the guest inside it:
   - no stop target inside the block (a count, a debugger breakpoint on one of its
     instructions, any watchpoint);
   - no device access: IN/OUT/RDTSC/MMIO in a fast block send the guest back to the start of
     that instruction, counted up to it, and it runs again in a precise block. Unicorn has
     already synced EIP for IN/OUT/RDTSC; MMIO is restored from cpu->mem_io_pc.
   - an interrupt window can only open at a block boundary: STI, POPF and IRET end their block
     in QEMU, so a waiting interrupt is checked as each block begins (and QEMU's STI-shadow flag
     tells the shadow).
   - an exception inside a fast block (QEMU has restored EIP to the faulting instruction) is
     settled: the count is set to the instructions before it plus the faulting one, as the
     per-instruction hook counts it.
   Everything QEMU-internal used here is found and checked on a scratch engine first
   (probe_blocks); if anything is not as expected, the engine keeps the per-instruction hook. */
#define PRECISE_HFLAG (1u << 30)
#define HF_INHIBIT_IRQ 0x8u
#define ENV_EIP_OFFSET 128
#define ENV_HFLAGS_OFFSET 176
#define TB_SPAN 192               /* TranslationBlock, rounded up to the icache line: code follows */
#define MAX_BLOCK_INSNS 512       /* TCG_MAX_INSNS */
#define CF_COUNT_MASK 0x7fffu
#define GETPC_ADJ 2
#define HOOK_BEGIN_OFFSET 24      /* struct hook (uc_priv.h): type, insn, refs, op, op_flags, to_delete, begin, end */
#define HOOK_CALLBACK_OFFSET 40
#define FAST_ERROR_NONE 0
#define FAST_ERROR_NO_BLOCK 1
#define FAST_ERROR_NO_INSN 2
#define FAST_ERROR_NO_MMIO_PC 3

extern void cpu_loop_exit_noexc_x86_64(void *cpu) __attribute__((noreturn));
extern bool cpu_restore_state_x86_64(void *cpu, uintptr_t host_pc, bool will_exit);

static ptrdiff_t cpu_to_env;      /* offsetof(X86CPU, env): probed once per process */

/* The head of QEMU's TranslationBlock (include/exec/exec-all.h in Unicorn 2.1.4). */
struct tb_view {
    uint64_t pc;               /* linear address of the first instruction */
    uint64_t cs_base;
    uint32_t flags;            /* hflags and some EFLAGS bits at translation */
    uint16_t size;
    uint16_t icount;           /* instructions in the block */
    uint32_t cflags;
    uint32_t trace_vcpu_dstate;
    uint8_t *tc_ptr;           /* host code; its search data follows at tc_ptr + tc_size */
    size_t tc_size;
    const void *orig_tb;
    uintptr_t page_next[2];
    uint64_t page_addr[2];     /* physical pages of its code (-1: none) */
};

const char *replayvm_fast_error_text(uint32_t code)
{
    switch (code) {
    case FAST_ERROR_NO_BLOCK: return "a block hook found no translation block";
    case FAST_ERROR_NO_INSN: return "a device access in a fast block matched none of its instructions";
    case FAST_ERROR_NO_MMIO_PC: return "an MMIO access in a fast block came without its host address";
    default: return "no error";
    }
}

static uint32_t env32(const uint8_t *env, int offset)
{
    uint32_t v;
    memcpy(&v, env + offset, 4);
    return v;
}

/* The block being executed, from the block hook's return address: inline hooks are called
   straight from the block's host code, which starts TB_SPAN bytes after the block's struct. */
static const struct tb_view *tb_from_return(uintptr_t ret, uint64_t pc, uint32_t size)
{
    uintptr_t code = ret & ~(uintptr_t)63;
    int k;
    for (k = 0; k < 3; k++, code -= 64) {
        const struct tb_view *tb = (const struct tb_view *)(code - TB_SPAN);
        if ((uintptr_t)tb->tc_ptr == code && tb->pc == pc && tb->size == size && tb->icount) return tb;
    }
    return NULL;
}

static int64_t sleb128(const uint8_t **pp)
{
    const uint8_t *p = *pp;
    int64_t val = 0;
    int shift = 0;
    uint8_t byte;
    do {
        byte = *p++;
        val |= (int64_t)(byte & 0x7f) << shift;
        shift += 7;
    } while (byte & 0x80);
    if (shift < 64 && (byte & 0x40)) val |= (int64_t)(~(uint64_t)0 << shift);    /* sign-extend */
    *pp = p;
    return val;
}

/* Index in `tb` of the instruction at `eip`, from the block's search data (per instruction:
   pc, cc_op and host end offset, each as a delta); -1 if none. */
static int insn_index(const struct tb_view *tb, uint64_t eip)
{
    const uint8_t *p = tb->tc_ptr + tb->tc_size;
    uint64_t pc = tb->pc;
    int i;
    for (i = 0; i < tb->icount; i++) {
        pc += sleb128(&p);
        sleb128(&p);                  /* cc_op */
        sleb128(&p);                  /* host code end offset */
        if (pc - tb->cs_base == eip) return i;
    }
    return -1;
}

static uint64_t env_eip(const struct emu_state *s)
{
    uint64_t eip;                 /* target_ulong: RIP in 64-bit code, EIP (high half 0) otherwise */
    memcpy(&eip, s->env + ENV_EIP_OFFSET, 8);
    return eip;
}

static void set_hook_range(struct emu_state *s, int precise)
{
    uint64_t range[2];
    range[0] = precise ? 1 : (1ull << 63);          /* begin > end: every address */
    range[1] = precise ? 0 : (1ull << 63);          /* a non-canonical address: none */
    memcpy(s->code_hook + HOOK_BEGIN_OFFSET, range, sizeof range);
    s->precise_mode = precise;
}

/* Make the blocks looked up from now on `precise` or fast, and look the current one up again. */
static void __attribute__((noreturn)) switch_mode(struct emu_state *s, int precise)
{
    uint32_t hflags = env32(s->env, ENV_HFLAGS_OFFSET);
    hflags = precise ? (hflags | PRECISE_HFLAG) : (hflags & ~PRECISE_HFLAG);
    memcpy(s->env + ENV_HFLAGS_OFFSET, &hflags, 4);
    set_hook_range(s, precise);
    s->fast_tb = NULL;
    s->mode_switches++;
    cpu_loop_exit_noexc_x86_64(s->cpu);
}

/* Whether a breakpoint lies in [pc, pc + size): only a block holding one needs the
   per-instruction hook for it (the others run fast while breakpoints are set). */
static int break_within(const struct emu_state *s, uint64_t pc, uint64_t size)
{
    uint32_t i;
    for (i = 0; i < s->nbreak; i++)
        if (s->breaks[i] - pc < size) return 1;
    return 0;
}

/* QEMU's i386 translator ends a block before it reaches TARGET_PAGE_SIZE - 32 bytes, plus one
   instruction (15 bytes at most): no block starting at pc reaches past pc + BLOCK_BYTES_MAX. A
   precise block goes fast only when no breakpoint lies that far after it, so that the fast
   block of the same pc, whatever its length, never holds one (else the two would trade places
   forever). */
#define BLOCK_BYTES_MAX (4096 + 16)

/* Whether a block beginning now at `pc`, at most `icount` instructions and `size` bytes long,
   must be precise. */
static int needs_precise(const struct emu_state *s, uint32_t icount, uint64_t pc, uint64_t size)
{
    return s->always_precise || (s->nbreak && break_within(s, pc, size)) || s->nwatch
        || s->icount < s->precise_until || s->stop_at - s->icount < icount;
}

/* An exception inside the fast block under way, with EIP restored to the faulting instruction:
   count the instructions before it and the faulting one (which the per-instruction hook
   counts as begun). */
static int fetch_fault_at_eip(uc_engine *uc, const struct emu_state *s, const struct tb_view *tb);

static void settle_fast_block_for(uc_engine *uc, struct emu_state *s, uint32_t intno)
{
    const struct tb_view *tb = s->fast_tb;
    int i;
    if (!tb) return;
    s->fast_tb = NULL;
    i = insn_index(tb, env_eip(s));
    if (i < 0 && env_eip(s) == tb->pc + tb->size - tb->cs_base)
        i = tb->icount - 1;       /* INT n, INT3, INTO: Unicorn has moved EIP past the last one */
    if (i < 0 && intno == 14 && fetch_fault_at_eip(uc, s, tb))
        return;                   /* QEMU's walk refused the fetch of the next block: this one
                                     ran whole, and the faulting instruction never began */
    if (i < 0) {
        s->fast_error = FAST_ERROR_NO_INSN;
        return;
    }
    s->icount = s->block_start + (uint64_t)i + 1;
}

static void settle_fast_block(struct emu_state *s)
{
    settle_fast_block_for(NULL, s, 0);
}

/* A page fault raised by QEMU's own walk (PAE, long mode) while translating the block after the
   fast one that just ran: CR2 is in the instruction at EIP (its first byte, or the page its
   later bytes are on). */
static int fetch_fault_at_eip(uc_engine *uc, const struct emu_state *s, const struct tb_view *tb)
{
    uint64_t cr2 = read_cr(uc, UC_X86_REG_CR2), pc = tb->cs_base + env_eip(s);
    return cr2 - pc < 16;
}

/* After a run stopped on a page walk fault of a data access (EIP at the faulting instruction). */
void replayvm_uc_settle_fault(struct emu_state *s)
{
    settle_fast_block(s);
}

/* Device accesses come in bursts (`rep insl` on the disk's data port: one access per
   iteration, each iteration a block of its own): keep blocks precise for a few instructions
   after each, rather than leaving a fast block again at every one. */
#define PRECISE_AFTER_DEVICE 32

static void stay_precise_near_devices(struct emu_state *s)
{
    if (s->counting_blocks && s->precise_until < s->icount + PRECISE_AFTER_DEVICE)
        s->precise_until = s->icount + PRECISE_AFTER_DEVICE;
}

/* A device access by the instruction at EIP inside a fast block: back to that instruction,
   counted up to it, to run it again with the per-instruction hook. */
static void leave_fast_block_at_eip(struct emu_state *s)
{
    const struct tb_view *tb = s->fast_tb;
    int i;
    if (!tb) return;
    i = insn_index(tb, env_eip(s));
    if (i < 0) {
        s->fast_tb = NULL;
        s->fast_error = FAST_ERROR_NO_INSN;
        return;
    }
    s->icount = s->block_start + (uint64_t)i;
    s->precise_until = s->icount + 1;
    s->fast_leaves++;
    switch_mode(s, 1);
}

static uintptr_t mmio_host_pc(const struct emu_state *s)
{
    uintptr_t pc;
    memcpy(&pc, s->cpu + s->mem_io_pc_offset, sizeof pc);
    return pc;
}

/* An MMIO access inside a fast block: QEMU restores EIP (and the lazy flags' state) from the
   host address of the access, then as for port I/O. */
static void leave_fast_block_at_access(struct emu_state *s)
{
    uintptr_t pc;
    if (!s->fast_tb) return;
    pc = mmio_host_pc(s);
    if (!pc || !cpu_restore_state_x86_64(s->cpu, pc, true)) {
        s->fast_tb = NULL;
        s->fast_error = FAST_ERROR_NO_MMIO_PC;
        return;
    }
    leave_fast_block_at_eip(s);
}

/* EIP of the instruction whose host code holds `host_pc`, from the block's search data: what
   cpu_restore_state finds, without its search for the block (we know it) or touching the CPU
   state. -1 if the address is not in the block's code. */
static int64_t eip_at_host_pc(const struct tb_view *tb, uintptr_t host_pc)
{
    const uint8_t *p = tb->tc_ptr + tb->tc_size;
    uintptr_t searched, end = (uintptr_t)tb->tc_ptr;
    uint64_t pc = tb->pc;
    int i;
    if (host_pc <= (uintptr_t)tb->tc_ptr || host_pc >= (uintptr_t)tb->tc_ptr + tb->tc_size) return -1;
    searched = host_pc - GETPC_ADJ;
    for (i = 0; i < tb->icount; i++) {
        pc += sleb128(&p);
        sleb128(&p);                  /* cc_op */
        end += sleb128(&p);
        if (end > searched) return (int64_t)(uint32_t)(pc - tb->cs_base);
    }
    return -1;
}

/* EIP of a pure register read (it is served where it stands): in a fast block, found from the
   host address of the access, for the statistics of where those reads come from. */
static uint32_t pure_read_eip(uc_engine *uc, struct emu_state *s)
{
    uint32_t eip = 0;
    if (s->fast_tb) {
        int64_t found = eip_at_host_pc(s->fast_tb, mmio_host_pc(s));
        if (found >= 0) return (uint32_t)found;
        cpu_restore_state_x86_64(s->cpu, mmio_host_pc(s), false);
    }
    uc_reg_read(uc, UC_X86_REG_EIP, &eip);
    return eip;
}

static void rep_stos_in_bulk(struct emu_state *s, const struct tb_view *tb, uint8_t *env);

__asm__(".text\n"
        ".type replayvm_on_block_entry, @function\n"
        "replayvm_on_block_entry:\n"
        "    mov %rbp, %r8\n"
        "    jmp replayvm_on_block\n");
void replayvm_on_block_entry(uc_engine *uc, uint64_t address, uint32_t size, void *user_data);

__attribute__((used, visibility("hidden"), noinline))
void replayvm_on_block(uc_engine *uc, uint64_t address, uint32_t size, void *user_data, uint8_t *env)
{
    struct emu_state *s = user_data;
    const struct tb_view *tb = tb_from_return((uintptr_t)__builtin_return_address(0), address, size);
    const struct tb_view *previous = s->fast_tb;
    int one_shot;
    s->fast_tb = NULL;
    if (s->env != env) {
        s->env = env;
        s->cpu = env - cpu_to_env;
    }
    if (!tb) {
        s->fast_error = FAST_ERROR_NO_BLOCK;
        s->stop_reason = STOP_COUNT;
        uc_emu_stop(uc);
        return;
    }
    one_shot = (tb->cflags & CF_COUNT_MASK) == 1;
    if (one_shot && previous) {
        /* QEMU cut the previous block short to run one instruction alone: that block wrote
           to its own code (precise self-modifying code). The writing instruction had begun. */
        int i = insn_index(previous, tb->pc - tb->cs_base);
        if (i >= 0) s->icount = s->block_start + (uint64_t)i + 1;
    }
    /* A one-shot block runs as it is: looked up again, it would be the whole block, whose
       store would cut it short once more (and be counted once more). */
    if (tb->flags & PRECISE_HFLAG) {
        s->precise_blocks++;
        if (!one_shot && !needs_precise(s, MAX_BLOCK_INSNS, tb->pc, BLOCK_BYTES_MAX)) switch_mode(s, 0);
        return;                                   /* the per-instruction hook counts */
    }
    if ((int32_t)env32(env, s->icount_decr_offset) < 0) return;   /* exits before it runs */
    if (s->want_window && (env32(env, ENV_EFLAGS_OFFSET) & EFLAGS_IF)) {
        /* What the per-instruction hook's prev_* would tell: the instruction just done was the
           STI that opened the window (STI ends its block, and QEMU flags the shadow). */
        s->window_shadow = (env32(env, ENV_HFLAGS_OFFSET) & HF_INHIBIT_IRQ) != 0;
        s->stop_reason = s->icount >= s->stop_at ? STOP_COUNT : STOP_WINDOW;
        uc_emu_stop(uc);
        return;
    }
    if (s->icount >= s->stop_at) {
        s->stop_reason = STOP_COUNT;
        uc_emu_stop(uc);
        return;
    }
    if (!one_shot && needs_precise(s, tb->icount, tb->pc, tb->size)) switch_mode(s, 1);
    if (tb->icount == 1 && tb->size == 2 && !one_shot) rep_stos_in_bulk(s, tb, env);
    s->fast_tb = tb;
    s->block_start = s->icount;
    s->icount += tb->icount;
    s->fast_blocks++;
}

/* ---- probing QEMU's internals on a scratch engine ---- */
struct probe {
    uc_engine *uc;
    uint8_t *env;
    uint8_t *cpu;
    const struct tb_view *tb;
    int mem_io_pc_offset;
    int icount_decr_offset;
    int index_at_mmio;         /* insn_index of EIP restored at the MMIO read: must be 2 */
    int blocks;
};

__attribute__((used, visibility("hidden"), noinline))
void replayvm_probe_block(uc_engine *uc, uint64_t address, uint32_t size, void *user_data, uint8_t *env)
{
    struct probe *p = user_data;
    p->env = env;
    p->tb = tb_from_return((uintptr_t)__builtin_return_address(0), address, size);
    p->blocks++;
}

__asm__(".text\n"
        ".type replayvm_probe_block_entry, @function\n"
        "replayvm_probe_block_entry:\n"
        "    mov %rbp, %r8\n"
        "    jmp replayvm_probe_block\n");
void replayvm_probe_block_entry(uc_engine *uc, uint64_t address, uint32_t size, void *user_data);

/* The CPUState: uc_struct's `cpu` field sits between function pointers into Unicorn
   (context_size, context_save, context_restore, each possibly NULL, then insn_hook_validate),
   points below env, and its struct holds env_ptr == env. Only a candidate that passes the
   first two tests is read from. */
static int in_unicorn(const void *p, const void *base)
{
    Dl_info info;
    return p && dladdr(p, &info) && info.dli_fbase == base;
}

static int maybe_in_unicorn(const void *p, const void *base)
{
    return !p || in_unicorn(p, base);
}

static uint8_t *find_cpu(uc_engine *uc, uint8_t *env)
{
    size_t size = malloc_usable_size(uc), off, k;
    uint8_t *found = NULL;
    Dl_info self;
    if (!dladdr((void *)uc_open, &self)) return NULL;
    for (off = 24; off + 8 <= size; off += 8) {
        uint8_t *p;
        void *fn[3], *next;
        memcpy(&p, (uint8_t *)uc + off, 8);
        if (p >= env || env - p > (1 << 20) || ((uintptr_t)p & 7)) continue;
        if (off + 16 > size) break;
        memcpy(fn, (uint8_t *)uc + off - 24, sizeof fn);
        memcpy(&next, (uint8_t *)uc + off + 8, sizeof next);
        if (!in_unicorn(next, self.dli_fbase) || !maybe_in_unicorn(fn[0], self.dli_fbase)
                || !maybe_in_unicorn(fn[1], self.dli_fbase) || !maybe_in_unicorn(fn[2], self.dli_fbase))
            continue;
        for (k = 0; k + 8 <= (size_t)(env - p) && k < 4096; k += 8) {
            uint8_t *q;
            memcpy(&q, p + k, 8);
            if (q == env) {
                if (found && found != p) return NULL;      /* ambiguous */
                found = p;
                break;
            }
        }
    }
    return found;
}

static uint64_t probe_mmio_read(uc_engine *uc, uint64_t offset, unsigned size, void *user_data)
{
    struct probe *p = user_data;
    const struct tb_view *tb = p->tb;
    int off, hits = 0, before[4], k;
    if (!tb || !p->env) return 0;
    p->cpu = find_cpu(uc, p->env);
    if (!p->cpu) return 0;
    for (off = 0; off + 8 <= (int)(p->env - p->cpu); off += 8) {
        uintptr_t v;
        memcpy(&v, p->cpu + off, 8);
        if (v > (uintptr_t)tb->tc_ptr && v < (uintptr_t)tb->tc_ptr + tb->tc_size) {
            p->mem_io_pc_offset = off;
            hits++;
        }
    }
    if (hits != 1) { p->mem_io_pc_offset = -1; return 0; }
    if (cpu_restore_state_x86_64(p->cpu, mmio_host_pc(&(struct emu_state){.cpu = p->cpu,
                                 .mem_io_pc_offset = p->mem_io_pc_offset}), false))
        p->index_at_mmio = insn_index(tb, env32(p->env, ENV_EIP_OFFSET));
    /* the exit-request word: negative once a stop is requested (icount_decr.u16.high = -1) */
    for (k = 0; k < 4; k++) before[k] = (int32_t)env32(p->env, -4 * (k + 1));
    uc_emu_stop(uc);
    for (k = 0; k < 4; k++) {
        if (before[k] == 0 && (int32_t)env32(p->env, -4 * (k + 1)) < 0) {
            p->icount_decr_offset = -4 * (k + 1);
            break;
        }
    }
    return 0x1234;
}

static int probe_blocks(struct probe *p)
{
    uc_engine *uc;
    uc_hook hh;
    /* mov ecx, 5; inc ecx; mov eax, [0x10000] (MMIO); hlt */
    static const unsigned char code[] = {0xB9, 5, 0, 0, 0, 0x41, 0xA1, 0, 0, 1, 0, 0xF4};
    int ok = 0;
    memset(p, 0, sizeof *p);
    p->mem_io_pc_offset = -1;
    p->index_at_mmio = -1;
    p->icount_decr_offset = 1;
    if (uc_open(UC_ARCH_X86, UC_MODE_32, &uc)) return -1;
    p->uc = uc;
    if (uc_mem_map(uc, 0, 0x2000, UC_PROT_ALL) || uc_mem_write(uc, 0x1000, code, sizeof code)
            || uc_mmio_map(uc, 0x10000, 0x1000, probe_mmio_read, p, NULL, NULL)
            || uc_hook_add(uc, &hh, UC_HOOK_BLOCK, (void *)replayvm_probe_block_entry, p, 1, 0)) {
        uc_close(uc);
        return -1;
    }
    uc_emu_start(uc, 0x1000, 0x100c, 0, 0);
    if (p->tb && p->cpu && p->tb->icount == 4 && p->tb->pc == 0x1000 && p->index_at_mmio == 2
            && p->tb->page_addr[0] == 0x1000 && p->tb->page_addr[1] == (uint64_t)-1
            && p->mem_io_pc_offset >= 0 && p->icount_decr_offset < 0
            && (env32(p->env, ENV_HFLAGS_OFFSET) & PRECISE_HFLAG) == 0
            && p->env - p->cpu < (1 << 20))
        ok = 1;
    uc_close(uc);
    return ok ? 0 : -1;
}

/* Turn counting per block on for this engine (after probing, once per process). The engine's
   env and CPUState are taken from its first block hook (rbp) and the probed distance. */
int replayvm_uc_use_blocks(uc_engine *uc, struct emu_state *s)
{
    static int probed = 0;
    static struct probe result;
    uc_hook hh;
    void *callback;
    uc_err err;
    if (!probed) {
        probed = probe_blocks(&result) == 0 ? 1 : -1;
        if (probed == 1) cpu_to_env = result.env - result.cpu;
    }
    if (probed != 1 || !s->code_hook) return -1;
    memcpy(&callback, s->code_hook + HOOK_CALLBACK_OFFSET, sizeof callback);
    if (callback != (void *)replayvm_on_code_entry) return -1;
    s->mem_io_pc_offset = result.mem_io_pc_offset;
    s->icount_decr_offset = result.icount_decr_offset;
    err = uc_hook_add(uc, &hh, UC_HOOK_BLOCK, (void *)replayvm_on_block_entry, s, 1, 0);
    if (err) return err;
    s->counting_blocks = 1;
    s->stos_in_bulk = 1;
    s->uc = uc;
    s->precise_until = 0;
    set_hook_range(s, 0);
    uc_ctl_flush_tb(uc);
    return 0;
}

struct mmio_region {
    struct emu_state *s;
    uint64_t base;
    void *owner;
};

/* What the other hooks are registered with: the counters and the Python engine. */
struct hook_ctx {
    struct emu_state *s;
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
        eip = pure_read_eip(uc, s);
        slot = (eip * 2654435761u) >> 22;
        for (i = 0; i < 1024; i++, slot = (slot + 1) & 1023) {
            if (s->id_read_count[slot] == 0) { s->id_read_rip[slot] = eip; s->id_read_count[slot] = 1; break; }
            if (s->id_read_rip[slot] == eip) { s->id_read_count[slot]++; break; }
        }
        if (i == 1024) s->id_read_overflow++;
        return s->lapic_id_value;
    }
    leave_fast_block_at_access(r->s);
    stay_precise_near_devices(r->s);
    return replayvm_py_mmio_read(addr, size, r->owner);
}

static void on_mmio_write(uc_engine *uc, uint64_t offset, unsigned size, uint64_t value, void *user_data)
{
    struct mmio_region *r = user_data;
    leave_fast_block_at_access(r->s);
    stay_precise_near_devices(r->s);
    replayvm_py_mmio_write(r->base + offset, size, value, r->owner);
}

/* Port I/O is allowed in real mode and when CPL <= IOPL (there is no I/O permission bitmap).
   Checked here rather than in Python: xv6's disk writes are one OUT per dword. */
static int io_allowed(uc_engine *uc)
{
    uint32_t cr0 = 0, cs = 0, eflags = 0;
    cr0 = read_cr(uc, UC_X86_REG_CR0);
    if (!(cr0 & CR0_PE_BIT)) return 1;
    uc_reg_read(uc, UC_X86_REG_CS, &cs);
    uc_reg_read(uc, UC_X86_REG_EFLAGS, &eflags);
    return (cs & 3) <= ((eflags >> 12) & 3);
}

/* `rep outs` in bulk. The disk's data port takes a sector as 128 `rep outsl` iterations, each
   an instruction of its own (a position in the trace) and each, one by one, a call into Python.
   When the iteration under way is one of a `rep outsb`/`rep outsd` in 32-bit code, forwards,
   without a segment override, and the elements that follow it are in the same page of RAM, the
   device is offered them all at once: it says how many it takes before it must act (a sector's
   end, when it raises its interrupt), the engine says how many may run before its stop target,
   and those elements go to the device in one call, as the accesses of that many consecutive
   instructions. ESI, ECX and the count then move as the iterations would have moved them. */
#define ENV_DF_OFFSET 172
#define ENV_SEGS_OFFSET 184       /* SegmentCache segs[6]: selector, base, limit, flags (24 bytes) */
#define SEG_CACHE_SIZE 24
#define SEG_ES 0
#define SEG_CS 1
#define SEG_DS 3
#define HF_CS32 (1u << 4)
#define HF_LMA (1u << 14)         /* long mode: 64-bit registers, which the bulk paths do not handle */
#define BULK_UNCHECKED 0
#define BULK_ON 1
#define BULK_OFF 2
#define BULK_MAX_BYTES 4096

static int64_t walk(uc_engine *uc, struct emu_state *s, uint64_t linear);
static int64_t writable_ram(uc_engine *uc, struct emu_state *s, uint32_t linear, int user,
                            uint32_t cr0, uint32_t cr3, uint32_t cr4);

static uint64_t seg_base(const uint8_t *env, int seg)
{
    uint64_t base;
    memcpy(&base, env + ENV_SEGS_OFFSET + seg * SEG_CACHE_SIZE + 8, 8);
    return base;
}

/* The env fields used here, checked once against Unicorn's own register reads. */
static int bulk_layout_checked(uc_engine *uc, struct emu_state *s)
{
    if (s->bulk_io == BULK_UNCHECKED) {
        uint32_t cs = 0, ds = 0, es = 0, esi = 0;
        int32_t df = (int32_t)env32(s->env, ENV_DF_OFFSET);
        uc_reg_read(uc, UC_X86_REG_CS, &cs);
        uc_reg_read(uc, UC_X86_REG_DS, &ds);
        uc_reg_read(uc, UC_X86_REG_ES, &es);
        uc_reg_read(uc, UC_X86_REG_ESI, &esi);
        s->bulk_io = (env32(s->env, ENV_SEGS_OFFSET + SEG_CS * SEG_CACHE_SIZE) == cs
                      && env32(s->env, ENV_SEGS_OFFSET + SEG_DS * SEG_CACHE_SIZE) == ds
                      && env32(s->env, ENV_SEGS_OFFSET + SEG_ES * SEG_CACHE_SIZE) == es
                      && env32(s->env, 6 * 8) == esi && (df == 1 || df == -1)) ? BULK_ON : BULK_OFF;
    }
    return s->bulk_io == BULK_ON;
}

/* Whether the instruction at EIP is `rep <string op>` with the opcode for `size`-byte elements
   (byte4 for dwords, byte1 for bytes), in 32-bit code, forwards, with no other prefix, and the
   engine may hand its iterations over in bulk now. */
static int rep_string_here(uc_engine *uc, struct emu_state *s, int size, uint8_t byte4, uint8_t byte1)
{
    uint8_t *env = s->env;
    uint64_t eip_linear;
    int64_t code_phys;
    const uint8_t *code;
    if (!env || s->nbreak || s->nwatch || !s->counting_blocks) return 0;
    if ((env32(env, ENV_HFLAGS_OFFSET) & (HF_CS32 | HF_LMA)) != HF_CS32
        || (int32_t)env32(env, ENV_DF_OFFSET) != 1) return 0;
    if (!bulk_layout_checked(uc, s)) return 0;
    eip_linear = (seg_base(env, SEG_CS) + env32(env, ENV_EIP_OFFSET)) & 0xFFFFFFFFu;
    if ((eip_linear & 0xFFF) > 0xFFE) return 0;                  /* two bytes in one page */
    code_phys = walk(uc, s, (uint32_t)eip_linear);
    if (code_phys < 0 || (uint64_t)code_phys + 2 > s->ram_size) return 0;
    code = s->ram + code_phys;
    return code[0] == 0xF3 && ((size == 4 && code[1] == byte4) || (size == 1 && code[1] == byte1));
}

/* After `count` iterations went over in bulk: this one ends as usual (QEMU moves the index
   register by `size` and ECX by one); the others are done here. */
static void finish_bulk(uc_engine *uc, struct emu_state *s, int index_reg, int size, uint32_t count)
{
    uint32_t ecx = 0, index = 0;
    uc_reg_read(uc, UC_X86_REG_ECX, &ecx);
    uc_reg_read(uc, index_reg, &index);
    ecx -= count - 1;
    index += (count - 1) * size;
    uc_reg_write(uc, UC_X86_REG_ECX, &ecx);
    uc_reg_write(uc, index_reg, &index);
    s->icount += count - 1;
    s->bulk_runs++;
    s->bulk_elements += count;
}

/* Iterations of the `rep outs` under way (this one included) the device may take at once, and
   where the next element is in RAM; 0 when this access is not such an iteration. */
static uint32_t bulk_out_count(uc_engine *uc, struct emu_state *s, int size, uint64_t *next_element)
{
    uint8_t *env = s->env;
    uint32_t ecx = 0, esi = 0, room;
    uint64_t src_linear;
    int64_t src_phys;
    if (!rep_string_here(uc, s, size, 0x6F, 0x6E)) return 0;    /* rep outsd / rep outsb */
    uc_reg_read(uc, UC_X86_REG_ECX, &ecx);
    uc_reg_read(uc, UC_X86_REG_ESI, &esi);
    src_linear = (seg_base(env, SEG_DS) + esi) & 0xFFFFFFFFu;
    if (src_linear & (size - 1)) return 0;
    room = (uint32_t)((0x1000 - (src_linear & 0xFFF)) / size);  /* this element and the rest of its page */
    src_phys = walk(uc, s, (uint32_t)src_linear);
    if (src_phys < 0 || (uint64_t)src_phys + (uint64_t)room * size > s->ram_size) return 0;
    *next_element = (uint64_t)src_phys + size;
    if (ecx < room) room = ecx;
    if (room > (uint32_t)(BULK_MAX_BYTES / size)) room = (uint32_t)(BULK_MAX_BYTES / size);
    return room;
}

static void on_out(uc_engine *uc, uint32_t port, int size, uint32_t value, void *user_data)
{
    struct hook_ctx *c = user_data;
    struct emu_state *s = c->s;
    uint64_t next_element = 0;
    uint32_t count;
    leave_fast_block_at_eip(s);
    stay_precise_near_devices(s);
    if (!io_allowed(uc)) {
        replayvm_py_io_refused(uc, c->owner);
        return;
    }
    count = bulk_out_count(uc, s, size, &next_element);
    if (count >= 2) {
        uint64_t room = s->stop_at - s->icount + 1;    /* iterations up to the stop target */
        count = replayvm_py_out_budget(uc, port, size, count, c->owner);
        if (count > room) count = (uint32_t)room;
    }
    if (count >= 2) {
        uint8_t data[BULK_MAX_BYTES];
        memcpy(data, &value, size);
        memcpy(data + size, s->ram + next_element, (size_t)(count - 1) * size);
        replayvm_py_out_run(uc, port, size, data, count, c->owner);
        finish_bulk(uc, s, UC_X86_REG_ESI, size, count);
        return;
    }
    replayvm_py_out(uc, port, size, value, c->owner);
}

/* `rep ins` in bulk, the same way: the elements after this one go straight into the page of
   RAM the destination is in, when that page takes the stores without a fault or a change to its
   page table entry and holds no translated code (this iteration's own store, which QEMU makes
   when the hook returns, goes to the same page). */
static uint32_t bulk_in_count(uc_engine *uc, struct emu_state *s, int size, uint64_t *next_element)
{
    uint8_t *env = s->env;
    uint32_t ecx = 0, edi = 0, room, cr0 = 0, cr3 = 0, cr4 = 0;
    uint64_t dst_linear;
    int64_t dst_phys;
    if (!rep_string_here(uc, s, size, 0x6D, 0x6C)) return 0;    /* rep insd / rep insb */
    uc_reg_read(uc, UC_X86_REG_ECX, &ecx);
    uc_reg_read(uc, UC_X86_REG_EDI, &edi);
    dst_linear = (seg_base(env, SEG_ES) + edi) & 0xFFFFFFFFu;
    if (dst_linear & (size - 1)) return 0;
    cr0 = read_cr(uc, UC_X86_REG_CR0);
    cr3 = read_cr(uc, UC_X86_REG_CR3);
    cr4 = read_cr(uc, UC_X86_REG_CR4);
    dst_phys = writable_ram(uc, s, (uint32_t)dst_linear, (env32(env, ENV_HFLAGS_OFFSET) & 3) == 3, cr0, cr3, cr4);
    if (dst_phys < 0) return 0;
    room = (uint32_t)((0x1000 - (dst_linear & 0xFFF)) / size);
    *next_element = (uint64_t)dst_phys + (dst_linear & 0xFFF) + size;
    if (ecx < room) room = ecx;
    if (room > (uint32_t)(BULK_MAX_BYTES / size)) room = (uint32_t)(BULK_MAX_BYTES / size);
    return room;
}

static uint32_t on_in(uc_engine *uc, uint32_t port, int size, void *user_data)
{
    struct hook_ctx *c = user_data;
    struct emu_state *s = c->s;
    uint64_t next_element = 0;
    uint32_t count;
    leave_fast_block_at_eip(s);
    stay_precise_near_devices(s);
    if (!io_allowed(uc)) {
        uint32_t eax = 0;
        replayvm_py_io_refused(uc, c->owner);        /* a #GP once the instruction is done */
        uc_reg_read(uc, UC_X86_REG_EAX, &eax);
        return size == 4 ? eax : eax & ((1u << (8 * size)) - 1);
    }
    count = bulk_in_count(uc, s, size, &next_element);
    if (count >= 2) {
        uint64_t room = s->stop_at - s->icount + 1;
        count = replayvm_py_in_budget(uc, port, size, count, c->owner);
        if (count > room) count = (uint32_t)room;
    }
    if (count >= 2) {
        uint8_t data[BULK_MAX_BYTES];
        uint32_t first = 0;
        if (!replayvm_py_in_run(uc, port, size, data, count, c->owner)) return 0;   /* an error: stopping */
        memcpy(s->ram + next_element, data + size, (size_t)(count - 1) * size);
        memcpy(&first, data, size);
        finish_bulk(uc, s, UC_X86_REG_EDI, size, count);
        return first;
    }
    return replayvm_py_in(uc, port, size, c->owner);
}


/* An exception or INT n. Its delivery (in Python) writes EIP, after which Unicorn stops syncing
   EIP for the I/O hooks until the next uc_emu_start -- and fast blocks rely on that sync. So
   the run ends here, and the engine starts it again at once (STOP_RESUME). */
static void on_intr(uc_engine *uc, uint32_t intno, void *user_data)
{
    struct hook_ctx *c = user_data;
    struct emu_state *s = c->s;
    settle_fast_block_for(uc, s, intno);
    replayvm_py_intr(uc, intno, c->owner);
    if (s->counting_blocks && s->stop_reason == STOP_NONE) {
        s->stop_reason = STOP_RESUME;
        uc_emu_stop(uc);
    }
}

static bool on_invalid(uc_engine *uc, void *user_data)
{
    struct hook_ctx *c = user_data;
    settle_fast_block(c->s);
    return replayvm_py_invalid(uc, c->owner);
}

static int on_rdtsc(uc_engine *uc, void *user_data)
{
    struct hook_ctx *c = user_data;
    leave_fast_block_at_eip(c->s);
    return replayvm_py_rdtsc(uc, c->owner);
}

/* SYSCALL: Unicorn runs the UC_X86_INS_SYSCALL hooks instead of QEMU's transition (and then
   moves RIP past the instruction); the engine does the transition (emu.py). Like an exception's
   delivery it writes RIP, so in block-counting mode the run restarts (see on_intr). */
static void on_syscall(uc_engine *uc, void *user_data)
{
    struct hook_ctx *c = user_data;
    struct emu_state *s = c->s;
    replayvm_py_syscall(uc, c->owner);
    if (s->counting_blocks && s->stop_reason == STOP_NONE) {
        s->stop_reason = STOP_RESUME;
        uc_emu_stop(uc);
    }
}

/* Several CPUs share one Unicorn vCPU, whose CPUID leaf 1 says APIC ID 0 on every one of them:
   leaf 1 is answered here with the running CPU's ID in EBX[31:24] (the ID the LAPIC window
   serves, lapic_id_value, which the engine keeps to the running CPU). Other leaves are QEMU's. */
static int on_cpuid(uc_engine *uc, void *user_data)
{
    struct hook_ctx *c = user_data;
    struct emu_state *s = c->s;
    uint64_t leaf = 0, values[4];
    int i;
    static const int regs32[4] = {UC_X86_REG_EAX, UC_X86_REG_EBX, UC_X86_REG_ECX, UC_X86_REG_EDX};
    static const int regs64[4] = {UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX};
    uc_reg_read(uc, s->cpuid_long ? UC_X86_REG_RAX : UC_X86_REG_EAX, &leaf);
    if ((uint32_t)leaf != 1)
        return 0;
    values[0] = s->cpuid1[0];
    values[1] = (s->cpuid1[1] & 0x00FFFFFFu) | (s->lapic_id_value & 0xFF000000u);
    values[2] = s->cpuid1[2];
    values[3] = s->cpuid1[3];
    for (i = 0; i < 4; i++) {
        if (s->cpuid_long)
            uc_reg_write(uc, regs64[i], &values[i]);
        else {
            uint32_t v = (uint32_t)values[i];
            uc_reg_write(uc, regs32[i], &v);
        }
    }
    return 1;
}

int replayvm_uc_hook_cpuid(uc_engine *uc, struct emu_state *s, void *owner)
{
    uc_hook hh;
    struct hook_ctx *c = malloc(sizeof *c);
    if (!c) return UC_ERR_NOMEM;
    c->s = s;
    c->owner = owner;
    return uc_hook_add(uc, &hh, UC_HOOK_INSN, (void *)on_cpuid, c, 1, 0, UC_X86_INS_CPUID);
}

int replayvm_uc_setup(uc_engine *uc, struct emu_state *s, void *owner, int cpu_model)
{
    uc_hook hh;
    uc_err err;
    struct hook_ctx *c = malloc(sizeof *c);     /* lives as long as the engine; tiny */
    if (!c) return UC_ERR_NOMEM;
    c->s = s;
    c->owner = owner;
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
    s->code_hook = (uint8_t *)hh;
    err = uc_hook_add(uc, &hh, UC_HOOK_INSN, (void *)on_in, c, 1, 0, UC_X86_INS_IN);
    if (err) return err;
    err = uc_hook_add(uc, &hh, UC_HOOK_INSN, (void *)on_out, c, 1, 0, UC_X86_INS_OUT);
    if (err) return err;
    err = uc_hook_add(uc, &hh, UC_HOOK_INTR, (void *)on_intr, c, 1, 0);
    if (err) return err;
    err = uc_hook_add(uc, &hh, UC_HOOK_INSN_INVALID, (void *)on_invalid, c, 1, 0);
    if (err) return err;
    err = uc_hook_add(uc, &hh, UC_HOOK_INSN, (void *)on_rdtsc, c, 1, 0, UC_X86_INS_RDTSC);
    if (err) return err;
    err = uc_hook_add(uc, &hh, UC_HOOK_INSN, (void *)on_syscall, c, 1, 0, UC_X86_INS_SYSCALL);
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

/* Save the vCPU without PRECISE_HFLAG, which says how blocks are translated now, not what the
   guest's state is: saved contexts of the same guest state are then the same bytes. */
int replayvm_uc_context_save(uc_engine *uc, uc_context *ctx)
{
    unsigned char *data;
    uint32_t hflags;
    uc_err err = uc_context_save(uc, ctx);
    if (err) return err;
    data = context_data(uc, ctx);
    memcpy(&hflags, data + ENV_HFLAGS_OFFSET, 4);
    hflags &= ~PRECISE_HFLAG;
    memcpy(data + ENV_HFLAGS_OFFSET, &hflags, 4);
    return UC_ERR_OK;
}

/* Restore a saved vCPU, with the PRECISE_HFLAG the hook range calls for now: a block looked up
   as precise but translated without the per-instruction hook would go uncounted. */
int replayvm_uc_context_restore(uc_engine *uc, struct emu_state *s, uc_context *ctx)
{
    unsigned char *data = context_data(uc, ctx);
    uint32_t hflags;
    memcpy(&hflags, data + ENV_HFLAGS_OFFSET, 4);
    hflags = s->precise_mode ? (hflags | PRECISE_HFLAG) : (hflags & ~PRECISE_HFLAG);
    memcpy(data + ENV_HFLAGS_OFFSET, &hflags, 4);
    return uc_context_restore(uc, ctx);
}

/* QEMU's hflags in a saved context: whether a CPU switched away from was in an STI shadow. */
uint32_t replayvm_uc_context_hflags(uc_engine *uc, uc_context *ctx)
{
    uint32_t hflags;
    memcpy(&hflags, context_data(uc, ctx) + ENV_HFLAGS_OFFSET, 4);
    return hflags;
}

/* Load a segment register with its hidden part, as QEMU's cpu_x86_load_seg_cache does (and the
   hidden flags it derives: CPL from SS, 32/64-bit code from CS, SS32, ADDSEG). Needed on an
   engine opened in UC_MODE_64, where Unicorn writes CS/DS/SS/ES selectors only: the far
   transfers delivery makes (ring 3 -> 0) and set_state go through here there. `flags` is the
   descriptor's high dword, as QEMU keeps it. Done on a saved context, put back at once. */
#define HF_CPL_MASK 3u
#define HF_SS32 (1u << 5)
#define HF_ADDSEG (1u << 6)
#define HF_CS64 (1u << 15)
#define SEG_SS 2
#define DESC_B (1u << 22)
#define DESC_L (1u << 21)
int replayvm_uc_load_segment(uc_engine *uc, int seg, uint32_t selector, uint64_t base, uint32_t limit, uint32_t flags)
{
    static uc_context *ctx;
    unsigned char *data, *sc;
    uint32_t hflags, new_hflags, eflags = 0, ss_flags;
    uint64_t cr0 = read_cr(uc, UC_X86_REG_CR0), ds_base, es_base, ss_base;
    if (seg < 0 || seg > 5) return UC_ERR_ARG;
    uc_reg_read(uc, UC_X86_REG_EFLAGS, &eflags);
    if (!ctx && uc_context_alloc(uc, &ctx)) return UC_ERR_NOMEM;
    if (uc_context_save(uc, ctx)) return UC_ERR_EXCEPTION;
    data = context_data(uc, ctx);
    sc = data + ENV_SEGS_OFFSET + seg * SEG_CACHE_SIZE;
    memcpy(sc, &selector, 4);
    memcpy(sc + 8, &base, 8);
    memcpy(sc + 16, &limit, 4);
    memcpy(sc + 20, &flags, 4);
    memcpy(&hflags, data + ENV_HFLAGS_OFFSET, 4);
    if (seg == SEG_CS) {
        if ((hflags & HF_LMA) && (flags & DESC_L)) hflags |= HF_CS32 | HF_SS32 | HF_CS64;
        else hflags = (hflags & ~(HF_CS32 | HF_CS64)) | ((flags & DESC_B) >> (22 - 4));
    }
    if (seg == SEG_SS) hflags = (hflags & ~HF_CPL_MASK) | ((flags >> 13) & 3);
    memcpy(&ss_flags, data + ENV_SEGS_OFFSET + SEG_SS * SEG_CACHE_SIZE + 20, 4);
    new_hflags = (ss_flags & DESC_B) >> (22 - 5);
    if (hflags & HF_CS64) {
        /* zero bases assumed for DS, ES and SS in long mode */
    } else if (!(cr0 & 1) || (eflags & 0x20000u) || !(hflags & HF_CS32)) {   /* VM */
        new_hflags |= HF_ADDSEG;
    } else {
        memcpy(&ds_base, data + ENV_SEGS_OFFSET + SEG_DS * SEG_CACHE_SIZE + 8, 8);
        memcpy(&es_base, data + ENV_SEGS_OFFSET + SEG_ES * SEG_CACHE_SIZE + 8, 8);
        memcpy(&ss_base, data + ENV_SEGS_OFFSET + SEG_SS * SEG_CACHE_SIZE + 8, 8);
        if (ds_base | es_base | ss_base) new_hflags |= HF_ADDSEG;
    }
    hflags = (hflags & ~(HF_SS32 | HF_ADDSEG)) | new_hflags;
    memcpy(data + ENV_HFLAGS_OFFSET, &hflags, 4);
    return uc_context_restore(uc, ctx);
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
static int64_t walk_pae(uc_engine *uc, struct emu_state *s, uint64_t linear, uint32_t cr4);

static int64_t walk(uc_engine *uc, struct emu_state *s, uint64_t linear)
{
    uint32_t cr0 = 0, cr3 = 0, cr4 = 0, pde, pte;
    uint64_t table;
    cr0 = read_cr(uc, UC_X86_REG_CR0);
    if (!(cr0 & 0x80000000u)) return (uint32_t)linear;
    cr4 = read_cr(uc, UC_X86_REG_CR4);
    if (cr4 & 0x20u) return walk_pae(uc, s, linear, cr4);
    linear = (uint32_t)linear;
    cr3 = read_cr(uc, UC_X86_REG_CR3);
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

/* PAE (a 4-entry PDPT, then PD and PT) or, in long mode, 4 levels from the PML4; 2 MiB pages in
   a PD, 1 GiB pages in a long-mode PDPT. Presence only, as the 32-bit walk above. */
static int64_t walk_pae(uc_engine *uc, struct emu_state *s, uint64_t linear, uint32_t cr4)
{
    uint64_t cr3 = 0, table, entry, efer_msr[2] = {0xC0000080u, 0};
    int level, shift, long_mode;
    (void)cr4;
    uc_reg_read(uc, UC_X86_REG_MSR, efer_msr);
    long_mode = (efer_msr[1] >> 10) & 1;                  /* EFER.LMA */
    cr3 = read_cr(uc, UC_X86_REG_CR3);
    if (long_mode) {
        table = cr3 & 0x000FFFFFFFFFF000ull;
        shift = 39;
    } else {
        linear = (uint32_t)linear;
        table = cr3 & 0xFFFFFFE0u;
        shift = 30;
    }
    for (level = 0; shift >= 12; level++, shift -= 9) {
        int pae_pdpt = !long_mode && shift == 30;
        uint64_t at = table + ((linear >> shift) & (pae_pdpt ? 3 : 0x1FF)) * 8;
        if (at + 8 > s->ram_size) return -1;
        memcpy(&entry, s->ram + at, 8);
        if (!(entry & 1)) return -1;
        if (shift == 12 || ((entry & 0x80) && (shift == 21 || shift == 30) && !pae_pdpt)) {
            uint64_t size = 1ull << shift;
            return (int64_t)(((entry & 0x000FFFFFFFFFF000ull) & ~(size - 1)) | (linear & (size - 1)));
        }
        table = entry & 0x000FFFFFFFFFF000ull;
    }
    return -1;
}

static void on_watch(uc_engine *uc, int type, uint64_t address, int size, int64_t value, void *user_data)
{
    struct emu_state *s = user_data;
    uint32_t i, want = (type == UC_MEM_WRITE) ? 2 : 1;
    for (i = 0; i < s->nwatch; i++) {
        uint64_t va = s->watch_va[i];
        uint32_t len = s->watch_len[i], k;
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
   PAE and long mode: on a 64-bit vCPU walk_pae_fill below; on a 32-bit one the engine falls
   back to QEMU's walk (pae_seen). */
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

/* PAE and 4-level paging as QEMU's walk does them (excp_helper.c, handle_mmu_fault): the
   accessed bit set on each level on the way down (4-level: PML4E and PDPTE; then the PDE of a
   4 KiB page), accessed/dirty on the leaf; reserved bits (above 40 physical address bits, NX
   without EFER.NXE, PS in a PML4E, legacy PDPTE bits) a fault with RSVD; user/write/NX rights
   combined over the levels, CR0.WP; 1 GiB, 2 MiB and 4 KiB pages; the I/D error bit for fetches
   under EFER.NXE. Returns 1 (mapped: *paddr, *prot), 0 (a #PF: *error) or -1: left to QEMU's
   walk (a non-canonical address, whose fault is #GP; SMEP/SMAP/PKE/LA57, which qemu64 lacks). */
#define PG_NX (1ull << 63)
#define PG_ADDRESS 0x000FFFFFFFFFF000ull
#define PG_PSE_PAT (1ull << 12)
#define PHYS_ADDR_BITS 40
#define EFER_NXE (1u << 11)
#define EFER_LMA (1u << 10)
#define PF_INSN 0x10u
#define CR4_SMEP (1u << 20)
#define CR4_SMAP (1u << 21)
#define CR4_PKE (1u << 22)
#define CR4_LA57 (1u << 12)

static uint64_t load_phys64(struct emu_state *s, uint64_t pa)
{
    uint64_t v = 0;
    if (pa + 8 <= s->ram_size) memcpy(&v, s->ram + pa, 8);
    return v;
}

static int in_system_table(uc_engine *uc, uint32_t linear);

static int walk_pae_fill(uc_engine *uc, struct emu_state *s, uint64_t addr, int is_write, int is_fetch,
                         uint32_t cr0, uint32_t cr4, uint64_t *paddr, int *prot_out, uint32_t *error_out)
{
    uint64_t efer_msr[2] = {0xC0000080u, 0}, cr3, rsvd, ptep, pte, pte_addr, entry, entry_addr, page_size;
    uint32_t ss = 0, eflags = 0, error = 0;
    int is_user, prot, lma;
    if (cr4 & (CR4_SMEP | CR4_SMAP | CR4_PKE | CR4_LA57)) return -1;
    uc_reg_read(uc, UC_X86_REG_MSR, efer_msr);
    lma = (efer_msr[1] & EFER_LMA) != 0;
    if (lma) {
        int64_t sext = (int64_t)addr >> 47;
        if (sext != 0 && sext != -1) return -1;
    } else {
        addr = (uint32_t)addr;
    }
    uc_reg_read(uc, UC_X86_REG_SS, &ss);
    uc_reg_read(uc, UC_X86_REG_EFLAGS, &eflags);
    is_user = (eflags & EFLAGS_VM) || (cr0 & CR0_PE && (ss & 3) == 3);
    cr3 = read_cr(uc, UC_X86_REG_CR3);
    rsvd = ~((1ull << PHYS_ADDR_BITS) - 1) & PG_ADDRESS;
    if (!(efer_msr[1] & EFER_NXE)) rsvd |= PG_NX;
    if (lma) {
        entry_addr = (cr3 & PG_ADDRESS) + (((addr >> 39) & 0x1ff) << 3);
        entry = load_phys64(s, entry_addr);                           /* PML4E */
        if (!(entry & PG_PRESENT)) goto fault;
        if (entry & (rsvd | PG_PSE)) goto fault_rsvd;
        if (!(entry & PG_ACCESSED)) { entry |= PG_ACCESSED; store_phys32(s, entry_addr, (uint32_t)entry); }
        ptep = entry ^ PG_NX;
        entry_addr = (entry & PG_ADDRESS) + (((addr >> 30) & 0x1ff) << 3);
        entry = load_phys64(s, entry_addr);                           /* PDPTE */
        if (!(entry & PG_PRESENT)) goto fault;
        if (entry & rsvd) goto fault_rsvd;
        ptep &= entry ^ PG_NX;
        if (!(entry & PG_ACCESSED)) { entry |= PG_ACCESSED; store_phys32(s, entry_addr, (uint32_t)entry); }
        if (entry & PG_PSE) {
            page_size = 1ull << 30;
            pte_addr = entry_addr;
            pte = entry;
            goto check_protect;
        }
    } else {
        entry_addr = (cr3 & ~0x1Full & 0xFFFFFFFFull) + ((addr >> 27) & 0x18);
        entry = load_phys64(s, entry_addr);                           /* PDPTE (legacy PAE) */
        if (!(entry & PG_PRESENT)) goto fault;
        rsvd |= 0x7FF0000000000000ull;                          /* QEMU's PG_HI_USER_MASK */
        if (entry & (rsvd | PG_NX)) goto fault_rsvd;
        ptep = PG_NX | PG_USER | PG_RW;
    }
    entry_addr = (entry & PG_ADDRESS) + (((addr >> 21) & 0x1ff) << 3);
    entry = load_phys64(s, entry_addr);                               /* PDE */
    if (!(entry & PG_PRESENT)) goto fault;
    if (entry & rsvd) goto fault_rsvd;
    ptep &= entry ^ PG_NX;
    if (entry & PG_PSE) {
        page_size = 1ull << 21;
        pte_addr = entry_addr;
        pte = entry;
        goto check_protect;
    }
    if (!(entry & PG_ACCESSED)) { entry |= PG_ACCESSED; store_phys32(s, entry_addr, (uint32_t)entry); }
    pte_addr = (entry & PG_ADDRESS) + (((addr >> 12) & 0x1ff) << 3);
    pte = load_phys64(s, pte_addr);                                   /* PTE */
    if (!(pte & PG_PRESENT)) goto fault;
    if (pte & rsvd) goto fault_rsvd;
    ptep &= pte ^ PG_NX;
    page_size = 4096;
check_protect:
    rsvd |= (page_size - 1) & PG_ADDRESS & ~PG_PSE_PAT;
    if (pte & rsvd) goto fault_rsvd;
    ptep ^= PG_NX;
    if (is_user && !(ptep & PG_USER)) {
        if (!in_system_table(uc, (uint32_t)addr) || (addr >> 32)) goto fault_protect;
        is_user = 0;      /* a descriptor read QEMU makes with supervisor rights (MMU_KSMAP_IDX) */
    }
    prot = UC_PROT_READ;
    if ((ptep & PG_RW) || (!is_user && !(cr0 & CR0_WP))) prot |= UC_PROT_WRITE;
    if (!(ptep & PG_NX)) prot |= UC_PROT_EXEC;
    if (is_fetch ? !(prot & UC_PROT_EXEC) : (is_write && !(prot & UC_PROT_WRITE))) goto fault_protect;
    if (!(pte & PG_ACCESSED) || (is_write && !(pte & PG_DIRTY))) {
        pte |= PG_ACCESSED;
        if (is_write) pte |= PG_DIRTY;
        store_phys32(s, pte_addr, (uint32_t)pte);
    }
    if (!(pte & PG_DIRTY)) prot &= ~UC_PROT_WRITE;     /* the first write comes back to set it */
    prot &= ~UC_PROT_EXEC;                             /* given back below for code pages */
    *paddr = (pte & PG_ADDRESS & ~(page_size - 1)) + (addr & ~0xFFFull & (page_size - 1));
    *prot_out = prot;
    return 1;
fault_rsvd:
    error |= PF_RSVD;
fault_protect:
    error |= PF_PROTECT;
fault:
    if (is_write) error |= PF_WRITE;
    if (is_user) error |= PF_USER;
    if (is_fetch && (efer_msr[1] & EFER_NXE)) error |= PF_INSN;
    *error_out = error;
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
    cr0 = read_cr(uc, UC_X86_REG_CR0);
    if (!(cr0 & CR0_PG)) {
        paddr = linear;
        prot = UC_PROT_READ | UC_PROT_WRITE;
        goto mapped;
    }
    cr4 = read_cr(uc, UC_X86_REG_CR4);
    if ((cr4 & CR4_PAE) && s->pae_walk) {
        int walked = walk_pae_fill(uc, s, vaddr, is_write, is_fetch, cr0, cr4, &paddr, &prot, &error);
        if (walked > 0) goto mapped;
        if (walked == 0) {
            linear = (uint32_t)vaddr;
            goto fault_out;
        }
        /* else: a case this walk leaves to QEMU's (below) */
    }
    if (cr4 & CR4_PAE) {
        s->pae_seen = 1;
        s->fault_pending = 1;
        s->fault_fetch = is_fetch;
        s->fault_error = 0;
        s->fault_page = linear;
        return false;
    }
    cr3 = read_cr(uc, UC_X86_REG_CR3);
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
fault_out:
    s->fault_pending = 1;
    s->fault_fetch = is_fetch;
    s->fault_error = error;
    s->fault_page = (cr4 & CR4_PAE) ? vaddr : linear;
    return false;
}

/* `rep stos` in bulk. xv6 fills pages with `rep stosl` (57 M of the 74 M instructions of its
   boot; every fork and exec again), and QEMU runs each iteration as a block of its own: a block
   hook, an exit check and a block lookup for each stored dword. When a fast block is one
   iteration of a `rep stosb`/`rep stosd` (32-bit code, forwards, no prefix but REP), the block
   hook does the iterations itself, as many as the stop target allows, page by page while the
   page is RAM, holds no translated code, and takes the store without a fault or a change to its
   page table entry (present, writable at this CPL, accessed and dirty already); then it updates
   ECX, EDI and the count as the iterations would, and lets QEMU look up the block again.
   Nothing else can observe those iterations: no device, no interrupt window (IF cannot change),
   no debugger (blocks are precise then). A page that fails the test gets its next iteration
   from QEMU (which may fault, or set the dirty bit), and the bulk goes on after it. */
static int64_t writable_ram(uc_engine *uc, struct emu_state *s, uint32_t linear, int user,
                            uint32_t cr0, uint32_t cr3, uint32_t cr4)
{
    uint32_t pde, pte, ptep;
    uint64_t paddr, page;
    if (!(cr0 & CR0_PG)) {
        paddr = linear & ~0xFFFu;
    } else {
        if (cr4 & CR4_PAE) return -1;
        pde = load_phys32(s, (cr3 & ~0xFFFu) + ((linear >> 20) & 0xFFC));
        if (!(pde & PG_PRESENT)) return -1;
        if ((pde & PG_PSE) && (cr4 & CR4_PSE)) {
            if (pde & 0x201FE000u) return -1;             /* reserved bit 21 or PSE-36: not here */
            pte = ptep = pde;
            paddr = (pde & 0xFFC00000u) + (linear & 0x3FF000u);
        } else {
            if (!(pde & PG_ACCESSED)) return -1;
            pte = load_phys32(s, (pde & ~0xFFFu) + ((linear >> 10) & 0xFFC));
            if (!(pte & PG_PRESENT)) return -1;
            ptep = pde & pte;
            paddr = pte & ~0xFFFu;
        }
        if (user && !(ptep & PG_USER)) return -1;
        if (!(ptep & PG_RW) && (user || (cr0 & CR0_WP))) return -1;
        if ((pte & (PG_ACCESSED | PG_DIRTY)) != (PG_ACCESSED | PG_DIRTY)) return -1;
    }
    page = paddr >> 12;
    if (paddr + 0x1000 > s->ram_size || is_code_page(s, page)) return -1;
    return (int64_t)paddr;
}

static void rep_stos_in_bulk(struct emu_state *s, const struct tb_view *tb, uint8_t *env)
{
    uint64_t code_phys = tb->page_addr[0] + (tb->pc & 0xFFF), left, done = 0;
    uint32_t ecx, edi, eax, cr0 = 0, cr3 = 0, cr4 = 0, hflags;
    int size, user;
    uc_engine *uc;
    if (!s->stos_in_bulk || code_phys + 2 > s->ram_size || s->ram[code_phys] != 0xF3) return;
    if (s->ram[code_phys + 1] == 0xAB) size = 4;
    else if (s->ram[code_phys + 1] == 0xAA) size = 1;
    else return;
    hflags = env32(env, ENV_HFLAGS_OFFSET);
    if ((hflags & (HF_CS32 | HF_LMA)) != HF_CS32 || (int32_t)env32(env, ENV_DF_OFFSET) != 1) return;
    ecx = env32(env, 1 * 8);
    if (ecx < 2) return;
    left = s->stop_at - s->icount;                     /* instructions this run may still begin */
    if (left > ecx) left = ecx;
    if (left < 2) return;
    uc = s->uc;
    cr0 = read_cr(uc, UC_X86_REG_CR0);
    cr3 = read_cr(uc, UC_X86_REG_CR3);
    cr4 = read_cr(uc, UC_X86_REG_CR4);
    user = (hflags & 3) == 3;
    edi = env32(env, 7 * 8);
    eax = env32(env, 0);
    while (left) {
        uint32_t linear = (uint32_t)(seg_base(env, SEG_ES) + edi), room, k;
        int64_t phys;
        if (linear & (size - 1)) break;
        phys = writable_ram(uc, s, linear, user, cr0, cr3, cr4);
        if (phys < 0) break;
        phys += linear & 0xFFF;
        room = (0x1000 - (linear & 0xFFF)) / size;
        if (room > left) room = (uint32_t)left;
        if (size == 1) memset(s->ram + phys, (int)(eax & 0xFF), room);
        else for (k = 0; k < room; k++) memcpy(s->ram + phys + 4 * (uint64_t)k, &eax, 4);
        edi += room * size;
        left -= room;
        done += room;
    }
    if (!done) return;
    ecx -= (uint32_t)done;
    memcpy(env + 1 * 8, &ecx, 4);                      /* the high halves stay 0 in 32-bit code */
    memcpy(env + 7 * 8, &edi, 4);
    /* EIP stays: with ECX at 0 QEMU runs the instruction once more, finds nothing to do and
       goes on, and that run counts as an instruction, as it does one iteration at a time. */
    s->icount += done;
    s->stos_runs++;
    s->stos_elements += done;
    s->fast_tb = NULL;
    cpu_loop_exit_noexc_x86_64(s->cpu);                /* QEMU looks up what comes next */
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
