// gemm.cu — the prefill matrix products: a chunk of tokens' activations times a weight matrix.
//
//   y[t, r] = sum_c x[t, c] W[r, c]  (+ bias[r])  (+ residual[t, r])          ("NT": both operands K-contiguous)
//
// Layouts: x: [tokens, cols] T; W: [rows, cols] T (PyTorch nn.Linear [out, in]); bias: [rows] f32 or null;
// residual: [tokens, rows] T or null (may alias y: every y element is read, then written, by one thread);
// y: [tokens, rows] T. fp32 accumulation.
//
// Launch: grid (ceil(rows / 64), ceil(tokens / 64)), block (256). Each block computes a 64 x 64 tile of y; the
// K dimension advances 16 columns at a time through shared memory (x and W tiles stored K-major, 2 x 16 x 65
// floats, padded against bank conflicts); each thread accumulates a 4 x 4 micro-tile in registers. Bounds are
// checked on every edge, so any tokens / rows / cols work.
//
// This is the portable path (the emulated device, and any GPU). On NVIDIA hardware the engine's prefill
// GEMMs are meant to go through cuBLAS / cuBLASLt with tensor cores (bf16 in, fp32 compute); this kernel is the
// reference those are checked against and the fallback when cuBLAS is absent.
#include "common.cuh"

#define KLM_GEMM_TILE 64
#define KLM_GEMM_K 16
#define KLM_GEMM_MICRO 4

template <typename T>
__device__ __forceinline__ void gemm(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ bias,
                                     const T* residual, T* y, int tokens, int rows, int cols) {
    __shared__ float x_tile[KLM_GEMM_K][KLM_GEMM_TILE + 1];
    __shared__ float w_tile[KLM_GEMM_K][KLM_GEMM_TILE + 1];
    const int row_base = blockIdx.x * KLM_GEMM_TILE;
    const int token_base = blockIdx.y * KLM_GEMM_TILE;
    // 16 x 16 threads; thread (tx, ty) owns rows row_base + tx * 4 .. +3 and tokens token_base + ty * 4 .. +3.
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
    float acc[KLM_GEMM_MICRO][KLM_GEMM_MICRO] = {};

    for (int k0 = 0; k0 < cols; k0 += KLM_GEMM_K) {
        // 64 x 16 values per operand, 256 threads: 4 each. Consecutive threads read consecutive k of one row.
        for (int i = threadIdx.x; i < KLM_GEMM_TILE * KLM_GEMM_K; i += blockDim.x) {
            int local = i / KLM_GEMM_K;
            int k = i % KLM_GEMM_K;
            int c = k0 + k;
            int token = token_base + local;
            int row = row_base + local;
            x_tile[k][local] = (token < tokens && c < cols) ? to_float(x[(long)token * cols + c]) : 0.0f;
            w_tile[k][local] = (row < rows && c < cols) ? to_float(w[(long)row * cols + c]) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < KLM_GEMM_K; k++) {
            float xs[KLM_GEMM_MICRO];
            float ws[KLM_GEMM_MICRO];
#pragma unroll
            for (int m = 0; m < KLM_GEMM_MICRO; m++) {
                xs[m] = x_tile[k][ty * KLM_GEMM_MICRO + m];
                ws[m] = w_tile[k][tx * KLM_GEMM_MICRO + m];
            }
#pragma unroll
            for (int a = 0; a < KLM_GEMM_MICRO; a++) {
#pragma unroll
                for (int b = 0; b < KLM_GEMM_MICRO; b++) {
                    acc[a][b] += xs[a] * ws[b];
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int a = 0; a < KLM_GEMM_MICRO; a++) {
        int token = token_base + ty * KLM_GEMM_MICRO + a;
        if (token >= tokens) {
            break;
        }
#pragma unroll
        for (int b = 0; b < KLM_GEMM_MICRO; b++) {
            int row = row_base + tx * KLM_GEMM_MICRO + b;
            if (row < rows) {
                float sum = acc[a][b];
                if (bias != nullptr) {
                    sum += bias[row];
                }
                long index = (long)token * rows + row;
                if (residual != nullptr) {
                    sum += to_float(residual[index]);
                }
                y[index] = from_float<T>(sum);
            }
        }
    }
}

extern "C" __global__ void gemm_f32(const float* x, const float* w, const float* bias, const float* residual, float* y,
                                    int tokens, int rows, int cols) { gemm(x, w, bias, residual, y, tokens, rows, cols); }
extern "C" __global__ void gemm_bf16(const bf16_t* x, const bf16_t* w, const float* bias, const bf16_t* residual, bf16_t* y,
                                     int tokens, int rows, int cols) { gemm(x, w, bias, residual, y, tokens, rows, cols); }
extern "C" __global__ void gemm_f16(const f16_t* x, const f16_t* w, const float* bias, const f16_t* residual, f16_t* y,
                                    int tokens, int rows, int cols) { gemm(x, w, bias, residual, y, tokens, rows, cols); }
