// convert.cu — dtype conversion, element-wise.
//
//   y[i] = T_out(x[i])     widening is exact; narrowing rounds to nearest even, NaN stays NaN,
//                          overflow goes to infinity (as PyTorch's .to()).
//
// Layouts: x: [n] T_in, y: [n] T_out (any shape flattened).
// Launch: grid (ceil(n / blockDim.x)), any blockDim.x (256).
#include "common.cuh"

template <typename In, typename Out>
__device__ __forceinline__ void convert(const In* __restrict__ x, Out* __restrict__ y, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = from_float<Out>(to_float(x[i]));
    }
}

extern "C" __global__ void convert_bf16_f32(const bf16_t* x, float* y, long n) { convert(x, y, n); }
extern "C" __global__ void convert_f32_bf16(const float* x, bf16_t* y, long n) { convert(x, y, n); }
extern "C" __global__ void convert_f16_f32(const f16_t* x, float* y, long n) { convert(x, y, n); }
extern "C" __global__ void convert_f32_f16(const float* x, f16_t* y, long n) { convert(x, y, n); }
