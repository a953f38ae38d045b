// SIMT test executor: runs the kernels' CUDA device code on the CPU, one fiber per CUDA thread.
//
// Test-only (tests/test_kernels_simt.py builds it into libcvig_kernels_simt.so); nothing here ships.
// The serial host build (cvig_host.h) runs each phase's items one after another and evaluates warp
// collectives in one call, so it cannot show what goes wrong *between* threads. This executor runs
// the device path of the same .cu sources with CUDA's semantics:
//
//   * a block's threads are fibers; a fiber runs until it reaches a barrier or a warp collective
//     (__syncthreads, __syncwarp, __shfl_sync, __shfl_down_sync, __ballot_sync) or exits;
//   * when every fiber of the block waits, the runtime resolves what can be resolved: a collective
//     once every lane of its mask waits at the same one (__syncwarp: any __syncwarp with the same
//     mask, as on sm_70+), __syncthreads once every non-exited thread of the block waits at it;
//   * the released fibers then run in the order of the schedule (ascending or descending thread
//     index, or a seeded permutation drawn anew at every release), so code whose result depends on
//     the order of threads between two synchronisation points gives different results under
//     different schedules;
//   * dynamic shared memory is exactly the launch's size, over 48 KiB only after the kernel opted in
//     with cudaFuncSetAttribute, and every load and store of the kernels' code is checked (the
//     compiler's address-sanitizer instrumentation calls the __asan_* hooks below): an access
//     outside it, a read of a byte no thread of the block has written, and (optionally) a shared
//     byte written by one thread and read or written by another with no barrier or __syncwarp
//     between them (a data race);
//   * lanes of one warp waiting at different barriers or collectives (divergence), and a barrier
//     or collective that can never complete (deadlock: a lane named in its mask has exited) end
//     the launch with cudaErrorLaunchFailure and a report (cvig_simt_report()).
//
// Blocks run one after another on the calling OS thread; launches are serialised.
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_runtime_api.h"

#if !defined(__x86_64__) || defined(CVIG_SIMT_UCONTEXT)
#define CVIG_SIMT_USE_UCONTEXT 1
#include <ucontext.h>
#endif

namespace cvig_simt {
namespace {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kRedZone = 64 * 1024;        // around the dynamic shared memory: an access here is out of bounds
constexpr size_t kDefaultSmemLimit = 48 * 1024;  // without cudaFuncSetAttribute

// ---------------------------------------------------------------------------------------------
// Context switching. x86-64: callee-saved registers, MXCSR and the x87 control word on the
// fiber's stack (no signal mask: swapcontext's system call per switch would make the matrix
// minutes slower). Elsewhere (or with CVIG_SIMT_UCONTEXT): ucontext.
// ---------------------------------------------------------------------------------------------
#ifndef CVIG_SIMT_USE_UCONTEXT
extern "C" void cvig_simt_switch_ctx(void** save_sp, void* load_sp);
extern "C" void cvig_simt_fiber_start();
asm(R"(
    .text
    .p2align 4
    .globl cvig_simt_switch_ctx
    .hidden cvig_simt_switch_ctx
    .type cvig_simt_switch_ctx,@function
cvig_simt_switch_ctx:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cvig_simt_switch_ctx, .-cvig_simt_switch_ctx

    .p2align 4
    .globl cvig_simt_fiber_start
    .hidden cvig_simt_fiber_start
    .type cvig_simt_fiber_start,@function
cvig_simt_fiber_start:
    movq %r13, %rdi
    callq *%r12
    ud2
    .size cvig_simt_fiber_start, .-cvig_simt_fiber_start
)");
#endif

struct Fiber;
void fiber_main(Fiber* f);

enum class State { Ready, Blocked, Exited };

struct Pending {  // the barrier or collective a blocked fiber waits at
    CollectiveKind kind;
    unsigned mask;
    uint64_t value;
    int arg, width;
    const char* file;
    int line;
};

struct Fiber {
    ThreadState ts;
    int tid = 0;
    State state = State::Ready;
    Pending op{};
    uint64_t result = 0;
    char* stack = nullptr;  // kStackBytes, lowest page a guard
#ifdef CVIG_SIMT_USE_UCONTEXT
    ucontext_t ctx;
#else
    void* sp = nullptr;
#endif
};

// ---------------------------------------------------------------------------------------------
// Configuration, report, statistics
// ---------------------------------------------------------------------------------------------
struct Config {
    enum Order { Ascending, Descending, Random } order = Ascending;
    uint64_t seed = 0;
    int sms = 132;                       // cudaDevAttrMultiProcessorCount (H100 SXM)
    int smem_optin = 227 * 1024;         // cudaDevAttrMaxSharedMemoryPerBlockOptin (sm_90)
    bool check_races = true;
    unsigned char fill = 0xA5;           // content of shared memory nobody wrote
};

struct Stats {
    long long launches = 0, blocks = 0, threads = 0, switches = 0, collectives = 0, barriers = 0;
};

std::mutex g_launch_mutex;
Config g_cfg;
Stats g_stats;
std::string g_report;                   // first defect since cvig_simt_clear()
cudaError_t g_last_error = cudaSuccess;  // cudaGetLastError
std::map<const void*, int> g_func_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel

// ---------------------------------------------------------------------------------------------
// The launch being executed
// ---------------------------------------------------------------------------------------------
struct ShadowByte {  // who touched one byte of shared memory, and when (sync event count)
    int16_t writer = -1, reader = -1, reader2 = -1;
    uint32_t w_ev = 0, r_ev = 0, r2_ev = 0;
    bool written = false;
};

struct WarpSync {
    uint32_t event;
    unsigned mask;
};

struct Launch {
    dim3 grid, block;
    size_t smem = 0;
    ThreadBody body = nullptr;
    void* closure = nullptr;
    int nthreads = 0, nwarps = 0;
    std::vector<Fiber>* fibers = nullptr;
    Fiber* current = nullptr;
    std::vector<int> round;  // the fibers of this round, in schedule order
    size_t round_pos = 0;
    bool failed = false;
    uint64_t rng = 0;
    // shared memory: [zone, zone + kRedZone) red zone, then smem bytes, then a red zone
    char* zone = nullptr;
    size_t zone_bytes = 0;
    char* smem_base = nullptr;
    std::vector<ShadowByte> shadow;
    // ordering of the current block: sync events are numbered 1, 2, ...; an access records the
    // number of the last event before it
    uint32_t event = 0;
    uint32_t last_block_sync = 0;
    std::vector<std::vector<WarpSync>> warp_syncs;
#ifdef CVIG_SIMT_USE_UCONTEXT
    ucontext_t sched_ctx;
#else
    void* sched_sp = nullptr;
#endif
};

Launch* g_launch = nullptr;  // set while a launch runs (under g_launch_mutex)
// checked by every instrumented access: outside [g_zone_lo, g_zone_lo + g_zone_bytes) is not shared memory
uintptr_t g_zone_lo = 0;
size_t g_zone_bytes = 0;

std::vector<Fiber> g_fibers;  // stacks kept between launches

uint64_t next_random(uint64_t& s) {  // splitmix64
    uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void order(std::vector<int>& ids) {  // ids ascending on entry
    if (g_cfg.order == Config::Descending) {
        std::reverse(ids.begin(), ids.end());
    } else if (g_cfg.order == Config::Random) {
        for (size_t i = ids.size(); i > 1; --i) std::swap(ids[i - 1], ids[next_random(g_launch->rng) % i]);
    }
}

const char* kind_name(CollectiveKind k) {
    switch (k) {
        case kSyncThreads: return "__syncthreads";
        case kSyncWarp: return "__syncwarp";
        case kShfl: return "__shfl_sync";
        case kShflDown: return "__shfl_down_sync";
        case kBallot: return "__ballot_sync";
    }
    return "?";
}

std::string where(const Fiber& f) {
    char buf[160];
    snprintf(buf, sizeof buf, "thread %d (block %u, warp %d, lane %d)", f.tid, f.ts.block_idx.x, f.tid / kWarp,
             f.tid % kWarp);
    return buf;
}

std::string describe_op(const Pending& p) {
    const char* base = strrchr(p.file ? p.file : "?", '/');
    char buf[300];
    if (p.kind == kSyncThreads) {
        snprintf(buf, sizeof buf, "%s at %s:%d", kind_name(p.kind), base ? base + 1 : p.file, p.line);
    } else {
        snprintf(buf, sizeof buf, "%s(mask 0x%08x) at %s:%d", kind_name(p.kind), p.mask, base ? base + 1 : p.file,
                 p.line);
    }
    return buf;
}

std::string code_location(void* pc) {  // library-relative address for addr2line, and the symbol
    Dl_info info;
    char buf[400];
    if (pc && dladdr(pc, &info) && info.dli_fbase) {
        snprintf(buf, sizeof buf, "[%s+0x%lx] %s", info.dli_fname ? strrchr(info.dli_fname, '/') + 1 : "?",
                 static_cast<unsigned long>(static_cast<char*>(pc) - static_cast<char*>(info.dli_fbase)),
                 info.dli_sname ? info.dli_sname : "");
        return buf;
    }
    return "[unknown code address]";
}

void fail(const std::string& what) {
    if (g_launch) g_launch->failed = true;
    if (g_report.empty()) g_report = what;
    g_last_error = cudaErrorLaunchFailure;
}

// ---------------------------------------------------------------------------------------------
// Fibers
// ---------------------------------------------------------------------------------------------
void transfer(Fiber* from, Fiber* to) {  // from == null: the scheduler; to == null: back to the scheduler
    ++g_stats.switches;
    Launch& L = *g_launch;
    L.current = to;
#ifdef CVIG_SIMT_USE_UCONTEXT
    swapcontext(from ? &from->ctx : &L.sched_ctx, to ? &to->ctx : &L.sched_ctx);
#else
    cvig_simt_switch_ctx(from ? &from->sp : &L.sched_sp, to ? to->sp : L.sched_sp);
#endif
}

// A fiber that blocked or exited hands over to the next fiber of this round, or to the scheduler
// when the round is over or the launch failed (one switch per hand-over, not two).
void switch_to_scheduler(Fiber* f) {
    Launch& L = *g_launch;
    Fiber* next = nullptr;
    if (!L.failed && L.round_pos < L.round.size()) next = &(*L.fibers)[L.round[L.round_pos++]];
    transfer(f, next);
}

// Runs the fibers of `ids` in that order, each until it blocks or exits.
void run_round(const std::vector<int>& ids) {
    Launch& L = *g_launch;
    if (ids.empty()) return;
    L.round = ids;
    L.round_pos = 1;
    transfer(nullptr, &(*L.fibers)[ids[0]]);
}

void fiber_main(Fiber* f) {
    g_launch->body(g_launch->closure);
    f->state = State::Exited;
    switch_to_scheduler(f);
    abort();  // an exited fiber is never resumed
}

#ifdef CVIG_SIMT_USE_UCONTEXT
void fiber_entry_u(unsigned hi, unsigned lo) {
    fiber_main(reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

bool ensure_stacks(int n) {
    while (static_cast<int>(g_fibers.size()) < n) g_fibers.emplace_back();
    for (int i = 0; i < n; ++i) {
        Fiber& f = g_fibers[i];
        if (f.stack) continue;
        void* m = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) return false;
        mprotect(m, 4096, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
        f.stack = static_cast<char*>(m);
    }
    return true;
}

void prepare_fiber(Fiber* f) {
    f->state = State::Ready;
    f->result = 0;
#ifdef CVIG_SIMT_USE_UCONTEXT
    getcontext(&f->ctx);
    f->ctx.uc_stack.ss_sp = f->stack + 4096;
    f->ctx.uc_stack.ss_size = kStackBytes - 4096;
    f->ctx.uc_link = nullptr;
    const uintptr_t p = reinterpret_cast<uintptr_t>(f);
    makecontext(&f->ctx, reinterpret_cast<void (*)()>(fiber_entry_u), 2, static_cast<unsigned>(p >> 32),
                static_cast<unsigned>(p & 0xffffffffu));
#else
    // the frame cvig_simt_switch_ctx pops: MXCSR/x87 control word, r15, r14, r13, r12, rbx, rbp, return address
    uintptr_t top = reinterpret_cast<uintptr_t>(f->stack + kStackBytes) & ~static_cast<uintptr_t>(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 8;
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    sp[0] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
    sp[1] = 0;                                                  // r15
    sp[2] = 0;                                                  // r14
    sp[3] = reinterpret_cast<uint64_t>(f);                      // r13: the argument
    sp[4] = reinterpret_cast<uint64_t>(&fiber_main);            // r12: the entry
    sp[5] = 0;                                                  // rbx
    sp[6] = 0;                                                  // rbp
    sp[7] = reinterpret_cast<uint64_t>(&cvig_simt_fiber_start);  // return address
    f->sp = sp;
#endif
}

// ---------------------------------------------------------------------------------------------
// Shared memory checks (called from the __asan_* hooks for accesses inside the zone)
// ---------------------------------------------------------------------------------------------
bool ordered(int prev, uint32_t prev_ev, int me) {  // is an access of `prev` after event prev_ev ordered before now?
    if (prev == me || prev < 0) return true;
    Launch& L = *g_launch;
    if (L.last_block_sync > prev_ev) return true;
    if (prev / kWarp != me / kWarp) return false;
    const unsigned both = (1u << (prev % kWarp)) | (1u << (me % kWarp));
    const auto& syncs = L.warp_syncs[me / kWarp];
    for (auto it = syncs.rbegin(); it != syncs.rend() && it->event > prev_ev; ++it) {
        if ((it->mask & both) == both) return true;
    }
    return false;
}

std::string who(int tid) {
    char buf[64];
    snprintf(buf, sizeof buf, "thread %d (warp %d, lane %d)", tid, tid / kWarp, tid % kWarp);
    return buf;
}

[[noreturn]] void abandon_fiber() {  // after a report: the fiber never runs again
    Fiber* f = g_launch->current;
    f->state = State::Blocked;
    f->op = Pending{kSyncThreads, 0, 0, 0, 0, "abandoned", 0};
    switch_to_scheduler(f);
    abort();
}

void shared_access(uintptr_t addr, size_t n, bool write, void* pc) {
    Launch& L = *g_launch;
    Fiber* f = L.current;
    if (!f || L.failed) return;
    const uintptr_t base = reinterpret_cast<uintptr_t>(L.smem_base);
    char buf[600];
    if (addr < base || addr + n > base + L.smem) {
        snprintf(buf, sizeof buf,
                 "out-of-bounds shared memory access: %s %ss %zu bytes at offset %lld of the launch's %zu bytes of "
                 "dynamic shared memory, in %s",
                 where(*f).c_str(), write ? "write" : "read", n,
                 static_cast<long long>(addr) - static_cast<long long>(base), L.smem, code_location(pc).c_str());
        fail(buf);
        abandon_fiber();
    }
    const size_t off = addr - base;
    const int me = f->tid;
    for (size_t i = 0; i < n; ++i) {
        ShadowByte& s = L.shadow[off + i];
        if (!write) {
            if (!s.written) {
                snprintf(buf, sizeof buf,
                         "read of uninitialized shared memory: %s reads %zu bytes at offset %zu that no thread of "
                         "the block has written in this launch, in %s",
                         where(*f).c_str(), n, off, code_location(pc).c_str());
                fail(buf);
                abandon_fiber();
            }
            if (g_cfg.check_races && !ordered(s.writer, s.w_ev, me)) {
                snprintf(buf, sizeof buf,
                         "race (read after write): %s reads %zu bytes at shared offset %zu written by %s with no "
                         "__syncthreads or __syncwarp between them, in %s",
                         where(*f).c_str(), n, off, who(s.writer).c_str(), code_location(pc).c_str());
                fail(buf);
                abandon_fiber();
            }
            if (s.reader != me) {
                s.reader2 = s.reader;
                s.r2_ev = s.r_ev;
                s.reader = static_cast<int16_t>(me);
            }
            s.r_ev = L.event;
        } else {
            if (g_cfg.check_races) {
                bool after_write = false;
                int other = -1;
                if (s.written && !ordered(s.writer, s.w_ev, me)) {
                    after_write = true;
                    other = s.writer;
                } else if (!ordered(s.reader, s.r_ev, me)) {
                    other = s.reader;
                } else if (!ordered(s.reader2, s.r2_ev, me)) {
                    other = s.reader2;
                }
                if (other >= 0) {
                    snprintf(buf, sizeof buf,
                             "race (write after %s): %s writes %zu bytes at shared offset %zu %s by %s with no "
                             "__syncthreads or __syncwarp between them, in %s",
                             after_write ? "write" : "read", where(*f).c_str(), n, off,
                             after_write ? "written" : "read", who(other).c_str(), code_location(pc).c_str());
                    fail(buf);
                    abandon_fiber();
                }
            }
            s.written = true;
            s.writer = static_cast<int16_t>(me);
            s.w_ev = L.event;
            s.reader = s.reader2 = -1;
        }
    }
}

inline void check_access(uintptr_t addr, size_t n, bool write, void* pc) {
    if (addr + n <= g_zone_lo || addr - g_zone_lo >= g_zone_bytes) return;  // not shared memory: unchecked
    shared_access(addr, n, write, pc);
}

// ---------------------------------------------------------------------------------------------
// Resolving barriers and collectives
// ---------------------------------------------------------------------------------------------
bool same_collective(const Pending& a, const Pending& b) {
    if (a.kind != b.kind || a.mask != b.mask) return false;
    if (a.kind == kSyncWarp) return true;  // sm_70+: any __syncwarp with the same mask
    return a.line == b.line && (a.file == b.file || strcmp(a.file, b.file) == 0);  // the same call
}

std::string warp_state(int warp) {  // what each lane of a warp is doing, grouped
    Launch& L = *g_launch;
    std::vector<Fiber>& F = *L.fibers;
    std::string out;
    int lane = 0;
    while (lane < kWarp) {
        const int tid = warp * kWarp + lane;
        if (tid >= L.nthreads) break;
        std::string what = F[tid].state == State::Exited ? std::string("exited") : describe_op(F[tid].op);
        int end = lane;
        while (end + 1 < kWarp && warp * kWarp + end + 1 < L.nthreads) {
            const Fiber& g = F[warp * kWarp + end + 1];
            std::string w2 = g.state == State::Exited ? std::string("exited") : describe_op(g.op);
            if (w2 != what) break;
            ++end;
        }
        char buf[64];
        snprintf(buf, sizeof buf, lane == end ? "lane %d: " : "lanes %d-%d: ", lane, end);
        out += (out.empty() ? "" : "; ") + std::string(buf) + what;
        lane = end + 1;
    }
    return out;
}

uint64_t shuffle_result(const std::vector<Fiber>& F, int warp, const Fiber& f, bool* bad_src) {
    const int lane = f.tid % kWarp;
    const int width = f.op.width;
    const int seg = lane & ~(width - 1);
    int src;
    if (f.op.kind == kShfl) {
        src = seg + (f.op.arg & (width - 1));
    } else {  // __shfl_down_sync: a lane whose source is outside its segment keeps its own value
        src = (lane - seg) + f.op.arg < width ? lane + f.op.arg : lane;
    }
    *bad_src = !(f.op.mask & (1u << src));
    return F[warp * kWarp + src].op.value;
}

// Resolves what can be; returns the released threads (ascending). Reports divergence and deadlock.
std::vector<int> resolve() {
    Launch& L = *g_launch;
    std::vector<Fiber>& F = *L.fibers;
    std::vector<int> released;
    for (int w = 0; w < L.nwarps && !L.failed; ++w) {
        unsigned done = 0;  // lanes resolved in this pass
        for (int lane = 0; lane < kWarp && !L.failed; ++lane) {
            const int tid = w * kWarp + lane;
            if (tid >= L.nthreads) break;
            Fiber& f = F[tid];
            if (f.state != State::Blocked || f.op.kind == kSyncThreads || (done >> lane & 1u)) continue;
            const unsigned mask = f.op.mask;
            char buf[900];
            if (!(mask >> lane & 1u)) {
                snprintf(buf, sizeof buf, "invalid collective: %s calls %s whose mask does not name its own lane",
                         where(f).c_str(), describe_op(f.op).c_str());
                fail(buf);
                break;
            }
            bool ok = true;
            for (int m = 0; m < kWarp && ok; ++m) {
                if (!(mask >> m & 1u)) continue;
                const int t = w * kWarp + m;
                if (t >= L.nthreads || F[t].state == State::Exited) {
                    snprintf(buf, sizeof buf,
                             "deadlock: %s waits at %s, which names lane %d, but that lane %s: it can never "
                             "complete. Warp %d: %s",
                             where(f).c_str(), describe_op(f.op).c_str(), m,
                             t >= L.nthreads ? "does not exist in this block" : "has exited", w,
                             warp_state(w).c_str());
                    fail(buf);
                    ok = false;
                } else if (!same_collective(F[t].op, f.op)) {
                    snprintf(buf, sizeof buf,
                             "divergence: lanes of warp %d (block %u) wait at different barriers or collectives: %s",
                             w, f.ts.block_idx.x, warp_state(w).c_str());
                    fail(buf);
                    ok = false;
                }
            }
            if (!ok) break;
            // every lane of the mask is here: resolve
            ++g_stats.collectives;
            if (f.op.kind == kSyncWarp) {
                L.warp_syncs[w].push_back(WarpSync{++L.event, mask});
            } else if (f.op.kind == kBallot) {
                unsigned bits = 0;
                for (int m = 0; m < kWarp; ++m)
                    if ((mask >> m & 1u) && F[w * kWarp + m].op.value) bits |= 1u << m;
                for (int m = 0; m < kWarp; ++m)
                    if (mask >> m & 1u) F[w * kWarp + m].result = bits;
            } else if (f.op.kind == kShfl || f.op.kind == kShflDown) {
                for (int m = 0; m < kWarp && ok; ++m) {
                    if (!(mask >> m & 1u)) continue;
                    Fiber& g = F[w * kWarp + m];
                    const int width = g.op.width;
                    if (width < 1 || width > kWarp || (width & (width - 1))) {
                        snprintf(buf, sizeof buf, "invalid collective: %s calls %s with width %d (a power of 2 up to 32)",
                                 where(g).c_str(), describe_op(g.op).c_str(), width);
                        fail(buf);
                        ok = false;
                        break;
                    }
                    bool bad = false;
                    const uint64_t v = shuffle_result(F, w, g, &bad);
                    if (bad) {
                        snprintf(buf, sizeof buf,
                                 "invalid collective: %s reads through %s from a lane outside the mask (undefined)",
                                 where(g).c_str(), describe_op(g.op).c_str());
                        fail(buf);
                        ok = false;
                        break;
                    }
                    g.result = v;  // results and posted values are separate fields: no lane sees another's result
                }
                if (!ok) break;
            }
            for (int m = 0; m < kWarp; ++m) {
                if (!(mask >> m & 1u)) continue;
                F[w * kWarp + m].state = State::Ready;
                released.push_back(w * kWarp + m);
            }
            done |= mask;
        }
    }
    if (L.failed || !released.empty()) {
        if (!std::is_sorted(released.begin(), released.end())) std::sort(released.begin(), released.end());
        return released;
    }
    // no warp collective: a block barrier, when every non-exited thread waits at the same one
    const Fiber* first = nullptr;
    for (int t = 0; t < L.nthreads; ++t) {
        const Fiber& f = F[t];
        if (f.state == State::Exited) continue;
        if (!first) first = &f;
        if (f.op.kind != kSyncThreads || f.op.line != first->op.line || strcmp(f.op.file, first->op.file) != 0) {
            char buf[900];
            if (f.tid / kWarp == first->tid / kWarp || f.op.kind != kSyncThreads) {
                snprintf(buf, sizeof buf, "divergence: lanes of warp %d (block %u) wait at different barriers or "
                         "collectives: %s", f.tid / kWarp, f.ts.block_idx.x, warp_state(f.tid / kWarp).c_str());
            } else {
                snprintf(buf, sizeof buf,
                         "divergence: threads of block %u wait at different __syncthreads: %s waits at %s, %s at %s",
                         f.ts.block_idx.x, where(*first).c_str(), describe_op(first->op).c_str(), where(f).c_str(),
                         describe_op(f.op).c_str());
            }
            fail(buf);
            return released;
        }
    }
    if (first) {
        ++g_stats.barriers;
        L.last_block_sync = ++L.event;
        for (int t = 0; t < L.nthreads; ++t) {
            if (F[t].state == State::Exited) continue;
            F[t].state = State::Ready;
            released.push_back(t);
        }
    }
    return released;
}

void reset_block_state() {
    Launch& L = *g_launch;
    L.event = 0;
    L.last_block_sync = 0;
    for (auto& w : L.warp_syncs) w.clear();
    std::fill(L.shadow.begin(), L.shadow.end(), ShadowByte{});
    memset(L.smem_base, g_cfg.fill, L.smem);
}

void run_block(unsigned bx, unsigned by, unsigned bz) {
    Launch& L = *g_launch;
    std::vector<Fiber>& F = *L.fibers;
    reset_block_state();
    ++g_stats.blocks;
    for (int t = 0; t < L.nthreads; ++t) {
        Fiber& f = F[t];
        f.tid = t;
        f.ts.block_idx = uint3{bx, by, bz};
        f.ts.block_dim = L.block;
        f.ts.grid_dim = L.grid;
        f.ts.thread_idx = uint3{t % L.block.x, (t / L.block.x) % L.block.y, t / (L.block.x * L.block.y)};
        prepare_fiber(&f);
    }
    g_stats.threads += L.nthreads;
    std::vector<int> ready(L.nthreads);
    for (int t = 0; t < L.nthreads; ++t) ready[t] = t;
    order(ready);
    for (;;) {
        run_round(ready);
        if (L.failed) return;
        bool all_exited = true;
        for (int t = 0; t < L.nthreads && all_exited; ++t) all_exited = F[t].state == State::Exited;
        if (all_exited) return;
        ready = resolve();
        if (L.failed) return;
        if (ready.empty()) {
            fail("deadlock: every thread waits and no barrier or collective can complete");
            return;
        }
        order(ready);
    }
}

cudaError_t check_config(const void* kernel, dim3 grid, dim3 block, size_t smem) {
    char buf[300];
    const unsigned long long threads = 1ULL * block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.y > 65535 || grid.z > 65535) {
        snprintf(buf, sizeof buf, "invalid launch configuration: grid (%u, %u, %u), block (%u, %u, %u)", grid.x,
                 grid.y, grid.z, block.x, block.y, block.z);
        fail(buf);
        return cudaErrorInvalidConfiguration;
    }
    size_t limit = kDefaultSmemLimit;
    auto it = g_func_smem.find(kernel);
    if (it != g_func_smem.end()) limit = std::max(limit, static_cast<size_t>(it->second));
    if (smem > limit) {
        snprintf(buf, sizeof buf,
                 "invalid launch: %zu bytes of dynamic shared memory, above the kernel's limit of %zu bytes (over "
                 "48 KiB needs cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) "
                 "first)", smem, limit);
        fail(buf);
        return cudaErrorInvalidValue;
    }
    return cudaSuccess;
}

}  // namespace

ThreadState* current() { return &g_launch->current->ts; }

void* dynamic_shared() { return g_launch->smem_base; }

uint64_t collective(CollectiveKind kind, unsigned mask, uint64_t value, int size, int arg, int width,
                    const char* file, int line) {
    (void)size;
    Fiber* f = g_launch->current;
    f->op = Pending{kind, mask, value, arg, width, file ? file : "?", line};
    f->state = State::Blocked;
    switch_to_scheduler(f);
    return f->result;
}

cudaError_t launch(const void* kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, ThreadBody body,
                   void* closure) {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    ++g_stats.launches;
    Launch L;
    g_launch = &L;
    const cudaError_t bad = check_config(kernel, grid, block, smem);
    if (bad != cudaSuccess) {
        g_last_error = bad;
        g_launch = nullptr;
        return bad;
    }
    L.grid = grid;
    L.block = block;
    L.smem = smem;
    L.body = body;
    L.closure = closure;
    L.nthreads = static_cast<int>(block.x * block.y * block.z);
    L.nwarps = (L.nthreads + kWarp - 1) / kWarp;
    L.rng = g_cfg.seed;
    L.warp_syncs.resize(L.nwarps);
    if (!ensure_stacks(L.nthreads)) {
        fail("the SIMT executor could not allocate fiber stacks");
        g_launch = nullptr;
        return cudaErrorLaunchFailure;
    }
    L.fibers = &g_fibers;
    L.zone_bytes = 2 * kRedZone + smem;
    void* zone = mmap(nullptr, L.zone_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (zone == MAP_FAILED) {
        fail("the SIMT executor could not allocate shared memory");
        g_launch = nullptr;
        return cudaErrorLaunchFailure;
    }
    L.zone = static_cast<char*>(zone);
    L.smem_base = L.zone + kRedZone;
    L.shadow.resize(smem);
    g_zone_lo = reinterpret_cast<uintptr_t>(L.zone);
    g_zone_bytes = L.zone_bytes;
    // blocks in schedule order too: blocks are independent in CUDA, and results must not depend on their order
    const long long nblocks = 1LL * grid.x * grid.y * grid.z;
    std::vector<int> blocks;
    const bool few = nblocks <= (1LL << 22);
    if (few) {
        blocks.resize(nblocks);
        for (long long b = 0; b < nblocks; ++b) blocks[b] = static_cast<int>(b);
        order(blocks);
    }
    for (long long i = 0; i < nblocks && !L.failed; ++i) {
        const long long b = few ? blocks[i] : i;
        run_block(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                  static_cast<unsigned>(b / (1LL * grid.x * grid.y)));
    }
    g_zone_lo = 0;
    g_zone_bytes = 0;
    munmap(L.zone, L.zone_bytes);
    g_launch = nullptr;
    return L.failed ? cudaErrorLaunchFailure : cudaSuccess;
}

}  // namespace cvig_simt

using namespace cvig_simt;

cudaError_t cudaGetLastError(void) {
    const cudaError_t e = g_last_error;
    g_last_error = cudaSuccess;
    return e;
}

cudaError_t cudaGetDevice(int* device) {
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
    if (device != 0) return cudaErrorInvalidValue;
    switch (attr) {
        case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
        case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; return cudaSuccess;
        case cudaDevAttrMultiProcessorCount: *value = g_cfg.sms; return cudaSuccess;
        case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = g_cfg.smem_optin; return cudaSuccess;
    }
    return cudaErrorInvalidValue;
}

cudaError_t cudaFuncSetAttributeRaw(const void* func, cudaFuncAttribute attr, int value) {
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > g_cfg.smem_optin) {
        g_last_error = cudaErrorInvalidValue;
        return cudaErrorInvalidValue;
    }
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    g_func_smem[func] = value;
    return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// The compiler's instrumentation (-fsanitize=kernel-address with calls for every access) calls these
// for each load and store of the kernels' code.
// ---------------------------------------------------------------------------------------------
#define CVIG_SIMT_HOOKS(n)                                                                                      \
    extern "C" void __asan_load##n##_noabort(uintptr_t a) { check_access(a, n, false, __builtin_return_address(0)); } \
    extern "C" void __asan_store##n##_noabort(uintptr_t a) { check_access(a, n, true, __builtin_return_address(0)); }
CVIG_SIMT_HOOKS(1)
CVIG_SIMT_HOOKS(2)
CVIG_SIMT_HOOKS(4)
CVIG_SIMT_HOOKS(8)
CVIG_SIMT_HOOKS(16)
extern "C" void __asan_loadN_noabort(uintptr_t a, size_t n) { check_access(a, n, false, __builtin_return_address(0)); }
extern "C" void __asan_storeN_noabort(uintptr_t a, size_t n) { check_access(a, n, true, __builtin_return_address(0)); }
extern "C" void __asan_handle_no_return(void) {}

// ---------------------------------------------------------------------------------------------
// Test interface
// ---------------------------------------------------------------------------------------------
// schedule: "ascending", "descending" or "random:SEED"; sms / smem_optin: what the device reports
// (0: keep); check_races: 0/1; fill: byte that unwritten shared memory holds. 0 on success, 1 if bad.
extern "C" int cvig_simt_configure(const char* schedule, int sms, int smem_optin, int check_races, int fill) {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    Config c = g_cfg;
    if (schedule) {
        if (strcmp(schedule, "ascending") == 0) {
            c.order = Config::Ascending;
        } else if (strcmp(schedule, "descending") == 0) {
            c.order = Config::Descending;
        } else if (strncmp(schedule, "random:", 7) == 0) {
            char* end = nullptr;
            c.order = Config::Random;
            c.seed = strtoull(schedule + 7, &end, 10);
            if (end == schedule + 7 || *end) return 1;
        } else {
            return 1;
        }
    }
    if (sms < 0 || smem_optin < 0 || fill < 0 || fill > 255) return 1;
    if (sms) c.sms = sms;
    if (smem_optin) c.smem_optin = smem_optin;
    c.check_races = check_races != 0;
    c.fill = static_cast<unsigned char>(fill);
    g_cfg = c;
    return 0;
}

// Forgets every kernel's cudaFuncSetAttribute, as a new CUDA context would.
extern "C" void cvig_simt_reset_attributes(void) {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    g_func_smem.clear();
}

extern "C" const char* cvig_simt_report(void) { return g_report.c_str(); }

extern "C" void cvig_simt_clear(void) {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    g_report.clear();
    g_last_error = cudaSuccess;
}

// launches, blocks, threads, context switches, warp collectives resolved, block barriers resolved
extern "C" void cvig_simt_stats(long long* out) {
    out[0] = g_stats.launches;
    out[1] = g_stats.blocks;
    out[2] = g_stats.threads;
    out[3] = g_stats.switches;
    out[4] = g_stats.collectives;
    out[5] = g_stats.barriers;
}

extern "C" const char* cvig_simt_context_switch(void) {
#ifdef CVIG_SIMT_USE_UCONTEXT
    return "ucontext";
#else
    return "x86-64 assembly";
#endif
}
