// rope.cu — rotary position embedding, HF rotate-half convention, in place.
//
//   for i < d/2, position p = start (+ *start_at when start_at is not null) + t:  θ = p * inv_freq[i]   (fp32, as
//   transformers computes it). start_at lets a captured CUDA graph read the position from device memory.
//   (x[i], x[i + d/2]) -> (x[i] cos θ - x[i + d/2] sin θ,  x[i + d/2] cos θ + x[i] sin θ)
//
// Layouts: x: [tokens, heads, head_dim] row-major, T (f32 / bf16 / f16); inv_freq: [head_dim / 2] f32, already
// rescaled for rope_scaling (linear, llama3) on the host.
// Launch: grid (tokens, heads), block (head_dim / 2 rounded up to a multiple of 32, at most 1024).
// Compiled without fast math, so sincosf is the accurate (~1 ulp) version.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void rope(T* x, const float* __restrict__ inv_freq, const int* __restrict__ start_at, int heads, int head_dim,
                                     int start) {
    int half = head_dim / 2;
    int i = threadIdx.x;
    if (i >= half) {
        return;
    }
    int token = blockIdx.x;
    int head = blockIdx.y;
    if (start_at != nullptr) {
        start += *start_at;
    }
    float angle = (float)(start + token) * inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    T* row = x + ((long)token * heads + head) * head_dim;
    float a = to_float(row[i]);
    float b = to_float(row[i + half]);
    row[i] = from_float<T>(a * c - b * s);
    row[i + half] = from_float<T>(b * c + a * s);
}

extern "C" __global__ void rope_f32(float* x, const float* inv_freq, const int* start_at, int heads, int head_dim, int start) {
    rope(x, inv_freq, start_at, heads, head_dim, start);
}

extern "C" __global__ void rope_bf16(bf16_t* x, const float* inv_freq, const int* start_at, int heads, int head_dim, int start) {
    rope(x, inv_freq, start_at, heads, head_dim, start);
}

extern "C" __global__ void rope_f16(f16_t* x, const float* inv_freq, const int* start_at, int heads, int head_dim, int start) {
    rope(x, inv_freq, start_at, heads, head_dim, start);
}
