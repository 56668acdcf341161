// gemv.cu — the decode-time matrix-vector products: a few tokens' activations times a weight matrix.
//
//   gemv:          y[t, r] = sum_c W[r, c] x[t, c]  (+ bias[r])  (+ residual[t, r])
//   gemv_silu:     y[t, r] = silu(sum_c G[r, c] x[t, c]) * (sum_c U[r, c] x[t, c])      (gate + up + SwiGLU)
//
// Layouts: W, G, U: [rows, cols] row-major (PyTorch nn.Linear [out, in]), T; x: [tokens, cols] T;
// bias: [rows] f32 or null; residual: [tokens, rows] T or null (may alias y: each y element is read, then
// written, by the same lane); y: [tokens, rows] T. tokens <= KLM_GEMV_MAX_TOKENS (decode batches; prefill
// uses GEMM). fp32 accumulation.
//
// Launch: block (128) = 4 warps; each warp computes KLM_GEMV_ROWS adjacent rows; grid
// (ceil(rows / (4 * KLM_GEMV_ROWS))). No shared memory. Each lane streams 16-byte vectors (8 bf16 / f16 or
// 4 f32 values; a warp reads 512 contiguous bytes of a row per step, coalesced) of its warp's rows and the
// matching 16 bytes of x (x is a few KB and stays in L1/L2; loading it once per KLM_GEMV_ROWS rows keeps
// its traffic a fraction of the weights'), when cols is a multiple of the vector width and W and x are
// 16-byte aligned; otherwise one element at a time. Then a warp-shuffle sum per (token, row). Every weight
// byte is read exactly once per launch: the kernel is bound by HBM bandwidth at decode.
#include "common.cuh"

#define KLM_GEMV_MAX_TOKENS 8
#define KLM_GEMV_ROWS 2
#define KLM_GEMV_WARPS 4

// 16 bytes of a row as fp32 values; N = 16 / sizeof(T).
template <typename T> struct vector_width { static const int value = 16 / sizeof(T); };

struct __align__(16) klm_vec16 { unsigned int words[4]; };

template <typename T>
__device__ __forceinline__ void widen16(const klm_vec16& v, float* out);

template <>
__device__ __forceinline__ void widen16<float>(const klm_vec16& v, float* out) {
    #pragma unroll
for (int i = 0; i < 4; i++) {
        out[i] = __uint_as_float(v.words[i]);
    }
}

template <>
__device__ __forceinline__ void widen16<bf16_t>(const klm_vec16& v, float* out) {
    #pragma unroll
for (int i = 0; i < 4; i++) {
        out[2 * i] = __uint_as_float(v.words[i] << 16);
        out[2 * i + 1] = __uint_as_float(v.words[i] & 0xffff0000u);
    }
}

template <>
__device__ __forceinline__ void widen16<f16_t>(const klm_vec16& v, float* out) {
    #pragma unroll
for (int i = 0; i < 4; i++) {
        f16_t low, high;
        low.bits = (unsigned short)(v.words[i] & 0xffffu);
        high.bits = (unsigned short)(v.words[i] >> 16);
        out[2 * i] = f16_to_float(low);
        out[2 * i + 1] = f16_to_float(high);
    }
}

template <typename T>
__device__ __forceinline__ bool aligned16(const T* pointer) {
    return (reinterpret_cast<unsigned long long>(pointer) & 15ull) == 0;
}

// acc[m][t][j] += M_m[row0 + j] . x[t] over this lane's share of the rows, for MATRICES matrices (1 or 2)
// sharing x. Rows past `rows` are skipped (their accumulators stay 0). Loops run to compile-time bounds
// (with an early break on `tokens`) so that the accumulators stay in registers.
template <typename T, int MATRICES>
__device__ __forceinline__ void rows_dot(const T* const* matrices, const T* __restrict__ x, int row0, int rows, int cols, int tokens,
                                         float (*acc)[KLM_GEMV_MAX_TOKENS][KLM_GEMV_ROWS]) {
    const int lane = threadIdx.x % KLM_WARP_SIZE;
    bool vectorised = cols % vector_width<T>::value == 0 && aligned16(x);
#pragma unroll
    for (int m = 0; m < MATRICES; m++) {
        vectorised = vectorised && aligned16(matrices[m]);
    }
    if (vectorised) {
        const int width = vector_width<T>::value;
        const int count = cols / width;
        for (int v = lane; v < count; v += KLM_WARP_SIZE) {
            float w[MATRICES][KLM_GEMV_ROWS][8];
#pragma unroll
            for (int m = 0; m < MATRICES; m++) {
#pragma unroll
                for (int j = 0; j < KLM_GEMV_ROWS; j++) {
                    if (row0 + j < rows) {
                        widen16<T>(reinterpret_cast<const klm_vec16*>(matrices[m] + (long)(row0 + j) * cols)[v], w[m][j]);
                    }
                }
            }
#pragma unroll
            for (int t = 0; t < KLM_GEMV_MAX_TOKENS; t++) {
                if (t >= tokens) {
                    break;
                }
                float xs[8];
                widen16<T>(reinterpret_cast<const klm_vec16*>(x + (long)t * cols)[v], xs);
#pragma unroll
                for (int m = 0; m < MATRICES; m++) {
#pragma unroll
                    for (int j = 0; j < KLM_GEMV_ROWS; j++) {
                        float sum = 0.0f;
#pragma unroll
                        for (int i = 0; i < width; i++) {
                            sum += w[m][j][i] * xs[i];
                        }
                        if (row0 + j < rows) {
                            acc[m][t][j] += sum;
                        }
                    }
                }
            }
        }
        return;
    }
    for (int c = lane; c < cols; c += KLM_WARP_SIZE) {
#pragma unroll
        for (int t = 0; t < KLM_GEMV_MAX_TOKENS; t++) {
            if (t >= tokens) {
                break;
            }
            float xv = to_float(x[(long)t * cols + c]);
#pragma unroll
            for (int m = 0; m < MATRICES; m++) {
#pragma unroll
                for (int j = 0; j < KLM_GEMV_ROWS; j++) {
                    if (row0 + j < rows) {
                        acc[m][t][j] += to_float(matrices[m][(long)(row0 + j) * cols + c]) * xv;
                    }
                }
            }
        }
    }
}

template <typename T>
__device__ __forceinline__ void gemv(const T* __restrict__ w, const T* __restrict__ x, const float* __restrict__ bias,
                                     const T* residual, T* y, int rows, int cols, int tokens) {
    const int warp = threadIdx.x / KLM_WARP_SIZE;
    const int lane = threadIdx.x % KLM_WARP_SIZE;
    const int row0 = (blockIdx.x * KLM_GEMV_WARPS + warp) * KLM_GEMV_ROWS;
    if (row0 >= rows) {
        return;  // warp-uniform
    }
    float acc[1][KLM_GEMV_MAX_TOKENS][KLM_GEMV_ROWS] = {};
    const T* matrices[1] = { w };
    rows_dot<T, 1>(matrices, x, row0, rows, cols, tokens, acc);
#pragma unroll
    for (int t = 0; t < KLM_GEMV_MAX_TOKENS; t++) {
        if (t >= tokens) {
            break;
        }
#pragma unroll
        for (int j = 0; j < KLM_GEMV_ROWS; j++) {
            float sum = warp_reduce_sum(acc[0][t][j]);
            int r = row0 + j;
            if (lane == 0 && r < rows) {
                if (bias != nullptr) {
                    sum += bias[r];
                }
                if (residual != nullptr) {
                    sum += to_float(residual[(long)t * rows + r]);
                }
                y[(long)t * rows + r] = from_float<T>(sum);
            }
        }
    }
}

template <typename T>
__device__ __forceinline__ void gemv_silu(const T* __restrict__ gate, const T* __restrict__ up, const T* __restrict__ x,
                                          T* __restrict__ y, int rows, int cols, int tokens) {
    const int warp = threadIdx.x / KLM_WARP_SIZE;
    const int lane = threadIdx.x % KLM_WARP_SIZE;
    const int row0 = (blockIdx.x * KLM_GEMV_WARPS + warp) * KLM_GEMV_ROWS;
    if (row0 >= rows) {
        return;  // warp-uniform
    }
    float acc[2][KLM_GEMV_MAX_TOKENS][KLM_GEMV_ROWS] = {};
    const T* matrices[2] = { gate, up };
    rows_dot<T, 2>(matrices, x, row0, rows, cols, tokens, acc);
#pragma unroll
    for (int t = 0; t < KLM_GEMV_MAX_TOKENS; t++) {
        if (t >= tokens) {
            break;
        }
#pragma unroll
        for (int j = 0; j < KLM_GEMV_ROWS; j++) {
            float gate_sum = warp_reduce_sum(acc[0][t][j]);
            float up_sum = warp_reduce_sum(acc[1][t][j]);
            int r = row0 + j;
            if (lane == 0 && r < rows) {
                y[(long)t * rows + r] = from_float<T>(gate_sum / (1.0f + expf(-gate_sum)) * up_sum);
            }
        }
    }
}

extern "C" __global__ void gemv_f32(const float* w, const float* x, const float* bias, const float* residual, float* y,
                                    int rows, int cols, int tokens) { gemv(w, x, bias, residual, y, rows, cols, tokens); }
extern "C" __global__ void gemv_bf16(const bf16_t* w, const bf16_t* x, const float* bias, const bf16_t* residual, bf16_t* y,
                                     int rows, int cols, int tokens) { gemv(w, x, bias, residual, y, rows, cols, tokens); }
extern "C" __global__ void gemv_f16(const f16_t* w, const f16_t* x, const float* bias, const f16_t* residual, f16_t* y,
                                    int rows, int cols, int tokens) { gemv(w, x, bias, residual, y, rows, cols, tokens); }

extern "C" __global__ void gemv_silu_f32(const float* gate, const float* up, const float* x, float* y, int rows, int cols, int tokens) {
    gemv_silu(gate, up, x, y, rows, cols, tokens);
}
extern "C" __global__ void gemv_silu_bf16(const bf16_t* gate, const bf16_t* up, const bf16_t* x, bf16_t* y, int rows, int cols, int tokens) {
    gemv_silu(gate, up, x, y, rows, cols, tokens);
}
extern "C" __global__ void gemv_silu_f16(const f16_t* gate, const f16_t* up, const f16_t* x, f16_t* y, int rows, int cols, int tokens) {
    gemv_silu(gate, up, x, y, rows, cols, tokens);
}
