"""cffi build script for replayvm.engines._uc: Unicorn's C API plus the engine's hot paths in C.

What lives in C, and why (each measured or required by exactness):
- the per-instruction hook that keeps the exact instruction count and stops a run at a given
  count or at the first instruction where a pending interrupt can be taken (EFLAGS.IF=1);
- the MMIO read path, so the LAPIC ID register (read on every lock operation by xv6, ~470k/s)
  never enters Python;
- registration of every hook (uc_hook_add is variadic, cffi cannot call it directly);
- reading the pending exception's error code and clearing QEMU's "exception in flight" state,
  which Unicorn never clears because it never runs QEMU's interrupt delivery.
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
    uint8_t *ram;             /* guest RAM, for the page walk that maps a watch to physical */
    uint64_t ram_size;
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
int replayvm_uc_probe_env_layout(uc_engine *uc, struct emu_state *s);
int replayvm_uc_take_exception(uc_engine *uc, struct emu_state *s, int *error_code, int *is_int);
int replayvm_uc_add_watch_hook(uc_engine *uc, struct emu_state *s, uc_hook *out);
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

/* Per-instruction hook: the exact position counter and the two reasons to stop. */
static void on_code(uc_engine *uc, uint64_t address, uint32_t size, void *user_data)
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
        uint32_t eflags = 0;
        uc_reg_read(uc, UC_X86_REG_EFLAGS, &eflags);
        if (eflags & EFLAGS_IF) {
            s->stop_reason = STOP_WINDOW;
            uc_emu_stop(uc);
            return;
        }
        s->prev_if = eflags & EFLAGS_IF;
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
    err = uc_hook_add(uc, &hh, UC_HOOK_CODE, (void *)on_code, s, 1, 0);
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
