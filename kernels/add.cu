// add.cu — residual add, element-wise, in place.
//
//   y[i] = y[i] + x[i]            (fp32 maths)
//
// Layouts: y, x: [n] (any shape flattened), T (f32 / bf16 / f16).
// Launch: grid (ceil(n / blockDim.x)), any blockDim.x (256).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void add(T* y, const T* __restrict__ x, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = from_float<T>(to_float(y[i]) + to_float(x[i]));
    }
}

extern "C" __global__ void add_f32(float* y, const float* x, long n) { add(y, x, n); }
extern "C" __global__ void add_bf16(bf16_t* y, const bf16_t* x, long n) { add(y, x, n); }
extern "C" __global__ void add_f16(f16_t* y, const f16_t* x, long n) { add(y, x, n); }
