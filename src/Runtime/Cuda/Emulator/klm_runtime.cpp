// klm_runtime.cpp — the emulated CUDA device: thread pool, block scheduling, barriers, warp operations,
// atomics, and the checker behind every memory access of a kernel (bounds, alignment, races).
//
// One shared library per process (compiled by EmulatorCompiler.cs, loaded by EmulatorRuntime.cs). Kernel
// modules call in through the klm_api table (klm_runtime_api.h); C# calls the extern "C" functions at the
// end of this file.
//
// Execution model:
//   - one launch at a time; its blocks run one after another (x fastest, then y, then z);
//   - each warp of a block is a real OS thread of a persistent pool; its 32 lanes are fibers on that
//     thread (own stacks), switching only at warp operations, barriers and exit. A block starts with
//     `parallelism` workers that take warps in order; a worker whose warp waits at a barrier sleeps on a
//     futex and another is recruited while warps remain, so a barrier is a real barrier across threads;
//   - a warp operation is a rendezvous of the warp's own fibers (no lock): the last lane of the mask to
//     arrive computes every result. Barriers count arrivals under the block's mutex. Misuse (a lane
//     missing from a mask or reading outside it, diverged call sites, an exited thread that others wait
//     for, a deadlock) is reported instead of hanging or computing garbage;
//   - every load and store of the kernel (GCC's -fsanitize=thread instrumentation, hooks in cuda_shim.h)
//     that touches device or shared memory is checked against a shadow: one 64-bit word per device byte
//     (0 = addressable, all ones = not, else the last writer in the current launch) and two per shared
//     byte (last writer, last reader(s)). A conflict between accesses of two threads with no barrier
//     (or, within a warp, no warp operation) between them is a race; a write from one block read or
//     written by another block of the same launch is a race (unless the launch uses __threadfence).
//     Races do not depend on the interleaving to be found, which is why lanes need not be OS threads.
#include "klm_runtime_api.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include <dlfcn.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define KLM_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// ------------------------------------------------------------------ futex helpers

void futex_wait(std::atomic<uint32_t>* word, uint32_t expected, const timespec* timeout = nullptr) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, timeout, nullptr, 0);
}

void futex_wake(std::atomic<uint32_t>* word, int count) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, count, nullptr, nullptr, 0);
}

// Thrown into a CUDA thread whose block has failed: unwinds the kernel's frames (compiled without
// exception tables, so nothing runs on the way) back to Block::run_thread.
struct Abort {};

constexpr uint32_t kWarpSize = 32;
constexpr uint32_t kMaxThreads = 1024;

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
    char buffer[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buffer, sizeof buffer, fmt, args);
    va_end(args);
    return buffer;
}

const char* warp_op_name(int op) {
    switch (op) {
        case KLM_SHFL_IDX: return "__shfl_sync";
        case KLM_SHFL_UP: return "__shfl_up_sync";
        case KLM_SHFL_DOWN: return "__shfl_down_sync";
        case KLM_SHFL_XOR: return "__shfl_xor_sync";
        case KLM_BALLOT: return "__ballot_sync";
        case KLM_ANY: return "__any_sync";
        case KLM_ALL: return "__all_sync";
        case KLM_SYNCWARP: return "__syncwarp";
        case KLM_MATCH_ANY: return "__match_any_sync";
        case KLM_MATCH_ALL: return "__match_all_sync";
        case KLM_REDUCE_ADD_U32: return "__reduce_add_sync";
        case KLM_REDUCE_MIN_U32: case KLM_REDUCE_MIN_I32: return "__reduce_min_sync";
        case KLM_REDUCE_MAX_U32: case KLM_REDUCE_MAX_I32: return "__reduce_max_sync";
        case KLM_REDUCE_AND_U32: return "__reduce_and_sync";
        case KLM_REDUCE_OR_U32: return "__reduce_or_sync";
        case KLM_REDUCE_XOR_U32: return "__reduce_xor_sync";
        default: return "warp operation";
    }
}

const char* barrier_name(int op) {
    switch (op) {
        case KLM_SYNCTHREADS_COUNT: return "__syncthreads_count";
        case KLM_SYNCTHREADS_AND: return "__syncthreads_and";
        case KLM_SYNCTHREADS_OR: return "__syncthreads_or";
        default: return "__syncthreads";
    }
}

bool same_site(int line_a, const char* file_a, int line_b, const char* file_b) {
    return line_a == line_b && (file_a == file_b || (file_a && file_b && strcmp(file_a, file_b) == 0));
}

std::string lane_list(uint32_t mask) {
    std::string text;
    for (uint32_t lane = 0; lane < kWarpSize; lane++) {
        if (!(mask >> lane & 1u)) {
            continue;
        }
        uint32_t end = lane;
        while (end + 1 < kWarpSize && (mask >> (end + 1) & 1u)) {
            end++;
        }
        if (!text.empty()) {
            text += ",";
        }
        text += end == lane ? format("%u", lane) : format("%u-%u", lane, end);
        lane = end;
    }
    return text;
}

// ------------------------------------------------------------------ device memory

struct Device {
    unsigned char* arena = nullptr;
    size_t arena_bytes = 0;
    uint64_t* shadow = nullptr;   // one word per arena byte
};

void* map_reserve(size_t bytes) {
    void* memory = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return memory == MAP_FAILED ? nullptr : memory;
}

// Global shadow word: [launch:10][block:18][thread:10][epoch:14][warp generation:11][atomic:1].
// 0 = addressable and not written in a tracked launch (launch ids are 1..1022, so fresh pages of the
// shadow need no initialisation), all ones = not addressable (guards, freed memory).
constexpr uint64_t kShadowClean = 0;
constexpr uint64_t kShadowPoisoned = ~uint64_t{0};

uint64_t global_word(uint32_t launch, uint32_t block, uint32_t thread, uint32_t epoch, uint32_t generation, bool atomic) {
    return (uint64_t)(launch & 0x3ffu) << 54 | (uint64_t)(block & 0x3ffffu) << 36 | (uint64_t)(thread & 0x3ffu) << 26 |
           (uint64_t)(epoch & 0x3fffu) << 12 | (uint64_t)(generation & 0x7ffu) << 1 | (atomic ? 1u : 0u);
}
uint32_t gw_launch(uint64_t w) { return (uint32_t)(w >> 54); }
uint32_t gw_block(uint64_t w) { return (uint32_t)(w >> 36) & 0x3ffffu; }
uint32_t gw_thread(uint64_t w) { return (uint32_t)(w >> 26) & 0x3ffu; }
uint32_t gw_epoch(uint64_t w) { return (uint32_t)(w >> 12) & 0x3fffu; }
uint32_t gw_generation(uint64_t w) { return (uint32_t)(w >> 1) & 0x7ffu; }
bool gw_atomic(uint64_t w) { return (w & 1u) != 0; }

// Shared shadow words (two per byte): [block serial:24][thread:10][epoch:16][warp generation:12][a:1][b:1]
// writer: a = atomic; reader: a = readers from more than one warp, b = more than one reader.
uint64_t shared_word(uint32_t serial, uint32_t thread, uint32_t epoch, uint32_t generation, bool a, bool b) {
    return (uint64_t)(serial & 0xffffffu) << 40 | (uint64_t)(thread & 0x3ffu) << 30 | (uint64_t)(epoch & 0xffffu) << 14 |
           (uint64_t)(generation & 0xfffu) << 2 | (a ? 2u : 0u) | (b ? 1u : 0u);
}
uint32_t sw_serial(uint64_t w) { return (uint32_t)(w >> 40); }
uint32_t sw_thread(uint64_t w) { return (uint32_t)(w >> 30) & 0x3ffu; }
uint32_t sw_epoch(uint64_t w) { return (uint32_t)(w >> 14) & 0xffffu; }
uint32_t sw_generation(uint64_t w) { return (uint32_t)(w >> 2) & 0xfffu; }
bool sw_a(uint64_t w) { return (w & 2u) != 0; }
bool sw_b(uint64_t w) { return (w & 1u) != 0; }

// ------------------------------------------------------------------ fibers (the lanes of a warp)

// A lane runs on its own stack; switching saves the callee-saved registers on the current stack and
// swaps stack pointers. x86-64 only (System V); other targets fall back to ucontext (a system call per
// switch, so several times slower).
#if defined(__x86_64__)
extern "C" void klm_fiber_switch(void** save, void* load);
asm(R"(
    .text
    .globl klm_fiber_switch
    .hidden klm_fiber_switch
    .type klm_fiber_switch,@function
klm_fiber_switch:
    .cfi_startproc
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
    .cfi_endproc
    .size klm_fiber_switch,.-klm_fiber_switch
)");

struct Context {
    void* sp = nullptr;
};

void switch_context(Context& save, Context& load) { klm_fiber_switch(&save.sp, load.sp); }

void make_context(Context& context, unsigned char* stack, size_t size, void (*entry)()) {
    // The frame klm_fiber_switch pops: MXCSR and x87 control word, r15..rbp, then `ret` into entry with
    // the stack aligned as after a call (a zero return address ends backtraces).
    auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15};
    auto* slot = reinterpret_cast<uint64_t*>(top);
    slot[-1] = 0;
    slot[-2] = reinterpret_cast<uint64_t>(entry);
    for (int i = 3; i <= 8; i++) {
        slot[-i] = 0;
    }
    // The floating-point control state a lane starts with: the worker's, read once per thread.
    static thread_local uint64_t control = [] {
        uint32_t mxcsr = 0;
        uint16_t x87 = 0;
        asm volatile("stmxcsr %0" : "=m"(mxcsr));
        asm volatile("fnstcw %0" : "=m"(x87));
        return mxcsr | (uint64_t)x87 << 32;
    }();
    slot[-9] = control;
    context.sp = reinterpret_cast<void*>(top - 72);
}
#else
#include <ucontext.h>
struct Context {
    ucontext_t uc;
};
void switch_context(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }
void make_context(Context& context, unsigned char* stack, size_t size, void (*entry)()) {
    getcontext(&context.uc);
    context.uc.uc_stack.ss_sp = stack;
    context.uc.uc_stack.ss_size = size;
    context.uc.uc_link = nullptr;
    makecontext(&context.uc, entry, 0);
}
#endif

constexpr size_t kFiberStack = 512 * 1024;
constexpr size_t kPage = 4096;

struct Stack {
    unsigned char* base = nullptr;   // usable bytes [base, base + kFiberStack); a PROT_NONE page below
};

// ------------------------------------------------------------------ threads, warps, blocks, launches

struct Block;
struct Warp;

// Unstarted -> Running <-> Blocked (barrier or warp operation) -> Runnable (released) -> Running -> Exited
enum class Status : uint8_t { Unstarted, Runnable, Running, Blocked, Exited };
enum class Waiting : uint8_t { None, Barrier, Warp };

// One CUDA thread: a lane of a warp, run as a fiber by the warp's OS thread.
struct ThreadState {
    Block* block = nullptr;
    Warp* home = nullptr;
    uint32_t linear = 0, lane = 0, warp = 0;
    uint32_t index[3] = {0, 0, 0};
    klm_thread_info info{};
    std::atomic<Status> status{Status::Unstarted};
    Waiting waiting = Waiting::None;
    int op = 0;
    uint32_t mask = 0;
    uint64_t value = 0;
    int argument = 0;
    int width = 32;
    int line = 0;
    const char* file = nullptr;
    uint64_t result = 0;
    Context context;
};

// One warp: an OS thread of the pool runs its lanes in turn, switching at warp operations and barriers.
struct Warp {
    uint32_t index = 0, base = 0, lanes = 0;
    Context scheduler;
    std::atomic<uint32_t> wake{0};
    bool sleeping = false;        // all live lanes wait at a barrier; guarded by the block's mutex
    uint32_t in_warp_ops = 0;     // lanes blocked in warp operations (only this warp's thread touches it)
};

struct Launch {
    klm_thunk thunk = nullptr;
    klm_enter enter = nullptr;
    void** params = nullptr;
    Device* device = nullptr;
    uint32_t grid[3] = {1, 1, 1};
    uint32_t dims[3] = {1, 1, 1};
    uint32_t thread_count = 0;
    uint32_t launch_id = 0;
    uint64_t device_used = 0;
    std::atomic<bool> cross_block_exempt{false};   // set by __threadfence(): inter-block communication
    std::mutex fault_mutex;
    klm_fault* fault = nullptr;
};

// The CUDA thread running on this OS thread (null in a warp's scheduler and on host threads).
thread_local ThreadState* t_thread __attribute__((tls_model("initial-exec"))) = nullptr;

struct Worker {
    pthread_t handle{};
    std::atomic<uint32_t> signal{0};
    Block* job = nullptr;
};

struct Block {
    std::mutex mutex;
    Launch* launch = nullptr;
    uint32_t index[3] = {0, 0, 0};
    uint32_t serial_in_launch = 0;   // linear block index (global shadow)
    uint32_t serial = 0;             // process-wide block counter (shared shadow)
    uint32_t thread_count = 0, warp_count = 0;
    int parallelism = 1;
    std::vector<ThreadState> threads = std::vector<ThreadState>(kMaxThreads);
    std::vector<Warp> warps = std::vector<Warp>(kMaxThreads / kWarpSize);
    std::atomic<uint32_t> next_warp{0};
    // guarded by mutex
    uint32_t running_workers = 0, attached_workers = 0, sleeping_warps = 0, finished_warps = 0;
    // Read by every lane, written rarely: on their own cache lines, away from what workers write often.
    // barrier_arrived is written under mutex by arrivals and read without it by exiting lanes, someone_exited
    // the reverse: each side writes its own, then reads the other's (sequentially consistent), so at least
    // one of them sees both and reports a thread that exited while others wait at a barrier.
    alignas(64) std::atomic<uint32_t> barrier_arrived{0};
    alignas(64) std::atomic<bool> someone_exited{false};
    std::atomic<bool> aborted{false};
    int barrier_op = 0, barrier_line = 0;
    const char* barrier_file = nullptr;
    uint32_t barrier_count = 0, barrier_and = 1, barrier_or = 0;
    alignas(64) std::atomic<uint32_t> done{0};
    alignas(64) std::atomic<uint32_t> epoch{0};   // barriers completed
    // warp operations completed, per warp; padded so that warps on different cores do not share a line
    struct alignas(64) Generation {
        std::atomic<uint32_t> value{0};
        void store(uint32_t v) { value.store(v); }
        uint32_t load(std::memory_order order = std::memory_order_seq_cst) const { return value.load(order); }
        void fetch_add(uint32_t v) { value.fetch_add(v, std::memory_order_relaxed); }
    };
    Generation warp_generation[kMaxThreads / kWarpSize];

    void reset(Launch* owner, uint32_t linear_block, uint32_t block_serial, int workers);
    void work(Worker* worker);
    void run_warp(Warp& warp);
    void enter(Warp& warp, ThreadState& t);
    void stall(Warp& warp);
    void run_lane(ThreadState& t);
    void suspend(ThreadState& t);
    void on_exit(ThreadState& t);
    int barrier(ThreadState& t, int op, int predicate, int line, const char* file);
    bool still_at_barrier(const ThreadState& u);
    uint64_t warp_op(ThreadState& t, int op, uint32_t mask, uint64_t value, int argument, int width, int line,
                     const char* file);
    uint32_t active_mask(ThreadState& t);

    // failure: record the first fault, stop every thread. Caller holds `mutex`. Returns whether this was
    // the launch's first fault (the one reported).
    bool fail_locked(int kind, const ThreadState* t, const std::string& message, int line = 0, const char* file = nullptr);
    [[noreturn]] void fail_and_abort(int kind, ThreadState& t, const std::string& message, int line, const char* file);
    void wake_sleeping_locked();
    void recruit_if_needed();
    std::string describe_threads();
    std::string describe_state(const ThreadState& t);
    std::string where(const ThreadState& t) const;
    std::string thread_name(uint32_t linear) const;   // "thread (x,y,z)" of a linear index in the block
};

class Pool {
public:
    void start(Block* block);
    void finished(Worker* worker) {
        std::lock_guard<std::mutex> guard(mutex_);
        idle_.push_back(worker);
    }
    int size() {
        std::lock_guard<std::mutex> guard(mutex_);
        return (int)all_.size();
    }

private:
    static void* main(void* argument);
    std::mutex mutex_;
    std::vector<Worker*> idle_;
    std::vector<Worker*> all_;
};

struct Runtime {
    std::mutex launch_mutex;
    bool broken = false;
    Pool pool;
    klm_ranges ranges{};
    Block block;
    std::vector<Stack> stacks;             // one per thread of a block, kept
    uint32_t block_serial = 0;
    std::vector<uint64_t> shared_shadow;   // 2 words per shared byte: static section, then dynamic buffer
    unsigned char* dynamic_shared = nullptr;
    size_t dynamic_capacity = 0;           // bytes usable; followed by a red zone
    uint32_t dynamic_bytes = 0;            // this launch's dynamic shared memory
};

Runtime& rt() {
    static Runtime* runtime = new Runtime();   // never destroyed: worker threads outlive static destructors
    return *runtime;
}

constexpr size_t kDynamicRedZone = 64 * 1024;
constexpr size_t kWorkerStack = 256 * 1024;

void ensure_stacks(Runtime& runtime, uint32_t count) {
    while (runtime.stacks.size() < count) {
        auto* memory = static_cast<unsigned char*>(
            mmap(nullptr, kFiberStack + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
        if (memory == MAP_FAILED) {
            throw std::runtime_error("cannot map a stack for a CUDA thread");
        }
        mprotect(memory, kPage, PROT_NONE);   // overflow faults instead of corrupting a neighbour
        runtime.stacks.push_back(Stack{memory + kPage});
    }
}

// ------------------------------------------------------------------ pool

void* Pool::main(void* argument) {
    auto* worker = static_cast<Worker*>(argument);
    uint32_t seen = 0;
    for (;;) {
        while (worker->signal.load() == seen) {
            futex_wait(&worker->signal, seen);
        }
        seen++;
        worker->job->work(worker);
    }
    return nullptr;
}

void Pool::start(Block* block) {
    Worker* worker;
    {
        std::lock_guard<std::mutex> guard(mutex_);
        if (!idle_.empty()) {
            worker = idle_.back();
            idle_.pop_back();
        } else {
            worker = new Worker();
            pthread_attr_t attributes;
            pthread_attr_init(&attributes);
            pthread_attr_setstacksize(&attributes, kWorkerStack);
            pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
            int error = pthread_create(&worker->handle, &attributes, &Pool::main, worker);
            pthread_attr_destroy(&attributes);
            if (error != 0) {
                delete worker;
                throw std::runtime_error(format("cannot create an emulator worker thread (pthread_create: %s; %zu exist)",
                                                strerror(error), all_.size()));
            }
            all_.push_back(worker);
        }
    }
    worker->job = block;
    worker->signal.fetch_add(1);
    futex_wake(&worker->signal, 1);
}

// ------------------------------------------------------------------ block

std::string Block::where(const ThreadState& t) const {
    return format("thread (%u,%u,%u) of block (%u,%u,%u)", t.index[0], t.index[1], t.index[2], index[0], index[1], index[2]);
}

std::string Block::thread_name(uint32_t linear) const {
    const uint32_t* dims = launch->dims;
    return format("thread (%u,%u,%u)", linear % dims[0], linear / dims[0] % dims[1], linear / dims[0] / dims[1]);
}

void Block::reset(Launch* owner, uint32_t linear_block, uint32_t block_serial, int workers) {
    std::lock_guard<std::mutex> guard(mutex);
    launch = owner;
    serial_in_launch = linear_block;
    serial = block_serial;
    index[0] = linear_block % owner->grid[0];
    index[1] = linear_block / owner->grid[0] % owner->grid[1];
    index[2] = linear_block / owner->grid[0] / owner->grid[1];
    thread_count = owner->thread_count;
    warp_count = (thread_count + kWarpSize - 1) / kWarpSize;
    parallelism = workers;
    next_warp.store(0);
    running_workers = attached_workers = sleeping_warps = finished_warps = 0;
    someone_exited.store(false);
    aborted.store(false);
    done.store(0);
    barrier_arrived.store(0);
    epoch.store(0);
    for (uint32_t w = 0; w < warp_count; w++) {
        Warp& warp = warps[w];
        warp.index = w;
        warp.base = w * kWarpSize;
        warp.lanes = std::min(kWarpSize, thread_count - warp.base);
        warp.sleeping = false;
        warp.in_warp_ops = 0;
        warp_generation[w].store(0);
    }
    for (uint32_t i = 0; i < thread_count; i++) {
        ThreadState& t = threads[i];
        t.block = this;
        t.home = &warps[i / kWarpSize];
        t.linear = i;
        t.lane = i % kWarpSize;
        t.warp = i / kWarpSize;
        t.index[0] = i % owner->dims[0];
        t.index[1] = i / owner->dims[0] % owner->dims[1];
        t.index[2] = i / owner->dims[0] / owner->dims[1];
        t.info = klm_thread_info{
            {t.index[0], t.index[1], t.index[2]},
            {index[0], index[1], index[2]},
            {owner->dims[0], owner->dims[1], owner->dims[2]},
            {owner->grid[0], owner->grid[1], owner->grid[2]},
        };
        t.status.store(Status::Unstarted);
        t.waiting = Waiting::None;
        t.result = 0;
    }
}

// Caller holds mutex. A worker that cannot be created fails the block (it never escapes a pool thread).
void Block::recruit_if_needed() {
    if (next_warp.load() < warp_count && running_workers < (uint32_t)parallelism && !aborted.load()) {
        running_workers++;
        attached_workers++;
        try {
            rt().pool.start(this);
        } catch (const std::exception& error) {
            running_workers--;
            attached_workers--;
            fail_locked(KLM_FAULT_INTERNAL, nullptr, format("emulator error: %s", error.what()));
        }
    }
}

void Block::work(Worker* worker) {
    for (;;) {
        uint32_t w = next_warp.fetch_add(1);
        if (w >= warp_count) {
            break;
        }
        run_warp(warps[w]);
        std::lock_guard<std::mutex> guard(mutex);
        finished_warps++;
    }
    rt().pool.finished(worker);   // idle before the dispatcher can see the block finished
    std::lock_guard<std::mutex> guard(mutex);
    attached_workers--;
    running_workers--;
    if (attached_workers == 0 && finished_warps == warp_count) {
        done.store(1);
        futex_wake(&done, 1);
    }
}

// The lane's fiber: runs the kernel, then hands the stack back to the warp's scheduler for good.
[[noreturn]] void lane_main() {
    ThreadState& t = *t_thread;
    t.block->run_lane(t);
    switch_context(t.context, t.home->scheduler);
    __builtin_unreachable();
}

void Block::run_lane(ThreadState& t) {
    const Launch& l = *launch;
    try {
        l.thunk(l.params, &t.info);
    } catch (const Abort&) {
    } catch (const std::exception& error) {
        std::lock_guard<std::mutex> guard(mutex);
        fail_locked(KLM_FAULT_INTERNAL, &t, format("emulator error: %s", error.what()));
    } catch (...) {
        std::lock_guard<std::mutex> guard(mutex);
        fail_locked(KLM_FAULT_INTERNAL, &t, "unexpected C++ exception in the kernel");
    }
    on_exit(t);
}

// Switches from the warp's scheduler into a lane (starting it if needed) until it blocks or exits.
void Block::enter(Warp& warp, ThreadState& t) {
    if (t.status.load() == Status::Unstarted) {
        make_context(t.context, rt().stacks[t.linear].base, kFiberStack, &lane_main);
    }
    t.status.store(Status::Running);
    launch->enter(&t.info);   // the module's thread-local threadIdx, blockIdx, ... for this lane
    t_thread = &t;
    switch_context(warp.scheduler, t.context);
    t_thread = nullptr;
}

// Called on the lane's stack: back to the scheduler until released (or the block fails).
void Block::suspend(ThreadState& t) {
    switch_context(t.context, t.home->scheduler);
    if (aborted.load()) {
        throw Abort{};
    }
}

void Block::run_warp(Warp& warp) {
    uint32_t cursor = 0;
    for (;;) {
        const bool stopping = aborted.load();
        ThreadState* next = nullptr;
        bool alive = false;
        for (uint32_t k = 0; k < warp.lanes && next == nullptr; k++) {
            ThreadState& t = threads[warp.base + (cursor + k) % warp.lanes];
            Status status = t.status.load();
            if (status == Status::Exited) {
                continue;
            }
            alive = true;
            if (stopping && status == Status::Unstarted) {
                t.status.store(Status::Exited);
                continue;
            }
            // A failed block resumes blocked lanes too: they throw Abort and unwind.
            if (status == Status::Unstarted || status == Status::Runnable || (stopping && status == Status::Blocked)) {
                next = &t;
            }
        }
        if (next != nullptr) {
            cursor = (next->lane + 1) % warp.lanes;
            enter(warp, *next);
            continue;
        }
        if (!alive) {
            return;
        }
        stall(warp);
    }
}

// No lane of the warp can run: either they wait at a barrier (sleep until another warp completes it), or
// a warp operation can never complete (report it).
void Block::stall(Warp& warp) {
    std::unique_lock<std::mutex> lock(mutex);
    if (aborted.load()) {
        return;
    }
    const ThreadState* waiter = nullptr;
    for (uint32_t k = 0; k < warp.lanes; k++) {
        const ThreadState& t = threads[warp.base + k];
        Status status = t.status.load();
        if (status == Status::Runnable) {
            return;   // released by a barrier while we looked
        }
        if (status == Status::Blocked && t.waiting == Waiting::Warp && waiter == nullptr) {
            waiter = &t;
        }
    }
    if (waiter != nullptr) {
        std::string missing;
        for (uint32_t k = 0; k < warp.lanes; k++) {
            const ThreadState& u = threads[warp.base + k];
            bool joined = u.status.load() == Status::Blocked && u.waiting == Waiting::Warp && u.mask == waiter->mask;
            if ((waiter->mask >> k & 1u) && !joined) {
                missing += format("%slane %u %s", missing.empty() ? "" : ", ", k, describe_state(u).c_str());
            }
        }
        fail_locked(KLM_FAULT_WARP_SYNC, waiter,
                    format("warp %u cannot proceed: lane %u waits at %s (%s:%d) with mask 0x%08x, but %s", warp.index,
                           waiter->lane, warp_op_name(waiter->op), waiter->file, waiter->line, waiter->mask, missing.c_str()),
                    waiter->line, waiter->file);
        return;
    }
    warp.sleeping = true;
    sleeping_warps++;
    running_workers--;
    recruit_if_needed();
    if (!aborted.load() && next_warp.load() >= warp_count && sleeping_warps + finished_warps == warp_count) {
        fail_locked(KLM_FAULT_DEADLOCK, nullptr, "deadlock: no thread of the block can proceed. " + describe_threads());
    }
    if (aborted.load()) {   // fail_locked woke every sleeping warp, this one included
        return;
    }
    uint32_t token = warp.wake.load();
    lock.unlock();
    while (warp.wake.load() == token) {
        futex_wait(&warp.wake, token);
    }
}

void Block::wake_sleeping_locked() {
    for (uint32_t w = 0; w < warp_count; w++) {
        Warp& warp = warps[w];
        if (warp.sleeping) {
            warp.sleeping = false;
            sleeping_warps--;
            running_workers++;
            warp.wake.fetch_add(1);
            futex_wake(&warp.wake, 1);
        }
    }
}

// Lock-free unless something is wrong: runs once per CUDA thread.
void Block::on_exit(ThreadState& t) {
    t.status.store(Status::Exited);
    if (!someone_exited.load(std::memory_order_relaxed)) {
        someone_exited.store(true);
    }
    if (aborted.load(std::memory_order_relaxed)) {
        return;
    }
    if (barrier_arrived.load() > 0) {
        std::lock_guard<std::mutex> guard(mutex);
        if (barrier_arrived.load() > 0 && !aborted.load()) {
            fail_locked(KLM_FAULT_BARRIER, &t,
                        format("%s exited while %u other threads wait at %s (%s:%d): every thread of a block must reach "
                               "every barrier (no early return before __syncthreads)",
                               where(t).c_str(), barrier_arrived.load(), barrier_name(barrier_op), barrier_file, barrier_line),
                        barrier_line, barrier_file);
        }
        return;
    }
    const Warp& warp = *t.home;   // its lanes all run on this OS thread
    for (uint32_t k = 0; k < warp.lanes && warp.in_warp_ops > 0; k++) {
        const ThreadState& u = threads[warp.base + k];
        if (u.status.load() == Status::Blocked && u.waiting == Waiting::Warp && (u.mask >> t.lane & 1u)) {
            std::lock_guard<std::mutex> guard(mutex);
            fail_locked(KLM_FAULT_WARP_SYNC, &t,
                        format("lane %u of warp %u (%s) exited while lane %u waits for it at %s (%s:%d) with mask 0x%08x: "
                               "every lane named in the mask must execute the same warp operation",
                               t.lane, t.warp, where(t).c_str(), u.lane, warp_op_name(u.op), u.file, u.line, u.mask),
                        u.line, u.file);
            return;
        }
    }
}

bool Block::fail_locked(int kind, const ThreadState* t, const std::string& message, int line, const char* file) {
    bool first = false;
    {
        std::lock_guard<std::mutex> guard(launch->fault_mutex);
        klm_fault& fault = *launch->fault;
        if (fault.kind == KLM_FAULT_NONE) {
            first = true;
            fault.kind = kind;
            if (t) {
                memcpy(fault.thread, t->index, sizeof fault.thread);
            }
            memcpy(fault.block, index, sizeof fault.block);
            std::string text = message;
            if (file && line > 0 && text.find(format("%s:%d", file, line)) == std::string::npos) {
                text += format(" [at %s:%d]", file, line);
            }
            snprintf(fault.message, sizeof fault.message, "%s", text.c_str());
        }
    }
    aborted.store(true);
    wake_sleeping_locked();
    return first;
}

void Block::fail_and_abort(int kind, ThreadState& t, const std::string& message, int line, const char* file) {
    {
        std::lock_guard<std::mutex> guard(mutex);
        fail_locked(kind, &t, message, line, file);
    }
    throw Abort{};
}

std::string Block::describe_state(const ThreadState& t) {
    switch (t.status.load()) {
        case Status::Exited: return "has exited";
        case Status::Unstarted: return "has not started";
        case Status::Running: return "is running";
        case Status::Runnable: return "is runnable";
        case Status::Blocked:
            if (t.waiting == Waiting::Barrier) {
                return format("waits at %s (%s:%d)", barrier_name(t.op), t.file, t.line);
            }
            return format("waits at %s (%s:%d) with mask 0x%08x", warp_op_name(t.op), t.file, t.line, t.mask);
    }
    return "?";
}

std::string Block::describe_threads() {
    // Runs of threads in the same state: "threads 0-223 wait at __syncthreads (k.cu:12); ...".
    std::string text;
    uint32_t start = 0;
    int groups = 0;
    while (start < thread_count && groups < 12) {
        std::string state = describe_state(threads[start]);
        uint32_t end = start;
        while (end + 1 < thread_count && describe_state(threads[end + 1]) == state) {
            end++;
        }
        if (!text.empty()) {
            text += "; ";
        }
        text += end == start ? format("thread %u %s", start, state.c_str()) : format("threads %u-%u %s", start, end, state.c_str());
        start = end + 1;
        groups++;
    }
    if (start < thread_count) {
        text += "; ...";
    }
    return "Threads (linear index in the block): " + text;
}

int Block::barrier(ThreadState& t, int op, int predicate, int line, const char* file) {
    std::unique_lock<std::mutex> lock(mutex);
    if (aborted.load()) {
        lock.unlock();
        throw Abort{};
    }
    auto fail = [&](int kind, const std::string& message) {
        fail_locked(kind, &t, message, line, file);
        lock.unlock();
        throw Abort{};
    };
    if (barrier_arrived.load() == 0) {
        barrier_op = op;
        barrier_line = line;
        barrier_file = file;
        barrier_count = 0;
        barrier_and = 1;
        barrier_or = 0;
    } else if (!same_site(line, file, barrier_line, barrier_file) || op != barrier_op) {
        fail(KLM_FAULT_BARRIER, format("threads of one block wait at different barriers: %s at %s (%s:%d), %u others at "
                                       "%s (%s:%d) (a barrier in divergent code)",
                                       where(t).c_str(), barrier_name(op), file, line, barrier_arrived.load(),
                                       barrier_name(barrier_op), barrier_file, barrier_line));
    }
    // A lane of this warp waiting for this thread in a warp operation can never be served now.
    const Warp& warp = *t.home;
    for (uint32_t k = 0; k < warp.lanes && warp.in_warp_ops > 0; k++) {
        const ThreadState& u = threads[warp.base + k];
        if (u.status.load() == Status::Blocked && u.waiting == Waiting::Warp && (u.mask >> t.lane & 1u)) {
            fail(KLM_FAULT_WARP_SYNC, format("diverged warp %u: lane %u reached %s (%s:%d) while lane %u waits for it at %s "
                                             "(%s:%d) with mask 0x%08x",
                                             t.warp, t.lane, barrier_name(op), file, line, u.lane, warp_op_name(u.op), u.file,
                                             u.line, u.mask));
        }
    }
    barrier_arrived.fetch_add(1);
    if (someone_exited.load()) {
        uint32_t gone = 0;
        while (gone + 1 < thread_count && threads[gone].status.load() != Status::Exited) {
            gone++;
        }
        fail(KLM_FAULT_BARRIER, format("%s (%s:%d) reached by %s after thread %u of the block exited: every thread of a "
                                       "block must reach every barrier (no early return before __syncthreads)",
                                       barrier_name(op), file, line, where(t).c_str(), gone));
    }
    barrier_count += predicate != 0;
    barrier_and &= predicate != 0;
    barrier_or |= predicate != 0;
    if (barrier_arrived.load() == thread_count) {
        uint32_t result = op == KLM_SYNCTHREADS_COUNT ? barrier_count
                          : op == KLM_SYNCTHREADS_AND ? barrier_and
                          : op == KLM_SYNCTHREADS_OR  ? barrier_or
                                                      : 0;
        epoch.fetch_add(1);
        barrier_arrived.store(0);
        for (uint32_t i = 0; i < thread_count; i++) {
            ThreadState& u = threads[i];
            if (&u != &t && u.status.load() == Status::Blocked && u.waiting == Waiting::Barrier) {
                u.result = result;
                u.waiting = Waiting::None;
                u.status.store(Status::Runnable);
            }
        }
        wake_sleeping_locked();
        return (int)result;
    }
    t.waiting = Waiting::Barrier;
    t.op = op;
    t.line = line;
    t.file = file;
    t.status.store(Status::Blocked);
    lock.unlock();
    suspend(t);
    return (int)t.result;
}

// Lanes of one warp all run on the warp's OS thread, so a warp operation needs no lock: the last lane of
// the mask to arrive computes every result and marks the others runnable.
uint64_t Block::warp_op(ThreadState& t, int op, uint32_t mask, uint64_t value, int argument, int width, int line,
                        const char* file) {
    if (aborted.load()) {
        throw Abort{};
    }
    const char* name = warp_op_name(op);
    Warp& warp = *t.home;
    const uint32_t base = warp.base, lanes = warp.lanes;
    const uint32_t existing = lanes == kWarpSize ? 0xffffffffu : (1u << lanes) - 1u;
    if (!(mask >> t.lane & 1u)) {
        fail_and_abort(KLM_FAULT_WARP_SYNC, t,
                       format("%s (%s:%d) called by lane %u of warp %u with mask 0x%08x, which does not include the lane itself",
                              name, file, line, t.lane, t.warp, mask),
                       line, file);
    }
    if (mask & ~existing) {
        fail_and_abort(KLM_FAULT_WARP_SYNC, t,
                       format("%s (%s:%d): mask 0x%08x names lanes %s of warp %u, which do not exist (the block has %u "
                              "threads; use a block size that is a multiple of 32 or a partial mask)",
                              name, file, line, mask, lane_list(mask & ~existing).c_str(), t.warp, thread_count),
                       line, file);
    }
    const bool shuffle = op >= KLM_SHFL_IDX && op <= KLM_SHFL_XOR;
    if (shuffle && (width < 1 || width > 32 || (width & (width - 1)) != 0)) {
        fail_and_abort(KLM_FAULT_WARP_SYNC, t, format("%s (%s:%d): width %d is not a power of two in [1, 32]", name, file, line, width),
                       line, file);
    }
    bool complete = true;
    for (uint32_t k = 0; k < lanes; k++) {
        if (!(mask >> k & 1u) || k == t.lane) {
            continue;
        }
        const ThreadState& u = threads[base + k];
        Status status = u.status.load();
        if (status == Status::Exited) {
            fail_and_abort(KLM_FAULT_WARP_SYNC, t,
                           format("%s (%s:%d) by lane %u of warp %u with mask 0x%08x: lane %u has already exited, so it can "
                                  "never join (a lane named in the mask skipped the call)",
                                  name, file, line, t.lane, t.warp, mask, k),
                           line, file);
        }
        bool waiting_here = status == Status::Blocked && u.waiting == Waiting::Warp;
        if (status == Status::Blocked && u.waiting == Waiting::Barrier && still_at_barrier(u)) {
            fail_and_abort(KLM_FAULT_WARP_SYNC, t,
                           format("diverged warp %u: lane %u is at %s (%s:%d) with mask 0x%08x while lane %u waits at %s (%s:%d)",
                                  t.warp, t.lane, name, file, line, mask, k, barrier_name(u.op), u.file, u.line),
                           line, file);
        }
        if (waiting_here && u.mask != mask && (u.mask >> t.lane & 1u)) {
            fail_and_abort(KLM_FAULT_WARP_SYNC, t,
                           format("diverged warp %u: lane %u calls %s (%s:%d) with mask 0x%08x while lane %u waits at %s "
                                  "(%s:%d) with mask 0x%08x; both name each other, so neither can proceed",
                                  t.warp, t.lane, name, file, line, mask, k, warp_op_name(u.op), u.file, u.line, u.mask),
                           line, file);
        }
        complete &= waiting_here && u.mask == mask;
    }
    t.op = op;
    t.mask = mask;
    t.value = value;
    t.argument = argument;
    t.width = width;
    t.line = line;
    t.file = file;
    if (!complete) {
        t.waiting = Waiting::Warp;
        t.status.store(Status::Blocked);
        warp.in_warp_ops++;
        suspend(t);
        return t.result;
    }
    // Every lane of the mask is here: check they are at the same operation, then compute all results.
    for (uint32_t k = 0; k < lanes; k++) {
        const ThreadState& u = threads[base + k];
        if ((mask >> k & 1u) && (u.op != op || (op != KLM_SYNCWARP && !same_site(u.line, u.file, line, file)))) {
            fail_and_abort(KLM_FAULT_WARP_SYNC, t,
                           format("diverged warp %u: lane %u is at %s (%s:%d) while lane %u is at %s (%s:%d), both with "
                                  "mask 0x%08x (warp operations in divergent code)",
                                  t.warp, t.lane, name, file, line, k, warp_op_name(u.op), u.file, u.line, mask),
                           line, file);
        }
    }
    uint32_t ballot = 0, sum = 0, and_bits = 0xffffffffu, or_bits = 0, xor_bits = 0, min_u = 0xffffffffu, max_u = 0;
    int32_t min_i = INT32_MAX, max_i = INT32_MIN;
    bool all_equal = true;
    const uint64_t first_value = threads[base + (uint32_t)__builtin_ctz(mask)].value;
    for (uint32_t k = 0; k < lanes; k++) {
        if (!(mask >> k & 1u)) {
            continue;
        }
        uint64_t v = threads[base + k].value;
        uint32_t v32 = (uint32_t)v;
        ballot |= (v != 0 ? 1u : 0u) << k;
        sum += v32;
        and_bits &= v32;
        or_bits |= v32;
        xor_bits ^= v32;
        min_u = std::min(min_u, v32);
        max_u = std::max(max_u, v32);
        min_i = std::min(min_i, (int32_t)v32);
        max_i = std::max(max_i, (int32_t)v32);
        all_equal &= v == first_value;
    }
    for (uint32_t k = 0; k < lanes; k++) {
        if (!(mask >> k & 1u)) {
            continue;
        }
        ThreadState& u = threads[base + k];
        if (shuffle) {
            uint32_t segment = k & ~(uint32_t)(u.width - 1);
            uint32_t source = k;
            switch (op) {
                case KLM_SHFL_IDX: source = segment + ((uint32_t)u.argument & (uint32_t)(u.width - 1)); break;
                case KLM_SHFL_UP:
                    if (u.argument >= 0 && (int)k - u.argument >= (int)segment) {
                        source = k - (uint32_t)u.argument;
                    }
                    break;
                case KLM_SHFL_DOWN:
                    if (u.argument >= 0 && k + (uint32_t)u.argument < segment + (uint32_t)u.width) {
                        source = k + (uint32_t)u.argument;
                    }
                    break;
                default: {   // KLM_SHFL_XOR
                    uint32_t partner = k ^ (uint32_t)u.argument;
                    if (partner < segment + (uint32_t)u.width) {
                        source = partner;
                    }
                    break;
                }
            }
            if (!(mask >> source & 1u)) {
                fail_and_abort(KLM_FAULT_WARP_SYNC, t,
                               format("%s (%s:%d) with mask 0x%08x: lane %u of warp %u reads lane %u, which is not in the "
                                      "mask (its value is undefined on the GPU)",
                                      name, file, line, mask, k, t.warp, source),
                               line, file);
            }
            u.result = threads[base + source].value;
            continue;
        }
        switch (op) {
            case KLM_BALLOT: u.result = ballot; break;
            case KLM_ANY: u.result = ballot != 0; break;
            case KLM_ALL: u.result = ballot == mask; break;
            case KLM_MATCH_ANY: {
                uint32_t same = 0;
                for (uint32_t other = 0; other < lanes; other++) {
                    if ((mask >> other & 1u) && threads[base + other].value == u.value) {
                        same |= 1u << other;
                    }
                }
                u.result = same;
                break;
            }
            case KLM_MATCH_ALL: u.result = all_equal ? mask : 0; break;
            case KLM_REDUCE_ADD_U32: u.result = sum; break;
            case KLM_REDUCE_MIN_U32: u.result = min_u; break;
            case KLM_REDUCE_MAX_U32: u.result = max_u; break;
            case KLM_REDUCE_MIN_I32: u.result = (uint32_t)min_i; break;
            case KLM_REDUCE_MAX_I32: u.result = (uint32_t)max_i; break;
            case KLM_REDUCE_AND_U32: u.result = and_bits; break;
            case KLM_REDUCE_OR_U32: u.result = or_bits; break;
            case KLM_REDUCE_XOR_U32: u.result = xor_bits; break;
            default: u.result = 0; break;
        }
    }
    warp_generation[t.warp].fetch_add(1);
    // Released under the block mutex, like a barrier's threads: barrier() checks under it that no lane of the warp
    // still waits here, and a lane released early must not see its neighbours half-way through the release.
    std::lock_guard<std::mutex> release(mutex);
    for (uint32_t k = 0; k < lanes; k++) {
        ThreadState& u = threads[base + k];
        if ((mask >> k & 1u) && &u != &t) {
            u.waiting = Waiting::None;
            u.status.store(Status::Runnable);
            warp.in_warp_ops--;
        }
    }
    return t.result;
}

// A barrier's release marks its threads runnable one by one under the block mutex, and a thread released early can
// run ahead to a warp operation while a lane of its warp is still marked as waiting at the barrier. Whether that
// lane really waits there (a diverged warp) is decided under the mutex, after any release in progress has finished.
bool Block::still_at_barrier(const ThreadState& u) {
    std::lock_guard<std::mutex> lock(mutex);
    return u.status.load() == Status::Blocked && u.waiting == Waiting::Barrier;
}

uint32_t Block::active_mask(ThreadState& t) {
    const Warp& warp = *t.home;
    uint32_t result = 0;
    for (uint32_t k = 0; k < warp.lanes; k++) {
        if (threads[warp.base + k].status.load() != Status::Exited) {
            result |= 1u << k;
        }
    }
    return result;
}

// ------------------------------------------------------------------ the access checker

ThreadState& current_thread() {
    ThreadState* t = t_thread;
    if (t == nullptr) {
        fprintf(stderr, "kernellm emulator: CUDA intrinsic called outside a kernel thread\n");
        abort();
    }
    return *t;
}

[[noreturn]] void access_fault(ThreadState& t, int kind, uint64_t address, uint64_t size, bool write, const void* code,
                               const std::string& message, int line = 0, const char* file = nullptr) {
    Block& b = *t.block;
    std::unique_lock<std::mutex> lock(b.mutex);
    if (b.fail_locked(kind, &t, message, line, file)) {
        std::lock_guard<std::mutex> guard(b.launch->fault_mutex);
        klm_fault& fault = *b.launch->fault;
        fault.address = address;
        fault.size = size;
        fault.is_write = write;
        Dl_info info;
        if (code != nullptr && dladdr(code, &info) != 0 && info.dli_fname != nullptr) {
            fault.module_path = info.dli_fname;
            fault.code_offset = (uint64_t)((const char*)code - (const char*)info.dli_fbase) - 1;
        }
    }
    lock.unlock();
    throw Abort{};
}

const char* access_name(bool write, bool atomic) { return atomic ? "atomic" : write ? "write" : "read"; }

bool ordered_in_block(const Block& b, const ThreadState& t, uint32_t thread, uint32_t epoch, uint32_t generation,
                      uint32_t epoch_mask, uint32_t generation_mask) {
    if (thread == t.linear) {
        return true;
    }
    if (epoch != (b.epoch.load(std::memory_order_relaxed) & epoch_mask)) {
        return true;   // a barrier between the two accesses
    }
    return thread / kWarpSize == t.warp &&
           generation != (b.warp_generation[t.warp].load(std::memory_order_relaxed) & generation_mask);
}

void check_global(ThreadState& t, uint64_t address, uint64_t size, bool write, bool atomic, const void* code, int line,
                  const char* file) {
    Block& b = *t.block;
    Launch& l = *b.launch;
    const klm_ranges& r = rt().ranges;
    uint64_t offset = address - r.device_low;
    if (offset + size > l.device_used) {   // never handed out: its shadow was never poisoned
        access_fault(t, KLM_FAULT_OUT_OF_BOUNDS, address, size, write, code,
                     format("%s of %llu bytes at 0x%llx runs past the end of the device arena", access_name(write, atomic),
                            (unsigned long long)size, (unsigned long long)address),
                     line, file);
    }
    const uint32_t epoch = b.epoch.load(std::memory_order_relaxed);
    const uint32_t generation = b.warp_generation[t.warp].load(std::memory_order_relaxed);
    const uint64_t mine = global_word(l.launch_id, b.serial_in_launch, t.linear, epoch, generation, atomic);
    uint64_t* shadow = l.device->shadow + offset;
    for (uint64_t i = 0; i < size; i++) {
        uint64_t word = __atomic_load_n(&shadow[i], __ATOMIC_RELAXED);
        if (word == kShadowPoisoned) {
            access_fault(t, KLM_FAULT_OUT_OF_BOUNDS, address + i, size - i, write, code,
                         format("out-of-bounds %s of %llu bytes at 0x%llx by %s", access_name(write, atomic),
                                (unsigned long long)size, (unsigned long long)address, b.where(t).c_str()),
                         line, file);
        }
        if (word != kShadowClean && gw_launch(word) == (l.launch_id & 0x3ffu) && !(atomic && gw_atomic(word))) {
            bool conflict;
            if (gw_block(word) != (b.serial_in_launch & 0x3ffffu)) {
                conflict = !l.cross_block_exempt.load(std::memory_order_relaxed);
            } else {
                conflict = !ordered_in_block(b, t, gw_thread(word), gw_epoch(word), gw_generation(word), 0x3fffu, 0x7ffu);
            }
            if (conflict) {
                uint32_t other = gw_block(word);
                uint32_t other_thread = gw_thread(word);
                const char* kind = write ? (atomic ? "atomic-after-write" : "write-after-write") : "read-after-write";
                std::string writer =
                    other == (b.serial_in_launch & 0x3ffffu)
                        ? format("%s of the same block, with no __syncthreads between,", b.thread_name(other_thread).c_str())
                        : format("%s of block (%u,%u,%u), another block of this launch,", b.thread_name(other_thread).c_str(),
                                 other % l.grid[0], other / l.grid[0] % l.grid[1], other / l.grid[0] / l.grid[1]);
                access_fault(t, KLM_FAULT_RACE, address + i, 1, write, code,
                             format("%s race on device memory at 0x%llx: %s %ss it, %s%s wrote it", kind,
                                    (unsigned long long)(address + i), b.where(t).c_str(), access_name(write, atomic),
                                    writer.c_str(), gw_atomic(word) ? " (atomically)" : ""),
                             line, file);
            }
        }
        if (write) {
            __atomic_store_n(&shadow[i], mine, __ATOMIC_RELAXED);
        }
    }
}

void check_shared(ThreadState& t, uint64_t address, uint64_t index, uint64_t size, bool write, bool atomic, const void* code,
                  int line, const char* file) {
    Block& b = *t.block;
    Runtime& runtime = rt();
    const uint32_t epoch = b.epoch.load(std::memory_order_relaxed);
    const uint32_t generation = b.warp_generation[t.warp].load(std::memory_order_relaxed);
    const uint32_t serial = b.serial & 0xffffffu;
    uint64_t* words = runtime.shared_shadow.data() + 2 * index;
    for (uint64_t i = 0; i < size; i++) {
        uint64_t* writer = &words[2 * i];
        uint64_t* reader = &words[2 * i + 1];
        uint64_t w = __atomic_load_n(writer, __ATOMIC_RELAXED);
        if (sw_serial(w) == serial && !(atomic && sw_a(w)) &&
            !ordered_in_block(b, t, sw_thread(w), sw_epoch(w), sw_generation(w), 0xffffu, 0xfffu)) {
            access_fault(t, KLM_FAULT_RACE, address + i, 1, write, code,
                         format("%s race on shared memory at 0x%llx: %s %ss it, %s of the block wrote it%s with no "
                                "__syncthreads (or __syncwarp) between",
                                write ? "write-after-write" : "read-after-write", (unsigned long long)(address + i),
                                b.where(t).c_str(), access_name(write, atomic), b.thread_name(sw_thread(w)).c_str(),
                                sw_a(w) ? " atomically" : ""),
                         line, file);
        }
        uint64_t r = __atomic_load_n(reader, __ATOMIC_RELAXED);
        bool current = sw_serial(r) == serial && sw_epoch(r) == (epoch & 0xffffu);
        if (write) {
            if (current) {
                uint32_t reader_thread = sw_thread(r);
                bool several = sw_b(r), several_warps = sw_a(r);
                bool conflict;
                if (!several) {
                    conflict = !ordered_in_block(b, t, reader_thread, sw_epoch(r), sw_generation(r), 0xffffu, 0xfffu);
                } else if (several_warps || reader_thread / kWarpSize != t.warp) {
                    conflict = true;
                } else {
                    conflict = sw_generation(r) == (generation & 0xfffu);
                }
                if (conflict) {
                    access_fault(t, KLM_FAULT_RACE, address + i, 1, write, code,
                                 format("write-after-read race on shared memory at 0x%llx: %s %ss it while %s read it with no "
                                        "__syncthreads (or __syncwarp) between",
                                        (unsigned long long)(address + i), b.where(t).c_str(), access_name(write, atomic),
                                        several ? "other threads of the block"
                                                : (b.thread_name(reader_thread) + " of the block").c_str()),
                                 line, file);
                }
            }
            __atomic_store_n(writer, shared_word(serial, t.linear, epoch, generation, atomic, false), __ATOMIC_RELAXED);
        } else {
            uint64_t updated;
            if (!current) {
                updated = shared_word(serial, t.linear, epoch, generation, false, false);
            } else if (sw_thread(r) != t.linear || sw_b(r)) {
                bool several_warps = sw_a(r) || sw_thread(r) / kWarpSize != t.warp;
                updated = shared_word(serial, t.linear, epoch, generation, several_warps, true);
            } else {
                updated = shared_word(serial, t.linear, epoch, generation, false, false);
            }
            __atomic_store_n(reader, updated, __ATOMIC_RELAXED);
        }
    }
}

void check_access(ThreadState& t, const void* pointer, uint64_t size, bool write, bool atomic, bool aligned,
                  const void* code, int line = 0, const char* file = nullptr) {
    Block& b = *t.block;
    if (b.aborted.load(std::memory_order_relaxed)) {
        throw Abort{};   // stops threads of a failed block at their next access
    }
    const uint64_t address = (uint64_t)(uintptr_t)pointer;
    const char* what = access_name(write, atomic);
    if (address < 65536) {
        access_fault(t, KLM_FAULT_NULL_ADDRESS, address, size, write, code,
                     format("%s of %llu bytes at address 0x%llx (a null pointer) by %s", what, (unsigned long long)size,
                            (unsigned long long)address, b.where(t).c_str()),
                     line, file);
    }
    if (aligned && size > 1 && (size & (size - 1)) == 0 && (address & (size - 1)) != 0) {
        access_fault(t, KLM_FAULT_MISALIGNED, address, size, write, code,
                     format("misaligned %s of %llu bytes at 0x%llx by %s (the GPU requires natural alignment)", what,
                            (unsigned long long)size, (unsigned long long)address, b.where(t).c_str()),
                     line, file);
    }
    const klm_ranges& r = rt().ranges;
    if (address - r.device_low < r.device_span) {
        check_global(t, address, size, write, atomic, code, line, file);
    } else if (address - r.static_shared_low < r.static_shared_span) {
        check_shared(t, address, address - r.static_shared_low, size, write, atomic, code, line, file);
    } else if (address - r.dynamic_shared_low < r.dynamic_shared_span) {
        uint64_t offset = address - r.dynamic_shared_low;
        uint32_t dynamic_bytes = rt().dynamic_bytes;
        if (offset + size > dynamic_bytes) {
            access_fault(t, KLM_FAULT_SHARED_OUT_OF_BOUNDS, address, size, write, code,
                         format("out-of-bounds %s of %llu bytes at dynamic shared memory offset %llu by %s: the launch has "
                                "%u bytes of dynamic shared memory",
                                what, (unsigned long long)size, (unsigned long long)offset, b.where(t).c_str(), dynamic_bytes),
                         line, file);
        }
        check_shared(t, address, r.static_shared_span + offset, size, write, atomic, code, line, file);
    }
}

// ------------------------------------------------------------------ the API table

void api_access(const void* address, unsigned long long size, int kind, const void* code) {
    ThreadState* t = t_thread;
    if (t == nullptr) {
        return;   // module initialisation on a host thread
    }
    bool write = (kind & 1) != 0;
    bool aligned = kind == KLM_READ || kind == KLM_WRITE;
    check_access(*t, address, size, write, false, aligned, code);
}

unsigned long long api_warp_op(int op, unsigned int mask, unsigned long long value, int argument, int width, int line,
                               const char* file) {
    ThreadState& t = current_thread();
    return t.block->warp_op(t, op, mask, value, argument, width, line, file);
}

int api_barrier(int op, int predicate, int line, const char* file) {
    ThreadState& t = current_thread();
    return t.block->barrier(t, op, predicate, line, file);
}

template <class T, class F> T atomic_update(T* address, F update) {
    T old = __atomic_load_n(address, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(address, &old, update(old), true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}

unsigned long long api_atomic(int op, void* address, unsigned long long operand, unsigned long long compare, int line,
                              const char* file) {
    ThreadState& t = current_thread();
    uint64_t size = op == KLM_ATOMIC_CAS_U16 ? 2
                    : (op == KLM_ATOMIC_ADD_F64 || op == KLM_ATOMIC_ADD_U64 || op == KLM_ATOMIC_EXCH_U64 ||
                       op == KLM_ATOMIC_MIN_I64 || op == KLM_ATOMIC_MIN_U64 || op == KLM_ATOMIC_MAX_I64 ||
                       op == KLM_ATOMIC_MAX_U64 || op == KLM_ATOMIC_CAS_U64 || op == KLM_ATOMIC_AND_U64 ||
                       op == KLM_ATOMIC_OR_U64 || op == KLM_ATOMIC_XOR_U64)
                        ? 8
                        : 4;
    check_access(t, address, size, true, true, true, nullptr, line, file);
    auto* u32 = static_cast<uint32_t*>(address);
    auto* u64 = static_cast<uint64_t*>(address);
    uint32_t v32 = (uint32_t)operand;
    switch (op) {
        case KLM_ATOMIC_ADD_F32:
            return atomic_update(u32, [&](uint32_t old) {
                float sum = __builtin_bit_cast(float, old) + __builtin_bit_cast(float, v32);
                return __builtin_bit_cast(uint32_t, sum);
            });
        case KLM_ATOMIC_ADD_F64:
            return atomic_update(u64, [&](uint64_t old) {
                double sum = __builtin_bit_cast(double, old) + __builtin_bit_cast(double, (uint64_t)operand);
                return __builtin_bit_cast(uint64_t, sum);
            });
        case KLM_ATOMIC_ADD_U32: return __atomic_fetch_add(u32, v32, __ATOMIC_RELAXED);
        case KLM_ATOMIC_ADD_U64: return __atomic_fetch_add(u64, operand, __ATOMIC_RELAXED);
        case KLM_ATOMIC_SUB_U32: return __atomic_fetch_sub(u32, v32, __ATOMIC_RELAXED);
        case KLM_ATOMIC_EXCH_U32: return __atomic_exchange_n(u32, v32, __ATOMIC_RELAXED);
        case KLM_ATOMIC_EXCH_U64: return __atomic_exchange_n(u64, operand, __ATOMIC_RELAXED);
        case KLM_ATOMIC_MIN_I32:
            return atomic_update(u32, [&](uint32_t old) { return (int32_t)v32 < (int32_t)old ? v32 : old; });
        case KLM_ATOMIC_MIN_U32: return atomic_update(u32, [&](uint32_t old) { return std::min(old, v32); });
        case KLM_ATOMIC_MIN_I64:
            return atomic_update(u64, [&](uint64_t old) { return (int64_t)operand < (int64_t)old ? operand : old; });
        case KLM_ATOMIC_MIN_U64: return atomic_update(u64, [&](uint64_t old) { return std::min<uint64_t>(old, operand); });
        case KLM_ATOMIC_MAX_I32:
            return atomic_update(u32, [&](uint32_t old) { return (int32_t)v32 > (int32_t)old ? v32 : old; });
        case KLM_ATOMIC_MAX_U32: return atomic_update(u32, [&](uint32_t old) { return std::max(old, v32); });
        case KLM_ATOMIC_MAX_I64:
            return atomic_update(u64, [&](uint64_t old) { return (int64_t)operand > (int64_t)old ? operand : old; });
        case KLM_ATOMIC_MAX_U64: return atomic_update(u64, [&](uint64_t old) { return std::max<uint64_t>(old, operand); });
        case KLM_ATOMIC_INC_U32: return atomic_update(u32, [&](uint32_t old) { return old >= v32 ? 0u : old + 1u; });
        case KLM_ATOMIC_DEC_U32:
            return atomic_update(u32, [&](uint32_t old) { return (old == 0 || old > v32) ? v32 : old - 1u; });
        case KLM_ATOMIC_CAS_U16: {
            auto* u16 = static_cast<uint16_t*>(address);
            uint16_t expected = (uint16_t)compare;
            __atomic_compare_exchange_n(u16, &expected, (uint16_t)operand, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
            return expected;
        }
        case KLM_ATOMIC_CAS_U32: {
            uint32_t expected = (uint32_t)compare;
            __atomic_compare_exchange_n(u32, &expected, v32, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
            return expected;
        }
        case KLM_ATOMIC_CAS_U64: {
            uint64_t expected = compare;
            __atomic_compare_exchange_n(u64, &expected, operand, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
            return expected;
        }
        case KLM_ATOMIC_AND_U32: return __atomic_fetch_and(u32, v32, __ATOMIC_RELAXED);
        case KLM_ATOMIC_OR_U32: return __atomic_fetch_or(u32, v32, __ATOMIC_RELAXED);
        case KLM_ATOMIC_XOR_U32: return __atomic_fetch_xor(u32, v32, __ATOMIC_RELAXED);
        case KLM_ATOMIC_AND_U64: return __atomic_fetch_and(u64, operand, __ATOMIC_RELAXED);
        case KLM_ATOMIC_OR_U64: return __atomic_fetch_or(u64, operand, __ATOMIC_RELAXED);
        case KLM_ATOMIC_XOR_U64: return __atomic_fetch_xor(u64, operand, __ATOMIC_RELAXED);
        default: t.block->fail_and_abort(KLM_FAULT_INTERNAL, t, format("unknown atomic operation %d", op), line, file);
    }
}

void api_fence(int grid_scope) {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (grid_scope) {
        current_thread().block->launch->cross_block_exempt.store(true);
    }
}

void* api_dynamic_shared() { return rt().dynamic_shared; }

unsigned int api_active_mask() {
    ThreadState& t = current_thread();
    return t.block->active_mask(t);
}

void api_trap(const char* message, int line, const char* file) {
    ThreadState& t = current_thread();
    bool assertion = strncmp(message, "assertion", 9) == 0;
    t.block->fail_and_abort(assertion ? KLM_FAULT_ASSERT : KLM_FAULT_TRAP, t,
                            format("%s (%s:%d) in %s", message, file, line, t.block->where(t).c_str()), line, file);
}

long long api_clock() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

const klm_api g_api = {
    KLM_API_VERSION, nullptr, api_access, api_warp_op, api_barrier, api_atomic, api_fence, api_dynamic_shared,
    api_active_mask, api_trap, api_clock,
};
klm_api g_api_with_ranges;

// ------------------------------------------------------------------ launch

void prepare_shared(Runtime& runtime, const klm_launch_desc& desc) {
    size_t needed = std::max<size_t>(desc.dynamic_shared_bytes, 48 * 1024);
    if (runtime.dynamic_capacity < needed) {
        free(runtime.dynamic_shared);
        size_t bytes = (needed + kDynamicRedZone + 4095) / 4096 * 4096;
        runtime.dynamic_shared = static_cast<unsigned char*>(aligned_alloc(4096, bytes));
        if (runtime.dynamic_shared == nullptr) {
            throw std::runtime_error("cannot allocate the dynamic shared memory buffer");
        }
        runtime.dynamic_capacity = needed;
    }
    runtime.dynamic_bytes = desc.dynamic_shared_bytes;
    runtime.ranges.static_shared_low = (uint64_t)(uintptr_t)desc.static_shared;
    runtime.ranges.static_shared_span = desc.static_shared ? desc.static_shared_bytes : 0;
    runtime.ranges.dynamic_shared_low = (uint64_t)(uintptr_t)runtime.dynamic_shared;
    runtime.ranges.dynamic_shared_span = runtime.dynamic_capacity + kDynamicRedZone;
    size_t words = 2 * (runtime.ranges.static_shared_span + runtime.ranges.dynamic_shared_span);
    if (runtime.shared_shadow.size() < words) {
        runtime.shared_shadow.assign(words, 0);
    }
}

void run_launch(Runtime& runtime, const klm_launch_desc& desc, klm_fault& caller_fault) {
    // Heap-allocated and leaked if its threads never stop (timeout), so that they never touch a dead frame.
    auto* owned = new Launch();
    Launch& launch = *owned;
    klm_fault& fault = *new klm_fault();
    launch.thunk = desc.thunk;
    launch.enter = desc.enter;
    launch.params = desc.params;
    launch.device = static_cast<Device*>(desc.device);
    launch.fault = &fault;
    launch.launch_id = desc.launch_id;
    launch.device_used = std::min<uint64_t>(desc.device_used_bytes, launch.device->arena_bytes);
    memcpy(launch.grid, desc.grid, sizeof launch.grid);
    memcpy(launch.dims, desc.block, sizeof launch.dims);
    launch.thread_count = desc.block[0] * desc.block[1] * desc.block[2];
    runtime.ranges.device_low = (uint64_t)(uintptr_t)launch.device->arena;
    runtime.ranges.device_span = launch.device->arena_bytes;
    prepare_shared(runtime, desc);
    ensure_stacks(runtime, launch.thread_count);

    const uint64_t blocks = (uint64_t)desc.grid[0] * desc.grid[1] * desc.grid[2];
    const int warps = (int)((launch.thread_count + kWarpSize - 1) / kWarpSize);
    const int workers = std::max(1, std::min<int>(desc.parallelism, warps));
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(desc.timeout_ms);
    Block& block = runtime.block;
    for (uint64_t linear = 0; linear < blocks && fault.kind == KLM_FAULT_NONE; linear++) {
        if (++runtime.block_serial > 0xffffffu) {
            std::fill(runtime.shared_shadow.begin(), runtime.shared_shadow.end(), 0);
            runtime.block_serial = 1;
        }
        // Shared memory is uninitialised on the GPU: 0xff bytes read as NaN (f32, bf16, f16) or -1.
        if (runtime.ranges.static_shared_span > 0) {
            memset(desc.static_shared, 0xff, runtime.ranges.static_shared_span);
        }
        memset(runtime.dynamic_shared, 0xff, desc.dynamic_shared_bytes);
        block.reset(&launch, (uint32_t)linear, runtime.block_serial, workers);
        {
            std::lock_guard<std::mutex> guard(block.mutex);
            for (int i = 0; i < workers; i++) {
                block.recruit_if_needed();
            }
            if (block.attached_workers == 0) {
                break;   // not even one worker: the fault says why
            }
        }
        bool timed_out = false;
        while (block.done.load() == 0) {
            auto now = std::chrono::steady_clock::now();
            if (now >= deadline) {
                if (timed_out) {
                    runtime.broken = true;
                    caller_fault = fault;
                    snprintf(caller_fault.message + strlen(caller_fault.message),
                             sizeof caller_fault.message - strlen(caller_fault.message),
                             " The kernel's threads did not stop after the timeout; the emulator is unusable in this process.");
                    return;
                }
                std::lock_guard<std::mutex> guard(block.mutex);
                block.fail_locked(KLM_FAULT_TIMEOUT, nullptr,
                                  format("launch did not finish within %d ms (an endless loop, or threads spinning on each "
                                         "other). %s",
                                         desc.timeout_ms, block.describe_threads().c_str()));
                timed_out = true;
                deadline = now + std::chrono::seconds(10);
                continue;
            }
            auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - now).count();
            timespec timeout{(time_t)(left / 1000000000), (long)(left % 1000000000)};
            futex_wait(&block.done, 0, &timeout);
        }
    }
    caller_fault = fault;
    delete &fault;
    delete owned;
}

}  // namespace

// ------------------------------------------------------------------ exports (C#: EmulatorRuntime.cs)

KLM_EXPORT const klm_api* klm_runtime_api(void) {
    g_api_with_ranges = g_api;
    g_api_with_ranges.ranges = &rt().ranges;
    return &g_api_with_ranges;
}

KLM_EXPORT int klm_runtime_workers(void) { return rt().pool.size(); }

KLM_EXPORT void* klm_device_create(unsigned long long arena_bytes, unsigned long long* arena_base) {
    auto* device = new Device();
    device->arena_bytes = (size_t)arena_bytes;
    device->arena = static_cast<unsigned char*>(map_reserve(device->arena_bytes));
    device->shadow = static_cast<uint64_t*>(map_reserve(device->arena_bytes * sizeof(uint64_t)));
    if (device->arena == nullptr || device->shadow == nullptr) {
        if (device->arena) munmap(device->arena, device->arena_bytes);
        if (device->shadow) munmap(device->shadow, device->arena_bytes * sizeof(uint64_t));
        delete device;
        return nullptr;
    }
    *arena_base = (unsigned long long)(uintptr_t)device->arena;
    return device;
}

KLM_EXPORT void klm_device_destroy(void* handle) {
    auto* device = static_cast<Device*>(handle);
    if (device == nullptr) {
        return;
    }
    munmap(device->arena, device->arena_bytes);
    munmap(device->shadow, device->arena_bytes * sizeof(uint64_t));
    delete device;
}

// Marks [offset, offset + bytes) of the arena addressable (and not yet written) or not addressable.
// Large regions made unaddressable give their data pages back to the system.
KLM_EXPORT void klm_device_mark(void* handle, unsigned long long offset, unsigned long long bytes, int addressable) {
    auto* device = static_cast<Device*>(handle);
    uint64_t* shadow = device->shadow + offset;
    if (!addressable && bytes >= (1u << 20)) {
        uint64_t begin = (offset + kPage - 1) / kPage * kPage, end = (offset + bytes) / kPage * kPage;
        if (end > begin) {
            madvise(device->arena + begin, end - begin, MADV_DONTNEED);
        }
    }
    std::fill(shadow, shadow + bytes, addressable ? kShadowClean : kShadowPoisoned);
}

KLM_EXPORT int klm_launch(const klm_launch_desc* desc, klm_fault* fault) {
    memset(fault, 0, sizeof *fault);
    Runtime& runtime = rt();
    try {
        std::lock_guard<std::mutex> guard(runtime.launch_mutex);
        if (runtime.broken) {
            fault->kind = KLM_FAULT_INTERNAL;
            snprintf(fault->message, sizeof fault->message,
                     "the emulator is unusable in this process: an earlier launch did not stop after its timeout");
            return fault->kind;
        }
        run_launch(runtime, *desc, *fault);
    } catch (const std::exception& error) {
        if (fault->kind == KLM_FAULT_NONE) {
            fault->kind = KLM_FAULT_INTERNAL;
            snprintf(fault->message, sizeof fault->message, "emulator error: %s", error.what());
        }
    }
    return fault->kind;
}
