// rms_norm.cu — RMSNorm over rows (HF LlamaRMSNorm), fp32 accumulation.
//
//   y[r, c] = x[r, c] / sqrt(mean_c(x[r, c]^2) + eps) * weight[c]
//
// Layouts: x, y: [rows, cols] row-major, both T (f32 / bf16 / f16; y may alias x);
//          weight: [cols] f32 (norm weights are widened once at load).
// Launch: grid (rows), block (256) — any multiple of 32 up to 1024; 32 floats of static shared memory.
// Each thread strides over the row, the block reduces the sum of squares (fp32), then scales.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void rms_norm(const T* x, const float* __restrict__ weight, T* y, int cols, float epsilon) {
    __shared__ float scratch[32];
    long row = blockIdx.x;
    const T* input = x + row * cols;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float value = to_float(input[c]);
        sum += value * value;
    }
    sum = block_reduce_sum(sum, scratch);
    float scale = rsqrtf(sum / (float)cols + epsilon);
    T* output = y + row * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        output[c] = from_float<T>(to_float(input[c]) * scale * weight[c]);
    }
}

extern "C" __global__ void rms_norm_f32(const float* x, const float* weight, float* y, int cols, float epsilon) {
    rms_norm(x, weight, y, cols, epsilon);
}

extern "C" __global__ void rms_norm_bf16(const bf16_t* x, const float* weight, bf16_t* y, int cols, float epsilon) {
    rms_norm(x, weight, y, cols, epsilon);
}

extern "C" __global__ void rms_norm_f16(const f16_t* x, const float* weight, f16_t* y, int cols, float epsilon) {
    rms_norm(x, weight, y, cols, epsilon);
}
