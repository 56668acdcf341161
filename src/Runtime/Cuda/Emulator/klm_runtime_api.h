// klm_runtime_api.h — the contract between the emulator runtime (klm_runtime.cpp, one shared library per
// process) and every compiled kernel module (cuda_shim.h + one kernels/*.cu, one shared library each).
//
// A module never links against the runtime: at load the C# side hands it this table through
// klm_module_attach, and every CUDA intrinsic of the shim (barriers, warp operations, atomics, the
// memory-access hooks that GCC's -fsanitize=thread instrumentation emits) is a call through it.
// Plain C so that both sides and the C# declarations agree on the layout. Change KLM_API_VERSION with it.
#pragma once

#define KLM_API_VERSION 5

#ifdef __cplusplus
extern "C" {
#endif

// Built-in variables of one CUDA thread, handed to a kernel's thunk, which copies them into the module's
// thread-local threadIdx / blockIdx / blockDim / gridDim.
typedef struct klm_thread_info {
    unsigned int thread[3];
    unsigned int block[3];
    unsigned int block_dim[3];
    unsigned int grid_dim[3];
} klm_thread_info;

// Address ranges the access hooks must report to the runtime (everything else is host memory the kernel
// may legitimately touch: its stack, thread-locals, kernel parameters). Written by the runtime before a
// block starts; read by the hooks of every module.
typedef struct klm_ranges {
    unsigned long long device_low, device_span;          // the device arena (all allocations)
    unsigned long long static_shared_low, static_shared_span;   // the module's __shared__ section
    unsigned long long dynamic_shared_low, dynamic_shared_span; // the dynamic shared buffer plus a red zone
} klm_ranges;

enum klm_access_kind {
    KLM_READ = 0,
    KLM_WRITE = 1,
    KLM_READ_UNALIGNED = 2,   // GCC knows the type's alignment is below the access size: no alignment check
    KLM_WRITE_UNALIGNED = 3,
};

enum klm_warp_op {
    KLM_SHFL_IDX = 1, KLM_SHFL_UP, KLM_SHFL_DOWN, KLM_SHFL_XOR,
    KLM_BALLOT, KLM_ANY, KLM_ALL, KLM_SYNCWARP,
    KLM_MATCH_ANY, KLM_MATCH_ALL,
    KLM_REDUCE_ADD_U32, KLM_REDUCE_MIN_U32, KLM_REDUCE_MAX_U32,
    KLM_REDUCE_MIN_I32, KLM_REDUCE_MAX_I32,
    KLM_REDUCE_AND_U32, KLM_REDUCE_OR_U32, KLM_REDUCE_XOR_U32,
};

enum klm_barrier_op { KLM_SYNCTHREADS = 0, KLM_SYNCTHREADS_COUNT, KLM_SYNCTHREADS_AND, KLM_SYNCTHREADS_OR };

enum klm_atomic_op {
    KLM_ATOMIC_ADD_F32 = 1, KLM_ATOMIC_ADD_F64, KLM_ATOMIC_ADD_U32, KLM_ATOMIC_ADD_U64,
    KLM_ATOMIC_SUB_U32,
    KLM_ATOMIC_EXCH_U32, KLM_ATOMIC_EXCH_U64,
    KLM_ATOMIC_MIN_I32, KLM_ATOMIC_MIN_U32, KLM_ATOMIC_MIN_I64, KLM_ATOMIC_MIN_U64,
    KLM_ATOMIC_MAX_I32, KLM_ATOMIC_MAX_U32, KLM_ATOMIC_MAX_I64, KLM_ATOMIC_MAX_U64,
    KLM_ATOMIC_INC_U32, KLM_ATOMIC_DEC_U32,
    KLM_ATOMIC_CAS_U16, KLM_ATOMIC_CAS_U32, KLM_ATOMIC_CAS_U64,
    KLM_ATOMIC_AND_U32, KLM_ATOMIC_OR_U32, KLM_ATOMIC_XOR_U32,
    KLM_ATOMIC_AND_U64, KLM_ATOMIC_OR_U64, KLM_ATOMIC_XOR_U64,
};

typedef struct klm_api {
    int version;
    const klm_ranges* ranges;
    // A reported access: bounds, alignment and race checks. Throws (through the kernel's frames, which
    // are compiled without exception tables) when the launch must stop.
    void (*access)(const void* address, unsigned long long size, int kind, const void* code_address);
    unsigned long long (*warp_op)(int op, unsigned int mask, unsigned long long value, int argument, int width,
                                  int line, const char* file);
    int (*barrier)(int op, int predicate, int line, const char* file);
    unsigned long long (*atomic)(int op, void* address, unsigned long long operand, unsigned long long compare,
                                 int line, const char* file);
    void (*fence)(int grid_scope);
    void* (*dynamic_shared)(void);
    unsigned int (*active_mask)(void);
    void (*trap)(const char* message, int line, const char* file);
    long long (*clock)(void);
} klm_api;

// What a kernel module exports (the C# loader looks these up by name).
typedef void (*klm_thunk)(void** params, const klm_thread_info* info);
// Sets the module's thread-local built-in variables for the lane about to run on this OS thread.
typedef void (*klm_enter)(const klm_thread_info* info);

typedef struct klm_kernel {
    const char* name;
    klm_thunk thunk;
    int parameter_count;
    // sizeof of each parameter, in order (so that a graph capture can copy the values a launch points at).
    const unsigned int* parameter_sizes;
} klm_kernel;

// int klm_module_attach(const klm_api* api);                 -> KLM_API_VERSION of the module
// const klm_kernel* klm_module_kernels(int* count);
// void klm_module_static_shared(void** start, unsigned long long* size);
// void klm_module_enter(const klm_thread_info* info);            (a klm_enter)

// ------------------------------------------------------------------ runtime <-> C# (EmulatorRuntime.cs)

// What went wrong in a launch; kind 0 = nothing. Mirrored by EmulatorFaultKind in C#.
enum klm_fault_kind {
    KLM_FAULT_NONE = 0,
    KLM_FAULT_OUT_OF_BOUNDS,        // device address outside every live allocation (guard, freed, never allocated)
    KLM_FAULT_NULL_ADDRESS,
    KLM_FAULT_MISALIGNED,
    KLM_FAULT_SHARED_OUT_OF_BOUNDS, // past the launch's dynamic shared memory
    KLM_FAULT_RACE,                 // conflicting accesses with no barrier (or warp sync) between them
    KLM_FAULT_BARRIER,              // __syncthreads not reached by every thread, or at different call sites
    KLM_FAULT_WARP_SYNC,            // bad mask, diverged warp, lane read from outside the mask, exited lane
    KLM_FAULT_DEADLOCK,
    KLM_FAULT_TRAP,
    KLM_FAULT_ASSERT,
    KLM_FAULT_TIMEOUT,
    KLM_FAULT_INTERNAL,
};

typedef struct klm_fault {
    int kind;
    int is_write;
    unsigned int thread[3];
    unsigned int block[3];
    unsigned long long address;
    unsigned long long size;
    const char* module_path;          // the module holding the faulting code (dladdr), or null
    unsigned long long code_offset;   // offset of the faulting call in that module (for addr2line), or 0
    char message[4096];
} klm_fault;

typedef struct klm_launch_desc {
    void* device;                     // klm_device_create
    klm_thunk thunk;
    klm_enter enter;                  // the module's klm_module_enter
    unsigned int grid[3];
    unsigned int block[3];
    unsigned int dynamic_shared_bytes;
    unsigned int launch_id;           // 1..1022, cycles; the C# side resets the shadow when it wraps
    void** params;
    unsigned long long device_used_bytes;   // arena bytes ever handed out (beyond: out of bounds)
    void* static_shared;
    unsigned long long static_shared_bytes;
    int parallelism;                  // OS threads that start a block's CUDA threads
    int timeout_ms;
} klm_launch_desc;

// void* klm_device_create(unsigned long long arena_bytes, unsigned long long* arena_base);
// void klm_device_destroy(void* device);
// void klm_device_mark(void* device, unsigned long long offset, unsigned long long bytes, int addressable);
// int klm_launch(const klm_launch_desc* desc, klm_fault* fault);     -> fault->kind
// const klm_api* klm_runtime_api(void);
// int klm_runtime_workers(void);

#ifdef __cplusplus
}
#endif
