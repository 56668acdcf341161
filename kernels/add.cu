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

// add_bias: y[t, r] += bias[r] for y [tokens, rows] (T) and bias [rows] (f32): the bias of a projection whose
// product came from cuBLAS (the built-in GEMV and GEMM fuse it).
// Launch: grid (ceil(rows / blockDim.x), tokens), blockDim.x 256.
template <typename T>
__device__ __forceinline__ void add_bias(T* y, const float* __restrict__ bias, int rows) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < rows) {
        T* row = y + (long)blockIdx.y * rows;
        row[r] = from_float<T>(to_float(row[r]) + bias[r]);
    }
}

extern "C" __global__ void add_bias_f32(float* y, const float* bias, int rows) { add_bias(y, bias, rows); }
extern "C" __global__ void add_bias_bf16(bf16_t* y, const float* bias, int rows) { add_bias(y, bias, rows); }
extern "C" __global__ void add_bias_f16(f16_t* y, const float* bias, int rows) { add_bias(y, bias, rows); }
