// logit_sum.cu — logit composition: a weighted sum of several models' rows of next-token logits (plug-in
// modules on a frozen backbone, classifier-free guidance, contrastive decoding); the device twin of
// src/Runtime/Composition/LogitSum.cs. Sampling, temperature and the token signals read the sum afterwards.
//
//   logit_sum:      out[r, i] = (accumulate ? out[r, i] : 0) + sum_{m < count} w_m x_m[r, i]      for i < width
//                   fp32 maths, one fmaf per member in member order (the CPU twin's order, so the two agree
//                   bit for bit); weights may be negative (an amateur, an unconditional sequence).
//                   With cutoff (the plausibility cut of contrastive decoding, on member 0 of the launch):
//                   out[r, i] = -inf where x_0[r, i] < cutoff[r].
//   logit_row_max:  cutoff[r] = max_{i < width} x[r, i] + shift. With shift = log(alpha) the cut keeps exactly
//                   {i : p_0(i) >= alpha max_j p_0(j)} (the log-sum-exp cancels on both sides).
//
// Layouts: x_m: [rows, stride_m] row-major T (f32 / bf16), of which the first `width` columns are read
//          (stride_m > width: a member whose LM head has padding rows past the shared vocabulary; they are left
//          out of the sum). Unused inputs are null with weight 0. out: [rows, width] f32. cutoff: [rows] f32 or null.
//          -inf logits are not expected (a member's -inf with a negative weight would make +inf, and -inf + inf NaN).
// Launch:  logit_sum_<dtype>: grid (ceil(width / 256), rows), block (256), up to LOGIT_SUM_MAX_INPUTS members per
//          launch (more: further launches with accumulate = 1). One thread per element: a decode row is read once
//          per member and written once (N x 2 or 4 bytes in, 4 bytes out per entry: bandwidth-bound, a few µs for
//          128K-entry rows on an H200).
//          logit_row_max_<dtype>: grid (rows), block (256), 32 floats of static shared memory; a strided scan and a
//          block reduction (fp32, exact: max does not round).
#include "common.cuh"

#define LOGIT_SUM_MAX_INPUTS 4   // = LogitSum.MaxInputsPerLaunch

template <typename T>
__device__ __forceinline__ void logit_sum(const T* __restrict__ x0, const T* __restrict__ x1, const T* __restrict__ x2,
                                          const T* __restrict__ x3, float w0, float w1, float w2, float w3, long s0,
                                          long s1, long s2, long s3, int count, int width, int accumulate,
                                          const float* __restrict__ cutoff, float* out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    long r = blockIdx.y;
    if (i >= width) {
        return;
    }
    float* target = out + r * width + i;
    float sum = accumulate ? *target : 0.0f;
    float first = to_float(x0[r * s0 + i]);
    sum = fmaf(w0, first, sum);
    if (count > 1) sum = fmaf(w1, to_float(x1[r * s1 + i]), sum);
    if (count > 2) sum = fmaf(w2, to_float(x2[r * s2 + i]), sum);
    if (count > 3) sum = fmaf(w3, to_float(x3[r * s3 + i]), sum);
    if (cutoff != 0 && first < cutoff[r]) {
        sum = -__int_as_float(0x7f800000);
    }
    *target = sum;
}

template <typename T>
__device__ __forceinline__ void logit_row_max(const T* __restrict__ x, long stride, int width, float shift, float* cutoff) {
    __shared__ float scratch[32];
    const T* row = x + (long)blockIdx.x * stride;
    float best = -__int_as_float(0x7f800000);
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        best = fmaxf(best, to_float(row[i]));
    }
    best = block_reduce_max(best, scratch);
    if (threadIdx.x == 0) {
        cutoff[blockIdx.x] = best + shift;
    }
}

extern "C" __global__ void logit_sum_f32(const float* x0, const float* x1, const float* x2, const float* x3, float w0, float w1,
                                         float w2, float w3, long s0, long s1, long s2, long s3, int count, int width,
                                         int accumulate, const float* cutoff, float* out) {
    logit_sum(x0, x1, x2, x3, w0, w1, w2, w3, s0, s1, s2, s3, count, width, accumulate, cutoff, out);
}

extern "C" __global__ void logit_sum_bf16(const bf16_t* x0, const bf16_t* x1, const bf16_t* x2, const bf16_t* x3, float w0,
                                          float w1, float w2, float w3, long s0, long s1, long s2, long s3, int count,
                                          int width, int accumulate, const float* cutoff, float* out) {
    logit_sum(x0, x1, x2, x3, w0, w1, w2, w3, s0, s1, s2, s3, count, width, accumulate, cutoff, out);
}

extern "C" __global__ void logit_row_max_f32(const float* x, long stride, int width, float shift, float* cutoff) {
    logit_row_max(x, stride, width, shift, cutoff);
}

extern "C" __global__ void logit_row_max_bf16(const bf16_t* x, long stride, int width, float shift, float* cutoff) {
    logit_row_max(x, stride, width, shift, cutoff);
}
