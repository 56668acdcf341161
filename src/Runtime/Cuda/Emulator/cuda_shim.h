// cuda_shim.h — what a kernels/*.cu file needs from CUDA, for g++ (the emulated device).
//
// The emulator compiles one translation unit per kernel file:
//     #include "cuda_shim.h"   // this file
//     #include "<file>.cu"     // unchanged kernel source (it includes common.cuh itself)
//     KLM_KERNEL_TABLE(...)    // generated: one thunk per extern "C" __global__ entry point
// with -DKERNELLM_EMULATOR -fsanitize=thread -fno-exceptions (see EmulatorCompiler.cs). Each warp runs on
// an OS thread of the runtime (klm_runtime.cpp), its lanes as fibers; everything that needs other threads
// (barriers, warp operations, atomics) or checking (every memory access, through the -fsanitize=thread
// hooks at the end of this file) is a call through the runtime's table `klm_rt`.
//
// No system header is included: the module must compile fast and must not depend on the C library's
// headers; the few C functions used are declared here.
#pragma once

#include "klm_runtime_api.h"

typedef __SIZE_TYPE__ size_t;

// ------------------------------------------------------------------ qualifiers

#define __global__
#define __device__
#define __host__
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline __attribute__((always_inline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
// One storage per module: the runtime runs the blocks of a launch one after another (and one launch at
// a time), and fills this section with 0xff bytes before each block (uninitialised reads give NaN).
// `extern __shared__` (dynamic shared memory) fails to compile on purpose: use KLM_DYNAMIC_SHARED.
#define __shared__ static __attribute__((section("klm_shared")))

extern "C" __attribute__((visibility("hidden"))) const klm_api* klm_rt;

// ------------------------------------------------------------------ built-in variables and vector types

#define KLM_VECTOR_TYPES(T, name, a2, a4)                                                         \
    struct name##1 { T x; };                                                                      \
    struct __attribute__((aligned(a2))) name##2 { T x, y; };                                      \
    struct name##3 { T x, y, z; };                                                                \
    struct __attribute__((aligned(a4))) name##4 { T x, y, z, w; };                                \
    inline name##1 make_##name##1(T x) { return name##1{x}; }                                     \
    inline name##2 make_##name##2(T x, T y) { return name##2{x, y}; }                             \
    inline name##3 make_##name##3(T x, T y, T z) { return name##3{x, y, z}; }                     \
    inline name##4 make_##name##4(T x, T y, T z, T w) { return name##4{x, y, z, w}; }
KLM_VECTOR_TYPES(float, float, 8, 16)
KLM_VECTOR_TYPES(int, int, 8, 16)
KLM_VECTOR_TYPES(unsigned int, uint, 8, 16)
KLM_VECTOR_TYPES(short, short, 4, 8)
KLM_VECTOR_TYPES(unsigned short, ushort, 4, 8)
KLM_VECTOR_TYPES(signed char, char, 2, 4)
KLM_VECTOR_TYPES(unsigned char, uchar, 2, 4)
KLM_VECTOR_TYPES(double, double, 16, 16)
KLM_VECTOR_TYPES(long long, longlong, 16, 16)
KLM_VECTOR_TYPES(unsigned long long, ulonglong, 16, 16)
#undef KLM_VECTOR_TYPES

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
static constexpr int warpSize = 32;

// ------------------------------------------------------------------ bit casts and value transport

namespace klm_detail {
template <class T> inline unsigned long long to_bits(T value) {
    static_assert(sizeof(T) <= 8, "warp operations move at most 8 bytes per lane");
    unsigned long long bits = 0;
    __builtin_memcpy(&bits, &value, sizeof(T));
    return bits;
}
template <class T> inline T from_bits(unsigned long long bits) {
    T value;
    __builtin_memcpy(&value, &bits, sizeof(T));
    return value;
}
}  // namespace klm_detail

__device__ __forceinline__ unsigned int __float_as_uint(float x) { return __builtin_bit_cast(unsigned int, x); }
__device__ __forceinline__ float __uint_as_float(unsigned int x) { return __builtin_bit_cast(float, x); }
__device__ __forceinline__ int __float_as_int(float x) { return __builtin_bit_cast(int, x); }
__device__ __forceinline__ float __int_as_float(int x) { return __builtin_bit_cast(float, x); }
__device__ __forceinline__ long long __double_as_longlong(double x) { return __builtin_bit_cast(long long, x); }
__device__ __forceinline__ double __longlong_as_double(long long x) { return __builtin_bit_cast(double, x); }

// ------------------------------------------------------------------ synchronisation

// Call sites (line, file) let the runtime tell a diverged warp or block (threads at different barriers)
// from a legitimate one; __builtin_LINE() as a default argument evaluates at the caller.
#define KLM_SITE int line = __builtin_LINE(), const char* file = __builtin_FILE()

__device__ inline void __syncthreads(KLM_SITE) { klm_rt->barrier(KLM_SYNCTHREADS, 1, line, file); }
__device__ inline int __syncthreads_count(int predicate, KLM_SITE) {
    return klm_rt->barrier(KLM_SYNCTHREADS_COUNT, predicate != 0, line, file);
}
__device__ inline int __syncthreads_and(int predicate, KLM_SITE) {
    return klm_rt->barrier(KLM_SYNCTHREADS_AND, predicate != 0, line, file);
}
__device__ inline int __syncthreads_or(int predicate, KLM_SITE) {
    return klm_rt->barrier(KLM_SYNCTHREADS_OR, predicate != 0, line, file);
}
__device__ inline void __syncwarp(unsigned int mask = 0xffffffffu, KLM_SITE) {
    klm_rt->warp_op(KLM_SYNCWARP, mask, 0, 0, 32, line, file);
}
__device__ inline void __threadfence_block() { klm_rt->fence(0); }
__device__ inline void __threadfence() { klm_rt->fence(1); }
__device__ inline void __threadfence_system() { klm_rt->fence(1); }
__device__ inline unsigned int __activemask() { return klm_rt->active_mask(); }

template <class T> __device__ inline T __shfl_sync(unsigned int mask, T var, int srcLane, int width = 32, KLM_SITE) {
    return klm_detail::from_bits<T>(klm_rt->warp_op(KLM_SHFL_IDX, mask, klm_detail::to_bits(var), srcLane, width, line, file));
}
template <class T> __device__ inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = 32, KLM_SITE) {
    return klm_detail::from_bits<T>(klm_rt->warp_op(KLM_SHFL_UP, mask, klm_detail::to_bits(var), (int)delta, width, line, file));
}
template <class T> __device__ inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = 32, KLM_SITE) {
    return klm_detail::from_bits<T>(klm_rt->warp_op(KLM_SHFL_DOWN, mask, klm_detail::to_bits(var), (int)delta, width, line, file));
}
template <class T> __device__ inline T __shfl_xor_sync(unsigned int mask, T var, int laneMask, int width = 32, KLM_SITE) {
    return klm_detail::from_bits<T>(klm_rt->warp_op(KLM_SHFL_XOR, mask, klm_detail::to_bits(var), laneMask, width, line, file));
}
__device__ inline unsigned int __ballot_sync(unsigned int mask, int predicate, KLM_SITE) {
    return (unsigned int)klm_rt->warp_op(KLM_BALLOT, mask, predicate != 0, 0, 32, line, file);
}
__device__ inline int __any_sync(unsigned int mask, int predicate, KLM_SITE) {
    return (int)klm_rt->warp_op(KLM_ANY, mask, predicate != 0, 0, 32, line, file);
}
__device__ inline int __all_sync(unsigned int mask, int predicate, KLM_SITE) {
    return (int)klm_rt->warp_op(KLM_ALL, mask, predicate != 0, 0, 32, line, file);
}
template <class T> __device__ inline unsigned int __match_any_sync(unsigned int mask, T value, KLM_SITE) {
    return (unsigned int)klm_rt->warp_op(KLM_MATCH_ANY, mask, klm_detail::to_bits(value), 0, 32, line, file);
}
template <class T> __device__ inline unsigned int __match_all_sync(unsigned int mask, T value, int* predicate, KLM_SITE) {
    unsigned int result = (unsigned int)klm_rt->warp_op(KLM_MATCH_ALL, mask, klm_detail::to_bits(value), 0, 32, line, file);
    *predicate = result != 0;
    return result;
}
__device__ inline unsigned int __reduce_add_sync(unsigned int mask, unsigned int value, KLM_SITE) {
    return (unsigned int)klm_rt->warp_op(KLM_REDUCE_ADD_U32, mask, value, 0, 32, line, file);
}
__device__ inline int __reduce_add_sync(unsigned int mask, int value, KLM_SITE) {
    return (int)klm_rt->warp_op(KLM_REDUCE_ADD_U32, mask, (unsigned int)value, 0, 32, line, file);
}
__device__ inline unsigned int __reduce_min_sync(unsigned int mask, unsigned int value, KLM_SITE) {
    return (unsigned int)klm_rt->warp_op(KLM_REDUCE_MIN_U32, mask, value, 0, 32, line, file);
}
__device__ inline int __reduce_min_sync(unsigned int mask, int value, KLM_SITE) {
    return (int)klm_rt->warp_op(KLM_REDUCE_MIN_I32, mask, (unsigned int)value, 0, 32, line, file);
}
__device__ inline unsigned int __reduce_max_sync(unsigned int mask, unsigned int value, KLM_SITE) {
    return (unsigned int)klm_rt->warp_op(KLM_REDUCE_MAX_U32, mask, value, 0, 32, line, file);
}
__device__ inline int __reduce_max_sync(unsigned int mask, int value, KLM_SITE) {
    return (int)klm_rt->warp_op(KLM_REDUCE_MAX_I32, mask, (unsigned int)value, 0, 32, line, file);
}
__device__ inline unsigned int __reduce_and_sync(unsigned int mask, unsigned int value, KLM_SITE) {
    return (unsigned int)klm_rt->warp_op(KLM_REDUCE_AND_U32, mask, value, 0, 32, line, file);
}
__device__ inline unsigned int __reduce_or_sync(unsigned int mask, unsigned int value, KLM_SITE) {
    return (unsigned int)klm_rt->warp_op(KLM_REDUCE_OR_U32, mask, value, 0, 32, line, file);
}
__device__ inline unsigned int __reduce_xor_sync(unsigned int mask, unsigned int value, KLM_SITE) {
    return (unsigned int)klm_rt->warp_op(KLM_REDUCE_XOR_U32, mask, value, 0, 32, line, file);
}

// ------------------------------------------------------------------ atomics (relaxed, device scope)

#define KLM_ATOMIC(name, T, op)                                                                   \
    __device__ inline T name(T* address, T value, KLM_SITE) {                                     \
        return klm_detail::from_bits<T>(                                                          \
            klm_rt->atomic(op, (void*)address, klm_detail::to_bits(value), 0, line, file));       \
    }                                                                                             \
    __device__ inline T name##_block(T* address, T value, KLM_SITE) { return name(address, value, line, file); } \
    __device__ inline T name##_system(T* address, T value, KLM_SITE) { return name(address, value, line, file); }
KLM_ATOMIC(atomicAdd, float, KLM_ATOMIC_ADD_F32)
KLM_ATOMIC(atomicAdd, double, KLM_ATOMIC_ADD_F64)
KLM_ATOMIC(atomicAdd, int, KLM_ATOMIC_ADD_U32)
KLM_ATOMIC(atomicAdd, unsigned int, KLM_ATOMIC_ADD_U32)
KLM_ATOMIC(atomicAdd, unsigned long long, KLM_ATOMIC_ADD_U64)
KLM_ATOMIC(atomicSub, int, KLM_ATOMIC_SUB_U32)
KLM_ATOMIC(atomicSub, unsigned int, KLM_ATOMIC_SUB_U32)
KLM_ATOMIC(atomicExch, int, KLM_ATOMIC_EXCH_U32)
KLM_ATOMIC(atomicExch, unsigned int, KLM_ATOMIC_EXCH_U32)
KLM_ATOMIC(atomicExch, float, KLM_ATOMIC_EXCH_U32)
KLM_ATOMIC(atomicExch, unsigned long long, KLM_ATOMIC_EXCH_U64)
KLM_ATOMIC(atomicMin, int, KLM_ATOMIC_MIN_I32)
KLM_ATOMIC(atomicMin, unsigned int, KLM_ATOMIC_MIN_U32)
KLM_ATOMIC(atomicMin, long long, KLM_ATOMIC_MIN_I64)
KLM_ATOMIC(atomicMin, unsigned long long, KLM_ATOMIC_MIN_U64)
KLM_ATOMIC(atomicMax, int, KLM_ATOMIC_MAX_I32)
KLM_ATOMIC(atomicMax, unsigned int, KLM_ATOMIC_MAX_U32)
KLM_ATOMIC(atomicMax, long long, KLM_ATOMIC_MAX_I64)
KLM_ATOMIC(atomicMax, unsigned long long, KLM_ATOMIC_MAX_U64)
KLM_ATOMIC(atomicInc, unsigned int, KLM_ATOMIC_INC_U32)
KLM_ATOMIC(atomicDec, unsigned int, KLM_ATOMIC_DEC_U32)
KLM_ATOMIC(atomicAnd, int, KLM_ATOMIC_AND_U32)
KLM_ATOMIC(atomicAnd, unsigned int, KLM_ATOMIC_AND_U32)
KLM_ATOMIC(atomicAnd, unsigned long long, KLM_ATOMIC_AND_U64)
KLM_ATOMIC(atomicOr, int, KLM_ATOMIC_OR_U32)
KLM_ATOMIC(atomicOr, unsigned int, KLM_ATOMIC_OR_U32)
KLM_ATOMIC(atomicOr, unsigned long long, KLM_ATOMIC_OR_U64)
KLM_ATOMIC(atomicXor, int, KLM_ATOMIC_XOR_U32)
KLM_ATOMIC(atomicXor, unsigned int, KLM_ATOMIC_XOR_U32)
KLM_ATOMIC(atomicXor, unsigned long long, KLM_ATOMIC_XOR_U64)
#undef KLM_ATOMIC

#define KLM_ATOMIC_CAS(T, op)                                                                     \
    __device__ inline T atomicCAS(T* address, T compare, T value, KLM_SITE) {                     \
        return klm_detail::from_bits<T>(klm_rt->atomic(op, (void*)address, klm_detail::to_bits(value), \
                                                        klm_detail::to_bits(compare), line, file)); \
    }
KLM_ATOMIC_CAS(unsigned short, KLM_ATOMIC_CAS_U16)
KLM_ATOMIC_CAS(int, KLM_ATOMIC_CAS_U32)
KLM_ATOMIC_CAS(unsigned int, KLM_ATOMIC_CAS_U32)
KLM_ATOMIC_CAS(unsigned long long, KLM_ATOMIC_CAS_U64)
#undef KLM_ATOMIC_CAS

// ------------------------------------------------------------------ math (the C library's, declared here)

extern "C" {
#define KLM_F1(name) float name##f(float) noexcept; double name(double) noexcept;
#define KLM_F2(name) float name##f(float, float) noexcept; double name(double, double) noexcept;
KLM_F1(exp) KLM_F1(exp2) KLM_F1(exp10) KLM_F1(expm1) KLM_F1(log) KLM_F1(log2) KLM_F1(log10) KLM_F1(log1p)
KLM_F1(sqrt) KLM_F1(cbrt) KLM_F1(sin) KLM_F1(cos) KLM_F1(tan) KLM_F1(asin) KLM_F1(acos) KLM_F1(atan)
KLM_F1(sinh) KLM_F1(cosh) KLM_F1(tanh) KLM_F1(asinh) KLM_F1(acosh) KLM_F1(atanh) KLM_F1(erf) KLM_F1(erfc)
KLM_F1(lgamma) KLM_F1(tgamma) KLM_F1(fabs) KLM_F1(floor) KLM_F1(ceil) KLM_F1(trunc) KLM_F1(round)
KLM_F1(rint) KLM_F1(nearbyint)
KLM_F2(pow) KLM_F2(atan2) KLM_F2(fmod) KLM_F2(remainder) KLM_F2(copysign) KLM_F2(fmax) KLM_F2(fmin)
KLM_F2(hypot) KLM_F2(fdim)
#undef KLM_F1
#undef KLM_F2
float fmaf(float, float, float) noexcept;
double fma(double, double, double) noexcept;
float ldexpf(float, int) noexcept;
double ldexp(double, int) noexcept;
float frexpf(float, int*) noexcept;
float modff(float, float*) noexcept;
void sincosf(float, float*, float*) noexcept;
void sincos(double, double*, double*) noexcept;
int printf(const char*, ...);
void* memcpy(void*, const void*, size_t) noexcept;
void* memmove(void*, const void*, size_t) noexcept;
void* memset(void*, int, size_t) noexcept;
}

// Float overloads of the generic names, as CUDA's math headers provide them.
#define KLM_OVERLOAD1(name) __device__ inline float name(float x) { return name##f(x); }
#define KLM_OVERLOAD2(name) __device__ inline float name(float x, float y) { return name##f(x, y); }
KLM_OVERLOAD1(exp) KLM_OVERLOAD1(exp2) KLM_OVERLOAD1(expm1) KLM_OVERLOAD1(log) KLM_OVERLOAD1(log2)
KLM_OVERLOAD1(log10) KLM_OVERLOAD1(log1p) KLM_OVERLOAD1(sqrt) KLM_OVERLOAD1(cbrt) KLM_OVERLOAD1(sin)
KLM_OVERLOAD1(cos) KLM_OVERLOAD1(tan) KLM_OVERLOAD1(tanh) KLM_OVERLOAD1(erf) KLM_OVERLOAD1(fabs)
KLM_OVERLOAD1(floor) KLM_OVERLOAD1(ceil) KLM_OVERLOAD1(trunc) KLM_OVERLOAD1(round) KLM_OVERLOAD1(rint)
KLM_OVERLOAD2(pow) KLM_OVERLOAD2(fmax) KLM_OVERLOAD2(fmin) KLM_OVERLOAD2(fmod) KLM_OVERLOAD2(atan2)
KLM_OVERLOAD2(copysign)
#undef KLM_OVERLOAD1
#undef KLM_OVERLOAD2
__device__ inline float fma(float x, float y, float z) { return fmaf(x, y, z); }

__device__ inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
__device__ inline double rsqrt(double x) { return 1.0 / sqrt(x); }
__device__ inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
__device__ inline float exp10(float x) { return exp10f(x); }
// Fast-math intrinsics: exact (libm) here, approximate on the GPU; tolerances must allow for that.
__device__ inline float __expf(float x) { return expf(x); }
__device__ inline float __exp10f(float x) { return exp10f(x); }
__device__ inline float __logf(float x) { return logf(x); }
__device__ inline float __log2f(float x) { return log2f(x); }
__device__ inline float __log10f(float x) { return log10f(x); }
__device__ inline float __sinf(float x) { return sinf(x); }
__device__ inline float __cosf(float x) { return cosf(x); }
__device__ inline float __tanf(float x) { return tanf(x); }
__device__ inline float __powf(float x, float y) { return powf(x, y); }
__device__ inline void __sincosf(float x, float* s, float* c) { sincosf(x, s, c); }
__device__ inline float __fdividef(float x, float y) { return x / y; }
__device__ inline float __frcp_rn(float x) { return 1.0f / x; }
__device__ inline float __fsqrt_rn(float x) { return sqrtf(x); }
__device__ inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
__device__ inline float __fadd_rn(float x, float y) { return x + y; }
__device__ inline float __fsub_rn(float x, float y) { return x - y; }
__device__ inline float __fmul_rn(float x, float y) { return x * y; }
__device__ inline float __fdiv_rn(float x, float y) { return x / y; }
__device__ inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
__device__ inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }
__device__ inline int __float2int_rn(float x) { return (int)rintf(x); }
__device__ inline int __float2int_rz(float x) { return (int)x; }
__device__ inline int __float2int_rd(float x) { return (int)floorf(x); }
__device__ inline int __float2int_ru(float x) { return (int)ceilf(x); }
__device__ inline unsigned int __float2uint_rn(float x) { return (unsigned int)rintf(x); }
__device__ inline unsigned int __float2uint_rz(float x) { return (unsigned int)x; }
__device__ inline long long __float2ll_rn(float x) { return (long long)rintf(x); }
__device__ inline float __int2float_rn(int x) { return (float)x; }
__device__ inline float __uint2float_rn(unsigned int x) { return (float)x; }
__device__ inline float __ll2float_rn(long long x) { return (float)x; }
__device__ inline float __double2float_rn(double x) { return (float)x; }

__device__ inline bool isnan(float x) { return __builtin_isnan(x); }
__device__ inline bool isnan(double x) { return __builtin_isnan(x); }
__device__ inline bool isinf(float x) { return __builtin_isinf(x); }
__device__ inline bool isinf(double x) { return __builtin_isinf(x); }
__device__ inline bool isfinite(float x) { return __builtin_isfinite(x); }
__device__ inline bool isfinite(double x) { return __builtin_isfinite(x); }
__device__ inline bool signbit(float x) { return __builtin_signbit(x); }
__device__ inline bool signbit(double x) { return __builtin_signbit(x); }

#define KLM_MINMAX(T)                                                                             \
    __device__ inline T min(T a, T b) { return b < a ? b : a; }                                   \
    __device__ inline T max(T a, T b) { return a < b ? b : a; }
KLM_MINMAX(int) KLM_MINMAX(unsigned int) KLM_MINMAX(long long) KLM_MINMAX(unsigned long long)
#undef KLM_MINMAX
__device__ inline float min(float a, float b) { return fminf(a, b); }
__device__ inline float max(float a, float b) { return fmaxf(a, b); }
__device__ inline double min(double a, double b) { return fmin(a, b); }
__device__ inline double max(double a, double b) { return fmax(a, b); }
__device__ inline unsigned int min(int a, unsigned int b) { return min((unsigned int)a, b); }
__device__ inline unsigned int min(unsigned int a, int b) { return min(a, (unsigned int)b); }
__device__ inline unsigned int max(int a, unsigned int b) { return max((unsigned int)a, b); }
__device__ inline unsigned int max(unsigned int a, int b) { return max(a, (unsigned int)b); }
__device__ inline unsigned int umin(unsigned int a, unsigned int b) { return min(a, b); }
__device__ inline unsigned int umax(unsigned int a, unsigned int b) { return max(a, b); }
__device__ inline int abs(int x) { return x < 0 ? -x : x; }
__device__ inline long long llabs(long long x) { return x < 0 ? -x : x; }

// ------------------------------------------------------------------ integer intrinsics

__device__ inline int __popc(unsigned int x) { return __builtin_popcount(x); }
__device__ inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
__device__ inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
__device__ inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
__device__ inline int __ffs(int x) { return __builtin_ffs(x); }
__device__ inline int __ffsll(long long x) { return __builtin_ffsll(x); }
__device__ inline unsigned int __brev(unsigned int x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
__device__ inline unsigned int __umulhi(unsigned int x, unsigned int y) { return (unsigned int)(((unsigned long long)x * y) >> 32); }
__device__ inline int __mulhi(int x, int y) { return (int)(((long long)x * y) >> 32); }
__device__ inline unsigned long long __umul64hi(unsigned long long x, unsigned long long y) {
    return (unsigned long long)(((unsigned __int128)x * y) >> 64);
}
__device__ inline int __mul24(int x, int y) { return ((x << 8) >> 8) * ((y << 8) >> 8); }
__device__ inline unsigned int __umul24(unsigned int x, unsigned int y) { return (x & 0xffffffu) * (y & 0xffffffu); }
__device__ inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    unsigned long long bytes = ((unsigned long long)y << 32) | x;
    unsigned int result = 0;
    for (int i = 0; i < 4; i++) {
        result |= (unsigned int)((bytes >> (((s >> (4 * i)) & 7u) * 8)) & 0xffu) << (8 * i);
    }
    return result;
}
__device__ inline unsigned int __funnelshift_l(unsigned int lo, unsigned int hi, unsigned int shift) {
    return (unsigned int)((((unsigned long long)hi << 32) | lo) << (shift & 31) >> 32);
}
__device__ inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, unsigned int shift) {
    return (unsigned int)((((unsigned long long)hi << 32) | lo) >> (shift & 31));
}

// ------------------------------------------------------------------ loads with cache hints, misc

template <class T> __device__ inline T __ldg(const T* p) { return *p; }
template <class T> __device__ inline T __ldcg(const T* p) { return *p; }
template <class T> __device__ inline T __ldca(const T* p) { return *p; }
template <class T> __device__ inline T __ldcs(const T* p) { return *p; }
template <class T> __device__ inline T __ldlu(const T* p) { return *p; }
template <class T> __device__ inline T __ldcv(const T* p) { return *p; }
template <class T> __device__ inline void __stcg(T* p, T v) { *p = v; }
template <class T> __device__ inline void __stcs(T* p, T v) { *p = v; }
template <class T> __device__ inline void __stwb(T* p, T v) { *p = v; }
template <class T> __device__ inline void __stwt(T* p, T v) { *p = v; }

__device__ inline long long clock64() { return klm_rt->clock(); }
__device__ inline long clock() { return (long)klm_rt->clock(); }
__device__ inline void __nanosleep(unsigned int) {}
__device__ inline void __trap(KLM_SITE) { klm_rt->trap("__trap() called", line, file); }
__device__ inline void __brkpt(KLM_SITE) { klm_rt->trap("__brkpt() called", line, file); }
#ifndef assert
#define assert(condition) \
    ((condition) ? (void)0 : klm_rt->trap("assertion failed: " #condition, __LINE__, __FILE__))
#endif

// The base of the launch's dynamic shared memory (common.cuh's KLM_DYNAMIC_SHARED under KERNELLM_EMULATOR).
__device__ inline void* klm_dynamic_shared_memory() { return klm_rt->dynamic_shared(); }

// ------------------------------------------------------------------ module glue (not instrumented)

#define KLM_HOOK __attribute__((no_sanitize_thread, visibility("hidden")))

extern "C" { const klm_api* klm_rt = nullptr; }
thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

// Everything outside the device arena and the shared regions (the thread's stack, thread-locals, kernel
// parameters) is host memory the kernel may use freely: filtered here, cheaply, before the runtime call.
static inline __attribute__((always_inline, no_sanitize_thread)) void klm_hook(const void* address,
    unsigned long long size, int kind, const void* code) {
    const klm_api* api = klm_rt;
    if (api == nullptr) {
        return;
    }
    const klm_ranges* r = api->ranges;
    unsigned long long a = (unsigned long long)address;
    if (a - r->device_low < r->device_span || a - r->static_shared_low < r->static_shared_span ||
        a - r->dynamic_shared_low < r->dynamic_shared_span || a < 65536) {
        api->access(address, size, kind, code);
    }
}

extern "C" {
KLM_HOOK void __tsan_init() {}
KLM_HOOK void __tsan_func_entry(void*) {}
KLM_HOOK void __tsan_func_exit() {}
KLM_HOOK void __tsan_vptr_read(void**) {}
KLM_HOOK void __tsan_vptr_update(void**, void*) {}
#define KLM_SIZED_HOOKS(n)                                                                                         \
    KLM_HOOK void __tsan_read##n(void* p) { klm_hook(p, n, KLM_READ, __builtin_return_address(0)); }                 \
    KLM_HOOK void __tsan_write##n(void* p) { klm_hook(p, n, KLM_WRITE, __builtin_return_address(0)); }               \
    KLM_HOOK void __tsan_unaligned_read##n(void* p) { klm_hook(p, n, KLM_READ_UNALIGNED, __builtin_return_address(0)); } \
    KLM_HOOK void __tsan_unaligned_write##n(void* p) { klm_hook(p, n, KLM_WRITE_UNALIGNED, __builtin_return_address(0)); } \
    KLM_HOOK void __tsan_volatile_read##n(void* p) { klm_hook(p, n, KLM_READ, __builtin_return_address(0)); }        \
    KLM_HOOK void __tsan_volatile_write##n(void* p) { klm_hook(p, n, KLM_WRITE, __builtin_return_address(0)); }
KLM_SIZED_HOOKS(1) KLM_SIZED_HOOKS(2) KLM_SIZED_HOOKS(4) KLM_SIZED_HOOKS(8) KLM_SIZED_HOOKS(16)
#undef KLM_SIZED_HOOKS
KLM_HOOK void __tsan_read_range(void* p, unsigned long size) {
    klm_hook(p, size, KLM_READ_UNALIGNED, __builtin_return_address(0));
}
KLM_HOOK void __tsan_write_range(void* p, unsigned long size) {
    klm_hook(p, size, KLM_WRITE_UNALIGNED, __builtin_return_address(0));
}

extern char __start_klm_shared[] __attribute__((weak, visibility("hidden")));
extern char __stop_klm_shared[] __attribute__((weak, visibility("hidden")));

__attribute__((visibility("default"), no_sanitize_thread)) int klm_module_attach(const klm_api* api) {
    klm_rt = api;
    return KLM_API_VERSION;
}

__attribute__((visibility("default"), no_sanitize_thread)) void klm_module_static_shared(void** start,
    unsigned long long* size) {
    *start = __start_klm_shared;
    *size = __start_klm_shared ? (unsigned long long)(__stop_klm_shared - __start_klm_shared) : 0;
}
}

// Lanes of a warp share one OS thread (they are fibers): the runtime calls this before resuming a lane.
extern "C" __attribute__((visibility("default"), no_sanitize_thread)) void klm_module_enter(const klm_thread_info* info) {
    threadIdx = uint3{info->thread[0], info->thread[1], info->thread[2]};
    blockIdx = uint3{info->block[0], info->block[1], info->block[2]};
    blockDim = dim3(info->block_dim[0], info->block_dim[1], info->block_dim[2]);
    gridDim = dim3(info->grid_dim[0], info->grid_dim[1], info->grid_dim[2]);
}

namespace klm_registration {
template <int... I> struct indices {};
template <int N> using make_indices = indices<__integer_pack(N)...>;
template <class F> struct traits;
template <class... A> struct traits<void (*)(A...)> {
    static constexpr int count = sizeof...(A);
    static constexpr unsigned int sizes[sizeof...(A) + 1] = {(unsigned int)sizeof(A)..., 0u};
    template <int... I> static void call(void (*kernel)(A...), void** params, indices<I...>) {
        kernel(*static_cast<A*>(params[I])...);
    }
};
// cuLaunchKernel-style arguments (one pointer per argument, pointing at its value) to a typed call.
template <auto Kernel> void thunk(void** params, const klm_thread_info* info) {
    klm_module_enter(info);
    using T = traits<decltype(Kernel)>;
    T::call(Kernel, params, make_indices<T::count>{});
}
}  // namespace klm_registration

#define KLM_KERNEL(name) \
    { #name, &klm_registration::thunk<&name>, klm_registration::traits<decltype(&name)>::count,   \
      klm_registration::traits<decltype(&name)>::sizes },
#define KLM_KERNEL_TABLE(...)                                                                     \
    static const klm_kernel klm_kernel_table[] = {__VA_ARGS__};                                   \
    extern "C" __attribute__((visibility("default"), no_sanitize_thread)) const klm_kernel*      \
    klm_module_kernels(int* count) {                                                              \
        *count = (int)(sizeof(klm_kernel_table) / sizeof(klm_kernel_table[0]));                   \
        return klm_kernel_table;                                                                  \
    }
