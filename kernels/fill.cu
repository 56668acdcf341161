// fill.cu — initialising device tensors without a host copy: seeded uniform noise (synthetic weights for the
// benchmarks: the shapes decide the speed, not the values) and constants.
//
//   fill_uniform:  x[i] = scale * u(seed, i),  u uniform in [-1, 1) from splitmix64(seed + i)   (counter-based:
//                  the same seed gives the same tensor on every device and launch geometry)
//   fill_constant: x[i] = value
//
// Layouts: x: [n] (any shape flattened), T (f32 / bf16 / f16). Launch: grid-stride loop, any grid (the launcher
// uses min(ceil(n / 256), 65535) blocks of 256).
#include "common.cuh"

__device__ __forceinline__ float klm_uniform_signed(unsigned long long seed, unsigned long long i) {
    return (float)(klm_splitmix64(seed, i) >> 40) * (1.0f / 8388608.0f) - 1.0f;  // 24 random bits -> [-1, 1)
}

template <typename T>
__device__ __forceinline__ void fill_uniform(T* x, long n, unsigned long long seed, float scale) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        x[i] = from_float<T>(scale * klm_uniform_signed(seed, (unsigned long long)i));
    }
}

extern "C" __global__ void fill_uniform_f32(float* x, long n, unsigned long long seed, float scale) { fill_uniform(x, n, seed, scale); }
extern "C" __global__ void fill_uniform_bf16(bf16_t* x, long n, unsigned long long seed, float scale) { fill_uniform(x, n, seed, scale); }
extern "C" __global__ void fill_uniform_f16(f16_t* x, long n, unsigned long long seed, float scale) { fill_uniform(x, n, seed, scale); }

extern "C" __global__ void fill_constant_f32(float* x, long n, float value) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        x[i] = value;
    }
}
