// common.cuh — helpers shared by every kernel in kernels/.
//
// Header-free on purpose: the NVRTC in CI (11.8) ships no cuda_fp16.h / cuda_bf16.h, so the 16-bit float
// types are plain 16-bit storage with explicit conversions, and nothing here includes a system header.
// The same file compiles three ways:
//   - NVRTC for a real GPU (__CUDA_ARCH__ defined),
//   - g++ for the emulated device (KERNELLM_EMULATOR defined; the emulator's shim header provides
//     threadIdx/blockIdx/blockDim/gridDim, __syncthreads, the *_sync warp intrinsics, atomics and the
//     float/int bit-cast intrinsics before this file is included).
// Conventions every kernel follows so that both builds behave the same:
//   - dynamic shared memory only through KLM_DYNAMIC_SHARED(type, name);
//   - no warp-synchronous code without an explicit *_sync intrinsic or __syncwarp();
//   - entry points are extern "C" __global__, named <op>_<dtype>[_<variant>];
//   - accumulation in fp32.
#pragma once

#ifdef KERNELLM_EMULATOR
#define KLM_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(klm_dynamic_shared_memory())
#else
#define KLM_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) unsigned char klm_dynamic_shared_bytes[]; \
    type* name = reinterpret_cast<type*>(klm_dynamic_shared_bytes)
#endif

#define KLM_WARP_SIZE 32
#define KLM_FULL_MASK 0xffffffffu

// Distinct 2-byte storage types (not typedefs of one integer) so that kernels can be templates over the
// element type and overloads pick the right conversion.
struct __align__(2) bf16_t { unsigned short bits; };   // bfloat16: the upper half of an fp32
struct __align__(2) f16_t { unsigned short bits; };    // IEEE binary16

// ------------------------------------------------------------------ 16-bit float conversions

__device__ __forceinline__ float bf16_to_float(bf16_t value) {
    return __uint_as_float(((unsigned int)value.bits) << 16);
}

// Round to nearest even; NaN stays a quiet NaN (as PyTorch and __float2bfloat16_rn).
__device__ __forceinline__ bf16_t float_to_bf16(float value) {
    unsigned int bits = __float_as_uint(value);
    bf16_t result;
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        result.bits = (unsigned short)((bits >> 16) | 0x0040u);
        return result;
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    result.bits = (unsigned short)(bits >> 16);
    return result;
}

__device__ __forceinline__ float f16_to_float(f16_t value) {
#ifdef __CUDA_ARCH__
    float result;
    asm("cvt.f32.f16 %0, %1;" : "=f"(result) : "h"(value.bits));
    return result;
#else
    unsigned int sign = ((unsigned int)value.bits & 0x8000u) << 16;
    unsigned int exponent = ((unsigned int)value.bits >> 10) & 0x1fu;
    unsigned int mantissa = (unsigned int)value.bits & 0x3ffu;
    if (exponent == 0x1fu) {
        return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
    }
    if (exponent == 0) {
        if (mantissa == 0) {
            return __uint_as_float(sign);
        }
        // Subnormal: value = mantissa * 2^-24, exact in fp32.
        float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#endif
}

__device__ __forceinline__ f16_t float_to_f16(float value) {
    f16_t result;
#ifdef __CUDA_ARCH__
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(result.bits) : "f"(value));
    return result;
#else
    unsigned int bits = __float_as_uint(value);
    unsigned int sign = (bits >> 16) & 0x8000u;
    unsigned int magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) {
        result.bits = (unsigned short)(sign | 0x7e00u);      // NaN
        return result;
    }
    if (magnitude >= 0x477ff000u) {
        result.bits = (unsigned short)(sign | 0x7c00u);      // rounds to infinity (>= 65520)
        return result;
    }
    if (magnitude < 0x38800000u) {
        // Subnormal or zero in f16: round magnitude / 2^-24 to nearest even.
        float scaled = __uint_as_float(magnitude) * 16777216.0f;  // exact: power-of-two scale
        unsigned int integer = (unsigned int)scaled;
        float remainder = scaled - (float)integer;
        if (remainder > 0.5f || (remainder == 0.5f && (integer & 1u))) {
            integer++;
        }
        result.bits = (unsigned short)(sign | integer);
        return result;
    }
    unsigned int rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
    result.bits = (unsigned short)(sign | ((rounded - 0x38000000u) >> 13));
    return result;
#endif
}

// Overloads for kernels templated over the element type: to_float(x) widens, from_float<T>(f) narrows.
__device__ __forceinline__ float to_float(float value) { return value; }
__device__ __forceinline__ float to_float(bf16_t value) { return bf16_to_float(value); }
__device__ __forceinline__ float to_float(f16_t value) { return f16_to_float(value); }

template <typename T> __device__ __forceinline__ T from_float(float value);
template <> __device__ __forceinline__ float from_float<float>(float value) { return value; }
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float value) { return float_to_bf16(value); }
template <> __device__ __forceinline__ f16_t from_float<f16_t>(float value) { return float_to_f16(value); }

// A quiet NaN, written where an input is invalid (an id out of range) so the fault is visible downstream.
__device__ __forceinline__ float klm_nan() { return __int_as_float(0x7fc00000); }

// splitmix64 of (seed, counter): the counter-based generator of sampling's draws and of fill's synthetic weights.
__device__ __forceinline__ unsigned long long klm_splitmix64(unsigned long long seed, unsigned long long counter) {
    unsigned long long z = seed + (counter + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// ------------------------------------------------------------------ reductions

// Templates over the value type (float; double where a sum must not depend on the order, e.g. sampling).
template <typename V>
__device__ __forceinline__ V warp_reduce_sum(V value) {
    for (int offset = KLM_WARP_SIZE / 2; offset > 0; offset >>= 1) {
        value += __shfl_xor_sync(KLM_FULL_MASK, value, offset);
    }
    return value;
}

__device__ __forceinline__ float warp_reduce_max(float value) {
    for (int offset = KLM_WARP_SIZE / 2; offset > 0; offset >>= 1) {
        value = fmaxf(value, __shfl_xor_sync(KLM_FULL_MASK, value, offset));
    }
    return value;
}

// Sum over the whole block; every thread gets the result. scratch: at least 32 floats of shared memory.
// blockDim.x must be a multiple of 32. Ends with a barrier, so scratch can be reused right after.
template <typename V>
__device__ __forceinline__ V block_reduce_sum(V value, V* scratch) {
    int lane = threadIdx.x % KLM_WARP_SIZE;
    int warp = threadIdx.x / KLM_WARP_SIZE;
    int warps = blockDim.x / KLM_WARP_SIZE;
    value = warp_reduce_sum(value);
    if (lane == 0) {
        scratch[warp] = value;
    }
    __syncthreads();
    value = lane < warps ? scratch[lane] : (V)0;
    value = warp_reduce_sum(value);
    __syncthreads();
    return value;
}

__device__ __forceinline__ float block_reduce_max(float value, float* scratch) {
    int lane = threadIdx.x % KLM_WARP_SIZE;
    int warp = threadIdx.x / KLM_WARP_SIZE;
    int warps = blockDim.x / KLM_WARP_SIZE;
    value = warp_reduce_max(value);
    if (lane == 0) {
        scratch[warp] = value;
    }
    __syncthreads();
    value = lane < warps ? scratch[lane] : -__int_as_float(0x7f800000);
    value = warp_reduce_max(value);
    __syncthreads();
    return value;
}

// Warp-wide max / min / or of 32-bit unsigned values; every lane gets the result. sm_80+ has a single
// instruction for each (redux.sync); older architectures, and nothing else, take the shuffle tree.
__device__ __forceinline__ unsigned int warp_reduce_max_u32(unsigned int value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    for (int offset = KLM_WARP_SIZE / 2; offset > 0; offset >>= 1) {
        value = max(value, __shfl_xor_sync(KLM_FULL_MASK, value, offset));
    }
    return value;
#else
    return __reduce_max_sync(KLM_FULL_MASK, value);
#endif
}

__device__ __forceinline__ unsigned int warp_reduce_min_u32(unsigned int value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    for (int offset = KLM_WARP_SIZE / 2; offset > 0; offset >>= 1) {
        value = min(value, __shfl_xor_sync(KLM_FULL_MASK, value, offset));
    }
    return value;
#else
    return __reduce_min_sync(KLM_FULL_MASK, value);
#endif
}

__device__ __forceinline__ unsigned int warp_reduce_or_u32(unsigned int value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    for (int offset = KLM_WARP_SIZE / 2; offset > 0; offset >>= 1) {
        value |= __shfl_xor_sync(KLM_FULL_MASK, value, offset);
    }
    return value;
#else
    return __reduce_or_sync(KLM_FULL_MASK, value);
#endif
}
