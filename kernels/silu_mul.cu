// silu_mul.cu — the SwiGLU gate, element-wise, in place on gate.
//
//   gate[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i]      (fp32 maths)
//
// Layouts: gate, up: [n] (any shape flattened), T (f32 / bf16 / f16).
// Launch: grid (ceil(n / blockDim.x)), any blockDim.x (256).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void silu_mul(T* gate, const T* __restrict__ up, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    float g = to_float(gate[i]);
    gate[i] = from_float<T>(g / (1.0f + expf(-g)) * to_float(up[i]));
}

extern "C" __global__ void silu_mul_f32(float* gate, const float* up, long n) { silu_mul(gate, up, n); }
extern "C" __global__ void silu_mul_bf16(bf16_t* gate, const bf16_t* up, long n) { silu_mul(gate, up, n); }
extern "C" __global__ void silu_mul_f16(f16_t* gate, const f16_t* up, long n) { silu_mul(gate, up, n); }
