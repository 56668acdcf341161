// embedding.cu — token embedding gather, widened to fp32.
//
//   out[t, c] = float(table[ids[t], c])         t < tokens, c < cols
//
// Layouts: table: [rows, cols] row-major, the safetensors tensor as stored (f32 / bf16 / f16);
//          ids: [tokens] int32; out: [tokens, cols] f32.
// Launch: grid (ceil(cols / blockDim.x), tokens), any blockDim.x. An id outside [0, rows) writes NaN to its
// row, so a bad id shows up in the output instead of reading out of bounds.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void embedding(const T* __restrict__ table, const int* __restrict__ ids, float* __restrict__ out,
                                          int rows, int cols) {
    int token = blockIdx.y;
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) {
        return;
    }
    int id = ids[token];
    out[(long)token * cols + col] = (id >= 0 && id < rows) ? to_float(table[(long)id * cols + col]) : klm_nan();
}

extern "C" __global__ void embedding_f32(const float* table, const int* ids, float* out, int rows, int cols) {
    embedding(table, ids, out, rows, cols);
}

extern "C" __global__ void embedding_bf16(const bf16_t* table, const int* ids, float* out, int rows, int cols) {
    embedding(table, ids, out, rows, cols);
}

extern "C" __global__ void embedding_f16(const f16_t* table, const int* ids, float* out, int rows, int cols) {
    embedding(table, ids, out, rows, cols);
}
