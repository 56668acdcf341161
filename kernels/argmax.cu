// argmax.cu — index of the largest value of each row (greedy decoding on the device).
//
//   out[r] = min { c : x[r, c] = max_c' x[r, c'] }     ties go to the lowest index, like torch.argmax
//                                                     and TensorPrimitives.IndexOfMax; rows are NaN-free.
//
// Layouts: x: [rows, cols] row-major, T (f32 / bf16); out: [rows] int32.
// Launch: grid (rows), block (256) — a multiple of 32 up to 1024; 2 x 32 words of static shared memory.
// Each thread scans a strided slice keeping (value, index), then a warp-shuffle and a block reduction on the
// pair, ordered by value then by lower index.
#include "common.cuh"

__device__ __forceinline__ void keep_better(float& value, int& index, float other_value, int other_index) {
    if (other_value > value || (other_value == value && other_index < index)) {
        value = other_value;
        index = other_index;
    }
}

template <typename T>
__device__ __forceinline__ void argmax(const T* __restrict__ x, int* __restrict__ out, int cols) {
    __shared__ float values[32];
    __shared__ int indices[32];
    const T* row = x + (long)blockIdx.x * cols;
    float best = -__int_as_float(0x7f800000);
    int best_index = 0x7fffffff;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        keep_better(best, best_index, to_float(row[c]), c);
    }
    for (int offset = KLM_WARP_SIZE / 2; offset > 0; offset >>= 1) {
        float other = __shfl_xor_sync(KLM_FULL_MASK, best, offset);
        int other_index = __shfl_xor_sync(KLM_FULL_MASK, best_index, offset);
        keep_better(best, best_index, other, other_index);
    }
    int lane = threadIdx.x % KLM_WARP_SIZE;
    int warp = threadIdx.x / KLM_WARP_SIZE;
    if (lane == 0) {
        values[warp] = best;
        indices[warp] = best_index;
    }
    __syncthreads();
    if (warp == 0) {
        int warps = blockDim.x / KLM_WARP_SIZE;
        best = lane < warps ? values[lane] : -__int_as_float(0x7f800000);
        best_index = lane < warps ? indices[lane] : 0x7fffffff;
        for (int offset = KLM_WARP_SIZE / 2; offset > 0; offset >>= 1) {
            float other = __shfl_xor_sync(KLM_FULL_MASK, best, offset);
            int other_index = __shfl_xor_sync(KLM_FULL_MASK, best_index, offset);
            keep_better(best, best_index, other, other_index);
        }
        if (lane == 0) {
            out[blockIdx.x] = best_index;
        }
    }
}

extern "C" __global__ void argmax_f32(const float* x, int* out, int cols) { argmax(x, out, cols); }
extern "C" __global__ void argmax_bf16(const bf16_t* x, int* out, int cols) { argmax(x, out, cols); }
