// sampling.cu — choosing the next token on the device, so only its id comes back to the host.
//
// The same processing order and maths as the CPU sampler (src/Runtime/Sampling/Sampler.cs, transformers'):
//   repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw
//   greedy (temperature == 0):  argmax, ties to the lowest id.
//   z_i = x_i / T;  w_i = exp(z_i - max z);  top-k keeps the k largest logits (ties at the k-th value all
//   stay); top-p keeps the shortest prefix, in decreasing order, whose mass (normalised over the top-k set)
//   reaches top_p; min-p keeps w_i >= min_p (w of the top token is 1); the draw walks the kept tokens in
//   decreasing order and returns the first whose running mass exceeds u x (kept mass).
//
// Layouts: logits [rows, vocab] row-major T (f32 / bf16), left unchanged; out [rows] int32.
// The uniform draw u in [0, 1): uniforms[row] (f64) when given (tests compare with the CPU sampler on the
// same draw); otherwise splitmix64(seed, counter[row]) and counter[row] is incremented by the kernel, so a
// captured decode graph draws a fresh number at every replay and the sequence depends only on the seed.
// Launch: grid (rows), block (KLM_SAMPLE_THREADS = 1024); ~18 KB static shared memory.
//
// Algorithm, per row (one block): pass 1 max/argmax; a radix select (4 passes of 8 bits over the
// order-preserving integer keys of the logits) finds the k-th largest logit; one pass sums the top-k mass
// and counts the candidates that also pass min-p. If they are at most KLM_SAMPLE_CANDIDATES (the usual case:
// top-k or min-p is set), they are compacted into shared memory in id order, bitonic-sorted (decreasing value,
// ties by id) and top-p / min-p / the draw run exactly as on the CPU over that short sorted list. Otherwise
// (no top-k and a flat distribution) top-p's threshold is found by a deterministic bisection over the keys
// (32 block-reduced passes) and the draw walks the kept tokens in id order: the same distribution, but for a
// given u not necessarily the CPU's token. All sums are block reductions in a fixed order: the same inputs
// give the same token on every run.
//
// repetition_penalty: logits[t] = logits[t] > 0 ? logits[t] / penalty : logits[t] * penalty, once per
// distinct id in history[0 .. *history_length); flags [rows, vocab] int32 zeroed scratch, restored to zero
// by repetition_penalty_clear (history length is read from device memory so a graph can be replayed).
#include "common.cuh"

#define KLM_SAMPLE_THREADS 1024
#define KLM_SAMPLE_CANDIDATES 2048

// Order-preserving map of fp32 to uint32: a < b  <=>  key(a) < key(b) (for non-NaN values).
__device__ __forceinline__ unsigned int ordered_key(float x) {
    unsigned int bits = __float_as_uint(x);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// splitmix64 of (seed, counter) -> a double in [0, 1) with 53 random bits.
__device__ __forceinline__ double klm_uniform(unsigned long long seed, unsigned long long counter) {
    return (double)(klm_splitmix64(seed, counter) >> 11) * (1.0 / 9007199254740992.0);
}

// Exclusive prefix sum over the block in thread order; *total gets the sum. Ends with a barrier.
template <typename V>
__device__ __forceinline__ V block_exclusive_scan(V value, V* scratch, V* total) {
    int lane = threadIdx.x % KLM_WARP_SIZE;
    int warp = threadIdx.x / KLM_WARP_SIZE;
    int warps = blockDim.x / KLM_WARP_SIZE;
    V inclusive = value;
    for (int offset = 1; offset < KLM_WARP_SIZE; offset <<= 1) {
        V other = __shfl_up_sync(KLM_FULL_MASK, inclusive, offset);
        if (lane >= offset) {
            inclusive += other;
        }
    }
    if (lane == KLM_WARP_SIZE - 1) {
        scratch[warp] = inclusive;
    }
    __syncthreads();
    if (warp == 0) {
        V warp_total = lane < warps ? scratch[lane] : (V)0;
        V warp_inclusive = warp_total;
        for (int offset = 1; offset < KLM_WARP_SIZE; offset <<= 1) {
            V other = __shfl_up_sync(KLM_FULL_MASK, warp_inclusive, offset);
            if (lane >= offset) {
                warp_inclusive += other;
            }
        }
        if (lane < warps) {
            scratch[lane] = warp_inclusive - warp_total;  // exclusive offset of each warp
        }
        if (lane == KLM_WARP_SIZE - 1) {
            scratch[KLM_WARP_SIZE] = warp_inclusive;
        }
    }
    __syncthreads();
    V result = scratch[warp] + inclusive - value;
    *total = scratch[KLM_WARP_SIZE];
    __syncthreads();
    return result;
}

struct SampleShared {
    float values[KLM_SAMPLE_CANDIDATES];
    int ids[KLM_SAMPLE_CANDIDATES];
    unsigned int histogram[256];
    double doubles[KLM_WARP_SIZE + 1];
    int ints[KLM_WARP_SIZE + 1];
    float best_values[KLM_WARP_SIZE];
    int best_ids[KLM_WARP_SIZE];
    unsigned int prefix;
    int remaining;
    unsigned int low;   // top-p bisection bounds, decided by thread 0 and read by all after a barrier
    unsigned int high;
};

__device__ __forceinline__ void keep_larger(float& value, int& id, float other_value, int other_id) {
    if (other_value > value || (other_value == value && other_id < id)) {
        value = other_value;
        id = other_id;
    }
}

// The k-th largest key of the row (k >= 1): 4 passes, each fixing 8 bits from the top.
template <typename T>
__device__ unsigned int radix_select(const T* row, int vocab, int k, SampleShared& s) {
    if (threadIdx.x == 0) {
        s.prefix = 0;
        s.remaining = k;
    }
    unsigned int mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) {
            s.histogram[b] = 0;
        }
        __syncthreads();
        unsigned int prefix = s.prefix;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            unsigned int key = ordered_key(to_float(row[i]));
            if ((key & mask) == prefix) {
                atomicAdd(&s.histogram[(key >> shift) & 255u], 1u);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int remaining = s.remaining;
            int digit = 0;
            for (int b = 255; b >= 0; b--) {
                int count = (int)s.histogram[b];
                if (remaining <= count) {
                    digit = b;
                    break;
                }
                remaining -= count;
            }
            s.remaining = remaining;
            s.prefix = prefix | ((unsigned int)digit << shift);
        }
        mask |= 255u << shift;
        __syncthreads();
    }
    return s.prefix;
}

template <typename T>
__device__ void sample(const T* __restrict__ logits, int vocab, float temperature, int top_k, float top_p, float min_p,
                       const double* __restrict__ uniforms, unsigned long long seed, unsigned long long* counters,
                       int* __restrict__ out) {
    __shared__ SampleShared s;
    const T* row = logits + (long)blockIdx.x * vocab;
    const int lane = threadIdx.x % KLM_WARP_SIZE;
    const int warp = threadIdx.x / KLM_WARP_SIZE;
    const int warps = blockDim.x / KLM_WARP_SIZE;

    // Pass 1: the largest logit and its (lowest) id.
    float best = -__int_as_float(0x7f800000);
    int best_id = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        keep_larger(best, best_id, to_float(row[i]), i);
    }
    for (int offset = KLM_WARP_SIZE / 2; offset > 0; offset >>= 1) {
        keep_larger(best, best_id, __shfl_xor_sync(KLM_FULL_MASK, best, offset), __shfl_xor_sync(KLM_FULL_MASK, best_id, offset));
    }
    if (lane == 0) {
        s.best_values[warp] = best;
        s.best_ids[warp] = best_id;
    }
    __syncthreads();
    best = -__int_as_float(0x7f800000);
    best_id = 0x7fffffff;
    for (int w = 0; w < warps; w++) {
        keep_larger(best, best_id, s.best_values[w], s.best_ids[w]);
    }
    if (temperature == 0.0f) {
        if (threadIdx.x == 0) {
            out[blockIdx.x] = best_id;
        }
        return;
    }

    double u;
    if (uniforms != nullptr) {
        u = uniforms[blockIdx.x];
    } else {
        u = klm_uniform(seed, counters[blockIdx.x]);
    }
    const float max_scaled = best / temperature;
    const unsigned int k_key = (top_k > 0 && top_k < vocab) ? radix_select(row, vocab, top_k, s) : 0u;

    // The top-k set's mass (top-p normalises over it) and the candidates that also pass min-p.
    double mass = 0.0;
    int count = 0;
    const int slice = (vocab + blockDim.x - 1) / blockDim.x;
    const int begin = min(vocab, (int)threadIdx.x * slice);
    const int end = min(vocab, begin + slice);
    for (int i = begin; i < end; i++) {
        float x = to_float(row[i]);
        if (ordered_key(x) >= k_key) {
            float w = expf(x / temperature - max_scaled);
            mass += w;
            count += (min_p <= 0.0f || w >= min_p) ? 1 : 0;
        }
    }
    const double topk_mass = block_reduce_sum(mass, s.doubles);
    int candidates = 0;
    const int offset = block_exclusive_scan(count, s.ints, &candidates);

    if (candidates <= KLM_SAMPLE_CANDIDATES) {
        // Path A: compact in id order, sort, and run the CPU sampler's loop over the short list.
        int slot = offset;
        for (int i = begin; i < end; i++) {
            float x = to_float(row[i]);
            if (ordered_key(x) >= k_key) {
                float z = x / temperature;
                float w = expf(z - max_scaled);
                if (min_p <= 0.0f || w >= min_p) {
                    s.values[slot] = z;
                    s.ids[slot] = i;
                    slot++;
                }
            }
        }
        int size = 1;
        while (size < candidates) {
            size <<= 1;
        }
        for (int i = candidates + threadIdx.x; i < size; i += blockDim.x) {
            s.values[i] = -__int_as_float(0x7f800000);
            s.ids[i] = 0x7fffffff;
        }
        __syncthreads();
        // Bitonic sort, decreasing value, ties by increasing id.
        for (int width = 2; width <= size; width <<= 1) {
            for (int stride = width >> 1; stride > 0; stride >>= 1) {
                for (int i = threadIdx.x; i < size; i += blockDim.x) {
                    int j = i ^ stride;
                    if (j > i) {
                        bool first_before = s.values[i] > s.values[j] || (s.values[i] == s.values[j] && s.ids[i] < s.ids[j]);
                        bool descending = (i & width) == 0;
                        if (first_before != descending) {
                            float value = s.values[i];
                            s.values[i] = s.values[j];
                            s.values[j] = value;
                            int id = s.ids[i];
                            s.ids[i] = s.ids[j];
                            s.ids[j] = id;
                        }
                    }
                }
                __syncthreads();
            }
        }
        if (threadIdx.x == 0) {
            int keep = candidates;
            if (top_p < 1.0f) {
                double cumulative = 0.0;
                for (int i = 0; i < candidates; i++) {
                    cumulative += expf(s.values[i] - max_scaled) / topk_mass;
                    if (cumulative >= top_p) {
                        keep = i + 1;
                        break;
                    }
                }
            }
            double kept = 0.0;
            for (int i = 0; i < keep; i++) {
                kept += expf(s.values[i] - max_scaled);
            }
            double target = u * kept;
            double running = 0.0;
            int chosen = s.ids[keep - 1];
            for (int i = 0; i < keep; i++) {
                running += expf(s.values[i] - max_scaled);
                if (target < running) {
                    chosen = s.ids[i];
                    break;
                }
            }
            out[blockIdx.x] = chosen;
            if (uniforms == nullptr) {
                counters[blockIdx.x] += 1ull;
            }
        }
        return;
    }

    // Path B: many candidates. top-p threshold: the largest key whose kept mass still reaches top_p.
    unsigned int threshold = k_key;
    if (top_p < 1.0f) {
        // mass(key >= low) reaches top_p (at k_key it is everything); high is the top token alone. Thread 0
        // decides each step and the bounds travel through shared memory, so the loop is uniform by construction.
        if (threadIdx.x == 0) {
            s.low = k_key;
            s.high = ordered_key(best);
        }
        __syncthreads();
        while (true) {
            unsigned int low = s.low;
            unsigned int high = s.high;
            if (low >= high) {
                break;
            }
            unsigned int middle = low + (high - low + 1u) / 2u;
            double part = 0.0;
            for (int i = begin; i < end; i++) {
                float x = to_float(row[i]);
                unsigned int key = ordered_key(x);
                if (key >= middle && key >= k_key) {
                    part += expf(x / temperature - max_scaled);
                }
            }
            double reached = block_reduce_sum(part, s.doubles) / topk_mass;  // ends with a barrier
            if (threadIdx.x == 0) {
                if (reached >= top_p) {
                    s.low = middle;
                } else {
                    s.high = middle - 1u;
                }
            }
            __syncthreads();
        }
        threshold = s.low;
    }
    // The draw in id order over the kept tokens (key >= threshold, and min-p).
    double own = 0.0;
    for (int i = begin; i < end; i++) {
        float x = to_float(row[i]);
        if (ordered_key(x) >= threshold) {
            float w = expf(x / temperature - max_scaled);
            if (min_p <= 0.0f || w >= min_p) {
                own += w;
            }
        }
    }
    double kept = 0.0;
    double before = block_exclusive_scan(own, s.doubles, &kept);
    double target = u * kept;
    if (threadIdx.x == 0) {
        out[blockIdx.x] = best_id;  // if rounding leaves the target past the last token: the top token
    }
    __syncthreads();
    if (target >= before && target < before + own) {
        double running = before;
        for (int i = begin; i < end; i++) {
            float x = to_float(row[i]);
            if (ordered_key(x) >= threshold) {
                float w = expf(x / temperature - max_scaled);
                if (min_p <= 0.0f || w >= min_p) {
                    running += w;
                    if (target < running) {
                        out[blockIdx.x] = i;
                        break;
                    }
                }
            }
        }
    }
    if (threadIdx.x == 0 && uniforms == nullptr) {
        counters[blockIdx.x] += 1ull;
    }
}

extern "C" __global__ void sample_f32(const float* logits, int vocab, float temperature, int top_k, float top_p, float min_p,
                                      const double* uniforms, unsigned long long seed, unsigned long long* counters, int* out) {
    sample(logits, vocab, temperature, top_k, top_p, min_p, uniforms, seed, counters, out);
}
extern "C" __global__ void sample_bf16(const bf16_t* logits, int vocab, float temperature, int top_k, float top_p, float min_p,
                                       const double* uniforms, unsigned long long seed, unsigned long long* counters, int* out) {
    sample(logits, vocab, temperature, top_k, top_p, min_p, uniforms, seed, counters, out);
}

// ------------------------------------------------------------------ repetition penalty

// grid (ceil(max_history / blockDim.x), rows); history: [rows, max_history] int32; history_length: [rows].
template <typename T>
__device__ __forceinline__ void repetition_penalty(T* logits, int vocab, const int* history, int max_history,
                                                   const int* history_length, float penalty, int* flags) {
    int row = blockIdx.y;
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= history_length[row] || j >= max_history) {
        return;
    }
    int token = history[(long)row * max_history + j];
    if (token < 0 || token >= vocab) {
        return;
    }
    // The first thread to flag a token applies the penalty; duplicates in the history apply it once.
    if (atomicCAS(&flags[(long)row * vocab + token], 0, 1) == 0) {
        T* logit = logits + (long)row * vocab + token;
        float value = to_float(*logit);
        *logit = from_float<T>(value > 0.0f ? value / penalty : value * penalty);
    }
}

extern "C" __global__ void repetition_penalty_f32(float* logits, int vocab, const int* history, int max_history, const int* history_length,
                                                  float penalty, int* flags) {
    repetition_penalty(logits, vocab, history, max_history, history_length, penalty, flags);
}
extern "C" __global__ void repetition_penalty_bf16(bf16_t* logits, int vocab, const int* history, int max_history, const int* history_length,
                                                   float penalty, int* flags) {
    repetition_penalty(logits, vocab, history, max_history, history_length, penalty, flags);
}

// Same grid; resets the flags the penalty set, so the scratch is zero again for the next step.
extern "C" __global__ void repetition_penalty_clear(int vocab, const int* history, int max_history, const int* history_length, int* flags) {
    int row = blockIdx.y;
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= history_length[row] || j >= max_history) {
        return;
    }
    int token = history[(long)row * max_history + j];
    if (token >= 0 && token < vocab) {
        atomicExch(&flags[(long)row * vocab + token], 0);  // duplicates clear the same flag: atomic, not a race
    }
}
