// kv_select.cu — TokenSelect: dynamic token-level KV-cache selection (docs/kv-select.md is the manual for the
// feature; this header is the manual for the kernels). The CPU twin is src/Runtime/KvSelect/KvSelector.cs.
//
// Formula. For sequence b with context n = contexts[b] (decode: the cache length including the new token;
// prefill: the chunk's start, i.e. the cached prefix) and query q (the mean over the `tokens` rows of q, in fp32):
//   candidates     c = n_init .. n - n_local - 1        (m = n - n_init - n_local of them)
//   score          s[h, c] = (q_h . k_{kv(h), c}) * scale      kv(h) = h / (heads / kv_heads) (GQA), scale = 1/sqrt(d)
//   per-head soft  p[h, c] = exp(s[h, c] - M_h) / S_h          M_h = max_c s[h, c], S_h = sum_c exp(s[h, c] - M_h)
//   soft vote      v[c] = sum_h p[h, c]
//   selection      the top_k candidates by v (ties: lower position first), plus 0 .. n_init - 1 and n - n_local .. n - 1,
//                  written ascending: indices[b] = [init | top_k middle, ascending | local], index_counts[b] = n_init + top_k + n_local.
//   No selection while n <= n_init + top_k + n_local: indices[b] = 0 .. n - 1 (full attention), index_counts[b] = n.
// Selection cache (per layer; the caller keeps one state / q_cached / indices set per layer): a step whose query has
// cos(q, q_cached) >= threshold reuses the cached middle part (only the init and local parts are rewritten, the local
// window moves with n); otherwise it selects anew and caches q. `use_cache` 0 always selects (prefill, threshold >= 1).
//
// Layouts (row-major; T = float / bf16_t / f16_t; fp32 accumulation everywhere):
//   q           [batch, tokens, heads, head_dim] T (after RoPE)
//   k_cache     [batch, kv_heads, capacity, head_dim] T (one layer's device KV cache, keys after RoPE)
//   contexts    [batch] int32
//   q_cached    [batch, heads * head_dim] f32
//   state       [batch, KV_SELECT_STATE] int32 (fields below), zeroed by the caller when the sequence starts
//   scores      [batch, heads, capacity] f32 (candidate c at column c - n_init: written once, read once)
//   partials    [batch, heads, max_tiles, 2] f32 (per score tile: max, sum of exp(s - max))
//   softmax     [batch, heads, 2] f32 (M_h, S_h)
//   votes       [batch, capacity] f32 (candidate c at c - n_init)
//   histogram   [batch, 256] int32 (zeroed by kv_select_begin and after every radix pass)
//   tile_counts [batch, count_tiles, 2] int32 (votes above and equal to the threshold per count tile)
//   indices     [batch, max_indices] int32, index_counts [batch] int32, max_indices >= n_init + top_k + n_local
//
// Launch order (one stream; every kernel but the first reads `state` and does nothing when the step does not select):
//   kv_select_begin_<T>         grid (batch), 256 threads: mean q, cosine test, state, zero the histogram
//   kv_select_score_<T>         grid (tile blocks, kv_heads, batch), 128 threads, grid-stride over tiles of KV_SELECT_TILE
//                               candidates (the launcher caps the blocks at 8 per SM): scores of a tile for
//                               every query head of one KV head (each key row is read once per GQA group): a warp reads
//                               32 / R rows per step with 16-byte loads (R = lanes per row, the row's 16-byte vectors
//                               rounded up to a power of two; the lane's vector is loaded once), each lane dots it with every head's query
//                               (shared memory, f32), R-lane shuffle sums; the tile's scores are staged in shared memory,
//                               written coalesced, and reduced to the per-head partial (max, sum exp)
//   kv_select_softmax           grid (heads, batch), 256 threads: merges the partials into (M_h, S_h)
//   kv_select_vote              grid (ceil(capacity / 256), batch), 256 threads: v[c], and the radix histogram of bits 31..24
//   kv_select_radix             grid (batch), 256 threads: picks the bin holding the k-th largest vote (pass 0..3)
//   kv_select_histogram         grid (ceil(capacity / 1024), batch), 256 threads: histogram of the next 8 bits (pass 1..3)
//   kv_select_count             grid (count_tiles, batch), 256 threads: votes above / equal to the k-th per 1024 candidates
//   kv_select_emit              grid (count_tiles, batch), 256 threads: writes the selected positions, ascending
//   kv_select_frame             grid (batch), 256 threads: the init and local parts and the count (every step)
// Votes are sums of probabilities: non-negative floats, whose bit patterns order like the values, so the top-k is a
// 4-pass radix select on the bits (exact, with the tie rule), then a stable compaction.
#include "common.cuh"

#define KV_SELECT_TILE 128          // candidates per score block
#define KV_SELECT_SCORE_THREADS 128 // 4 warps
#define KV_SELECT_THREADS 256       // every other kernel
#define KV_SELECT_BINS 256
#define KV_SELECT_COUNT_TILE 1024   // candidates per count / emit block: 4 per thread

// state fields
#define KV_SELECT_VALID 0           // q_cached holds the query of a real selection whose middle part is in indices
#define KV_SELECT_HIT 1             // this step reuses the cached selection
#define KV_SELECT_ACTIVE 2          // this step selects (context long enough, no hit)
#define KV_SELECT_PREFIX 3          // radix select: the high bits of the k-th largest vote found so far
#define KV_SELECT_REMAINING 4       // radix select: how many of the top_k are still to be found under the prefix
#define KV_SELECT_HITS 5            // count of cache hits since the state was zeroed
#define KV_SELECT_SELECTIONS 6      // count of selections since the state was zeroed
#define KV_SELECT_STATE 8

__device__ __forceinline__ float kv_select_negative_infinity() { return -__int_as_float(0x7f800000); }

// ------------------------------------------------------------------ begin: mean query, selection cache, state

template <typename T>
__device__ __forceinline__ void kv_select_begin(const T* __restrict__ q, const int* __restrict__ contexts, float* __restrict__ q_cached,
                                                int* __restrict__ state, int* __restrict__ histogram, int tokens, int width, int n_init,
                                                int top_k, int n_local, float threshold, int use_cache) {
    __shared__ float scratch[32];
    const int b = blockIdx.x;
    const int n = contexts[b];
    int* s = state + (long)b * KV_SELECT_STATE;
    const bool long_enough = n > n_init + top_k + n_local;
    const bool valid = s[KV_SELECT_VALID] != 0;
    float dot = 0.0f, norm_q = 0.0f, norm_c = 0.0f;
    const float inverse_tokens = 1.0f / (float)tokens;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float sum = 0.0f;
        for (int t = 0; t < tokens; t++) {
            sum += to_float(q[((long)b * tokens + t) * width + i]);
        }
        float mean = sum * inverse_tokens;
        float cached = valid ? q_cached[(long)b * width + i] : 0.0f;
        dot += mean * cached;
        norm_q += mean * mean;
        norm_c += cached * cached;
    }
    dot = block_reduce_sum(dot, scratch);
    norm_q = block_reduce_sum(norm_q, scratch);
    norm_c = block_reduce_sum(norm_c, scratch);
    // cos >= threshold without a division: dot >= threshold * |q| |c| (and dot > 0 when threshold > 0).
    bool hit = use_cache != 0 && long_enough && valid && norm_q > 0.0f && norm_c > 0.0f
        && dot >= threshold * sqrtf(norm_q) * sqrtf(norm_c);
    bool active = long_enough && !hit;
    if (active) {
        for (int i = threadIdx.x; i < width; i += blockDim.x) {
            float sum = 0.0f;
            for (int t = 0; t < tokens; t++) {
                sum += to_float(q[((long)b * tokens + t) * width + i]);
            }
            q_cached[(long)b * width + i] = sum * inverse_tokens;
        }
    }
    histogram[(long)b * KV_SELECT_BINS + threadIdx.x] = 0;   // blockDim.x == KV_SELECT_BINS
    __syncthreads();                                        // every thread has read VALID before thread 0 rewrites it
    if (threadIdx.x == 0) {
        s[KV_SELECT_VALID] = active ? 1 : (hit ? 1 : 0);
        s[KV_SELECT_HIT] = hit ? 1 : 0;
        s[KV_SELECT_ACTIVE] = active ? 1 : 0;
        s[KV_SELECT_PREFIX] = 0;
        s[KV_SELECT_REMAINING] = top_k;
        s[KV_SELECT_HITS] += hit ? 1 : 0;
        s[KV_SELECT_SELECTIONS] += active ? 1 : 0;
    }
}

extern "C" __global__ __launch_bounds__(256) void kv_select_begin_f32(const float* q, const int* contexts, float* q_cached, int* state,
    int* histogram, int tokens, int width, int n_init, int top_k, int n_local, float threshold, int use_cache) {
    kv_select_begin(q, contexts, q_cached, state, histogram, tokens, width, n_init, top_k, n_local, threshold, use_cache);
}

extern "C" __global__ __launch_bounds__(256) void kv_select_begin_bf16(const bf16_t* q, const int* contexts, float* q_cached, int* state,
    int* histogram, int tokens, int width, int n_init, int top_k, int n_local, float threshold, int use_cache) {
    kv_select_begin(q, contexts, q_cached, state, histogram, tokens, width, n_init, top_k, n_local, threshold, use_cache);
}

extern "C" __global__ __launch_bounds__(256) void kv_select_begin_f16(const f16_t* q, const int* contexts, float* q_cached, int* state,
    int* histogram, int tokens, int width, int n_init, int top_k, int n_local, float threshold, int use_cache) {
    kv_select_begin(q, contexts, q_cached, state, histogram, tokens, width, n_init, top_k, n_local, threshold, use_cache);
}

// ------------------------------------------------------------------ score: per-head Q.K over one tile of candidates

// 16 bytes of T widened to f32 (4 floats, or 8 bf16 / f16).
__device__ __forceinline__ void kv_select_widen16(const float* p, float* out) {
    float4 raw = *reinterpret_cast<const float4*>(p);
    out[0] = raw.x; out[1] = raw.y; out[2] = raw.z; out[3] = raw.w;
}
__device__ __forceinline__ void kv_select_widen16(const bf16_t* p, float* out) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    unsigned int words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = __uint_as_float(words[i] << 16);
        out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void kv_select_widen16(const f16_t* p, float* out) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    unsigned int words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f16_t low, high;
        low.bits = (unsigned short)(words[i] & 0xffffu);
        high.bits = (unsigned short)(words[i] >> 16);
        out[2 * i] = f16_to_float(low);
        out[2 * i + 1] = f16_to_float(high);
    }
}

template <typename T>
__device__ __forceinline__ void kv_select_score(const T* __restrict__ q, const T* __restrict__ k_cache, const int* __restrict__ contexts,
                                                const int* __restrict__ state, float* __restrict__ scores, float* __restrict__ partials,
                                                int tokens, int heads, int kv_heads, int head_dim, int capacity, int n_init, int n_local,
                                                int max_tiles, float scale) {
    constexpr int VEC = 16 / (int)sizeof(T);
    const int b = blockIdx.z;
    const int kv = blockIdx.y;
    const int n = contexts[b];
    const int candidates = n - n_init - n_local;
    if (state[(long)b * KV_SELECT_STATE + KV_SELECT_ACTIVE] == 0 || (int)blockIdx.x * KV_SELECT_TILE >= candidates) {
        return;                                                  // uniform over the block
    }
    const int group = heads / kv_heads;
    KLM_DYNAMIC_SHARED(float, shared);
    float* q_s = shared;                                         // [group, head_dim] mean query, f32
    float* s_s = shared + group * head_dim;                      // [group, KV_SELECT_TILE] scores
    const float inverse_tokens = 1.0f / (float)tokens;
    for (int i = threadIdx.x; i < group * head_dim; i += blockDim.x) {
        int h = kv * group + i / head_dim;
        int d = i % head_dim;
        float sum = 0.0f;
        for (int t = 0; t < tokens; t++) {
            sum += to_float(q[(((long)b * tokens + t) * heads + h) * head_dim + d]);
        }
        q_s[i] = sum * inverse_tokens;
    }
    __syncthreads();

    const int lane = threadIdx.x % KLM_WARP_SIZE;
    const int warp = threadIdx.x / KLM_WARP_SIZE;
    const int warps = blockDim.x / KLM_WARP_SIZE;
    const int vectors = head_dim / VEC;                          // 16-byte vectors per key row
    int lanes_per_row = 1;
    while (lanes_per_row < vectors && lanes_per_row < KLM_WARP_SIZE) {
        lanes_per_row <<= 1;
    }
    const int rows_per_warp = KLM_WARP_SIZE / lanes_per_row;
    const int sub = lane % lanes_per_row;
    const bool single = vectors <= lanes_per_row;                // one vector per lane: all but f32 at head_dim > 128
    // Grid-stride over the tiles (the launcher caps the grid near a few waves), so that a step that does not select
    // costs one short wave of blocks that exit at once.
    for (int tile = blockIdx.x; tile * KV_SELECT_TILE < candidates; tile += gridDim.x) {   // uniform over the block
        const int first = tile * KV_SELECT_TILE;                 // candidate index of the tile's first row
        const int rows = min(KV_SELECT_TILE, candidates - first);
        const T* keys = k_cache + (((long)b * kv_heads + kv) * capacity + n_init + first) * head_dim;
        for (int base = warp * rows_per_warp; base < rows; base += warps * rows_per_warp) {   // uniform per warp
            const int row = base + lane / lanes_per_row;
            const bool valid = row < rows;
            const bool owns = valid && sub < vectors;
            float k_own[VEC];
            if (single && owns) {
                kv_select_widen16(keys + (long)row * head_dim + sub * VEC, k_own);   // the lane's key vector, loaded once
            }
            for (int g = 0; g < group; g++) {
                float dot = 0.0f;
                if (single) {
                    if (owns) {
                        const float* qg = q_s + g * head_dim + sub * VEC;
#pragma unroll
                        for (int e = 0; e < VEC; e++) {
                            dot += k_own[e] * qg[e];
                        }
                    }
                } else if (valid) {
                    for (int v = sub; v < vectors; v += lanes_per_row) {
                        float k[VEC];
                        kv_select_widen16(keys + (long)row * head_dim + v * VEC, k);
                        const float* qg = q_s + g * head_dim + v * VEC;
#pragma unroll
                        for (int e = 0; e < VEC; e++) {
                            dot += k[e] * qg[e];
                        }
                    }
                }
                for (int offset = lanes_per_row / 2; offset > 0; offset >>= 1) {
                    dot += __shfl_xor_sync(KLM_FULL_MASK, dot, offset);
                }
                if (valid && sub == 0) {
                    s_s[g * KV_SELECT_TILE + row] = dot * scale;
                }
            }
        }
        __syncthreads();

        // Coalesced writes of the tile's scores, and per head the tile's max and sum of exp(s - max).
        for (int i = threadIdx.x; i < group * KV_SELECT_TILE; i += blockDim.x) {
            int g = i / KV_SELECT_TILE, r = i % KV_SELECT_TILE;
            if (r < rows) {
                scores[((long)b * heads + kv * group + g) * capacity + first + r] = s_s[i];
            }
        }
        for (int g = warp; g < group; g += warps) {
            float m = kv_select_negative_infinity();
            for (int r = lane; r < rows; r += KLM_WARP_SIZE) {
                m = fmaxf(m, s_s[g * KV_SELECT_TILE + r]);
            }
            m = warp_reduce_max(m);
            float sum = 0.0f;
            for (int r = lane; r < rows; r += KLM_WARP_SIZE) {
                sum += expf(s_s[g * KV_SELECT_TILE + r] - m);
            }
            sum = warp_reduce_sum(sum);
            if (lane == 0) {
                float* partial = partials + (((long)b * heads + kv * group + g) * max_tiles + tile) * 2;
                partial[0] = m;
                partial[1] = sum;
            }
        }
        __syncthreads();                                         // the next tile rewrites s_s
    }
}

extern "C" __global__ __launch_bounds__(128) void kv_select_score_f32(const float* q, const float* k_cache, const int* contexts,
    const int* state, float* scores, float* partials, int tokens, int heads, int kv_heads, int head_dim, int capacity, int n_init,
    int n_local, int max_tiles, float scale) {
    kv_select_score(q, k_cache, contexts, state, scores, partials, tokens, heads, kv_heads, head_dim, capacity, n_init, n_local, max_tiles, scale);
}

extern "C" __global__ __launch_bounds__(128) void kv_select_score_bf16(const bf16_t* q, const bf16_t* k_cache, const int* contexts,
    const int* state, float* scores, float* partials, int tokens, int heads, int kv_heads, int head_dim, int capacity, int n_init,
    int n_local, int max_tiles, float scale) {
    kv_select_score(q, k_cache, contexts, state, scores, partials, tokens, heads, kv_heads, head_dim, capacity, n_init, n_local, max_tiles, scale);
}

extern "C" __global__ __launch_bounds__(128) void kv_select_score_f16(const f16_t* q, const f16_t* k_cache, const int* contexts,
    const int* state, float* scores, float* partials, int tokens, int heads, int kv_heads, int head_dim, int capacity, int n_init,
    int n_local, int max_tiles, float scale) {
    kv_select_score(q, k_cache, contexts, state, scores, partials, tokens, heads, kv_heads, head_dim, capacity, n_init, n_local, max_tiles, scale);
}

// ------------------------------------------------------------------ softmax: merge the tiles' partials per head

extern "C" __global__ __launch_bounds__(256) void kv_select_softmax(const int* contexts, const int* state, const float* partials,
                                                                     float* softmax, int heads, int n_init, int n_local, int max_tiles) {
    __shared__ float scratch[32];
    const int h = blockIdx.x;
    const int b = blockIdx.y;
    if (state[(long)b * KV_SELECT_STATE + KV_SELECT_ACTIVE] == 0) {
        return;
    }
    const int candidates = contexts[b] - n_init - n_local;
    const int tiles = (candidates + KV_SELECT_TILE - 1) / KV_SELECT_TILE;
    const float* partial = partials + ((long)b * heads + h) * max_tiles * 2;
    float m = kv_select_negative_infinity();
    for (int t = threadIdx.x; t < tiles; t += blockDim.x) {
        m = fmaxf(m, partial[2 * t]);
    }
    m = block_reduce_max(m, scratch);
    float sum = 0.0f;
    for (int t = threadIdx.x; t < tiles; t += blockDim.x) {
        sum += partial[2 * t + 1] * expf(partial[2 * t] - m);
    }
    sum = block_reduce_sum(sum, scratch);
    if (threadIdx.x == 0) {
        softmax[((long)b * heads + h) * 2] = m;
        softmax[((long)b * heads + h) * 2 + 1] = sum;
    }
}

// ------------------------------------------------------------------ vote: sum of the per-head distributions

extern "C" __global__ __launch_bounds__(256) void kv_select_vote(const int* contexts, const int* state, const float* scores, const float* softmax,
                                                                  float* votes, int* histogram, int heads, int capacity, int n_init, int n_local) {
    __shared__ int bins[KV_SELECT_BINS];
    const int b = blockIdx.y;
    const int candidates = contexts[b] - n_init - n_local;
    if (state[(long)b * KV_SELECT_STATE + KV_SELECT_ACTIVE] == 0 || (int)blockIdx.x * (int)blockDim.x >= candidates) {
        return;
    }
    bins[threadIdx.x] = 0;
    __syncthreads();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < candidates) {
        float vote = 0.0f;
        for (int h = 0; h < heads; h++) {
            float m = softmax[((long)b * heads + h) * 2];
            float inverse = 1.0f / softmax[((long)b * heads + h) * 2 + 1];
            vote += expf(scores[((long)b * heads + h) * capacity + c] - m) * inverse;
        }
        votes[(long)b * capacity + c] = vote;
        atomicAdd(&bins[__float_as_uint(vote) >> 24], 1);
    }
    __syncthreads();
    if (bins[threadIdx.x] != 0) {
        atomicAdd(&histogram[(long)b * KV_SELECT_BINS + threadIdx.x], bins[threadIdx.x]);
    }
}

// ------------------------------------------------------------------ radix select over the votes' bits

// Pass p (0..3) looks at bits 31 - 8p .. 24 - 8p: walks the bins from the top until the remaining count is reached.
extern "C" __global__ __launch_bounds__(256) void kv_select_radix(int* state, int* histogram, int pass) {
    __shared__ int bins[KV_SELECT_BINS];
    const int b = blockIdx.x;
    int* s = state + (long)b * KV_SELECT_STATE;
    if (s[KV_SELECT_ACTIVE] == 0) {
        return;
    }
    bins[threadIdx.x] = histogram[(long)b * KV_SELECT_BINS + threadIdx.x];
    histogram[(long)b * KV_SELECT_BINS + threadIdx.x] = 0;      // ready for the next pass
    __syncthreads();
    if (threadIdx.x == 0) {
        int remaining = s[KV_SELECT_REMAINING];
        int bin = KV_SELECT_BINS - 1;
        while (bin > 0 && bins[bin] < remaining) {
            remaining -= bins[bin];
            bin--;
        }
        s[KV_SELECT_REMAINING] = remaining;
        s[KV_SELECT_PREFIX] = (int)((unsigned int)s[KV_SELECT_PREFIX] | ((unsigned int)bin << (24 - 8 * pass)));
    }
}

extern "C" __global__ __launch_bounds__(256) void kv_select_histogram(const int* contexts, const int* state, const float* votes, int* histogram,
                                                                       int capacity, int n_init, int n_local, int pass) {
    __shared__ int bins[KV_SELECT_BINS];
    const int b = blockIdx.y;
    const int candidates = contexts[b] - n_init - n_local;
    const int* s = state + (long)b * KV_SELECT_STATE;
    if (s[KV_SELECT_ACTIVE] == 0 || (int)blockIdx.x * KV_SELECT_COUNT_TILE >= candidates) {
        return;
    }
    const unsigned int prefix = (unsigned int)s[KV_SELECT_PREFIX];
    const int shift = 24 - 8 * pass;
    const unsigned int high_mask = 0xffffffffu << (shift + 8);
    bins[threadIdx.x] = 0;
    __syncthreads();
    const int end = min(candidates, ((int)blockIdx.x + 1) * KV_SELECT_COUNT_TILE);
    for (int c = blockIdx.x * KV_SELECT_COUNT_TILE + threadIdx.x; c < end; c += blockDim.x) {
        unsigned int bits = __float_as_uint(votes[(long)b * capacity + c]);
        if ((bits & high_mask) == prefix) {
            atomicAdd(&bins[(bits >> shift) & 0xffu], 1);
        }
    }
    __syncthreads();
    if (bins[threadIdx.x] != 0) {
        atomicAdd(&histogram[(long)b * KV_SELECT_BINS + threadIdx.x], bins[threadIdx.x]);
    }
}

// ------------------------------------------------------------------ compaction: the selected positions, ascending

extern "C" __global__ __launch_bounds__(256) void kv_select_count(const int* contexts, const int* state, const float* votes, int* tile_counts,
                                                                   int capacity, int n_init, int n_local, int count_tiles) {
    __shared__ int scratch[32];
    const int b = blockIdx.y;
    const int candidates = contexts[b] - n_init - n_local;
    const int* s = state + (long)b * KV_SELECT_STATE;
    if (s[KV_SELECT_ACTIVE] == 0 || (int)blockIdx.x * KV_SELECT_COUNT_TILE >= candidates) {
        return;
    }
    const unsigned int threshold = (unsigned int)s[KV_SELECT_PREFIX];
    const int end = min(candidates, ((int)blockIdx.x + 1) * KV_SELECT_COUNT_TILE);
    int above = 0, equal = 0;
    for (int c = blockIdx.x * KV_SELECT_COUNT_TILE + threadIdx.x; c < end; c += blockDim.x) {
        unsigned int bits = __float_as_uint(votes[(long)b * capacity + c]);
        above += bits > threshold ? 1 : 0;
        equal += bits == threshold ? 1 : 0;
    }
    above = block_reduce_sum(above, scratch);
    equal = block_reduce_sum(equal, scratch);
    if (threadIdx.x == 0) {
        tile_counts[((long)b * count_tiles + blockIdx.x) * 2] = above;
        tile_counts[((long)b * count_tiles + blockIdx.x) * 2 + 1] = equal;
    }
}

// Exclusive prefix sum over the block (blockDim.x a multiple of 32, at most 1024); scratch: 32 ints. Ends with a barrier.
__device__ __forceinline__ int kv_select_exclusive_scan(int value, int* scratch, int* total) {
    const int lane = threadIdx.x % KLM_WARP_SIZE;
    const int warp = threadIdx.x / KLM_WARP_SIZE;
    const int warps = blockDim.x / KLM_WARP_SIZE;
    int inclusive = value;
    for (int offset = 1; offset < KLM_WARP_SIZE; offset <<= 1) {
        int other = __shfl_up_sync(KLM_FULL_MASK, inclusive, offset);
        if (lane >= offset) {
            inclusive += other;
        }
    }
    if (lane == KLM_WARP_SIZE - 1) {
        scratch[warp] = inclusive;
    }
    __syncthreads();
    int warp_offset = 0, sum = 0;
    for (int w = 0; w < warps; w++) {
        int t = scratch[w];
        warp_offset += w < warp ? t : 0;
        sum += t;
    }
    __syncthreads();
    *total = sum;
    return warp_offset + inclusive - value;
}

extern "C" __global__ __launch_bounds__(256) void kv_select_emit(const int* contexts, const int* state, const float* votes, const int* tile_counts,
                                                                  int* indices, int capacity, int n_init, int n_local, int count_tiles,
                                                                  int max_indices) {
    __shared__ int scratch[32];
    const int b = blockIdx.y;
    const int candidates = contexts[b] - n_init - n_local;
    const int* s = state + (long)b * KV_SELECT_STATE;
    if (s[KV_SELECT_ACTIVE] == 0 || (int)blockIdx.x * KV_SELECT_COUNT_TILE >= candidates) {
        return;
    }
    const unsigned int threshold = (unsigned int)s[KV_SELECT_PREFIX];
    const int needed_equal = s[KV_SELECT_REMAINING];            // equal votes taken, lowest positions first
    int above_before = 0, equal_before = 0;
    for (int t = threadIdx.x; t < (int)blockIdx.x; t += blockDim.x) {
        above_before += tile_counts[((long)b * count_tiles + t) * 2];
        equal_before += tile_counts[((long)b * count_tiles + t) * 2 + 1];
    }
    above_before = block_reduce_sum(above_before, scratch);
    equal_before = block_reduce_sum(equal_before, scratch);

    // Thread i owns 4 consecutive candidates, so the scan keeps positions in order.
    const int per_thread = KV_SELECT_COUNT_TILE / KV_SELECT_THREADS;
    const int first = blockIdx.x * KV_SELECT_COUNT_TILE + threadIdx.x * per_thread;
    unsigned int bits[KV_SELECT_COUNT_TILE / KV_SELECT_THREADS];
    int above = 0, equal = 0;
    for (int i = 0; i < per_thread; i++) {
        int c = first + i;
        bits[i] = c < candidates ? __float_as_uint(votes[(long)b * capacity + c]) : 0u;
        bool in_range = c < candidates;
        above += in_range && bits[i] > threshold ? 1 : 0;
        equal += in_range && bits[i] == threshold ? 1 : 0;
    }
    int total;
    int above_rank = above_before + kv_select_exclusive_scan(above, scratch, &total);
    int equal_rank = equal_before + kv_select_exclusive_scan(equal, scratch, &total);
    int* out = indices + (long)b * max_indices + n_init;
    for (int i = 0; i < per_thread; i++) {
        int c = first + i;
        if (c >= candidates) {
            break;
        }
        bool is_above = bits[i] > threshold;
        bool is_equal = bits[i] == threshold;
        if (is_above || (is_equal && equal_rank < needed_equal)) {
            out[above_rank + min(equal_rank, needed_equal)] = n_init + c;
        }
        above_rank += is_above ? 1 : 0;
        equal_rank += is_equal ? 1 : 0;
    }
}

// ------------------------------------------------------------------ frame: init and local parts, count

extern "C" __global__ __launch_bounds__(256) void kv_select_frame(const int* contexts, int* indices, int* index_counts, int n_init, int top_k,
                                                                   int n_local, int max_indices) {
    const int b = blockIdx.x;
    const int n = contexts[b];
    int* out = indices + (long)b * max_indices;
    if (n <= n_init + top_k + n_local) {
        for (int i = threadIdx.x; i < n && i < max_indices; i += blockDim.x) {
            out[i] = i;
        }
        if (threadIdx.x == 0) {
            index_counts[b] = max(0, min(n, max_indices));
        }
        return;
    }
    for (int i = threadIdx.x; i < n_init; i += blockDim.x) {
        out[i] = i;
    }
    for (int i = threadIdx.x; i < n_local; i += blockDim.x) {
        out[n_init + top_k + i] = n - n_local + i;
    }
    if (threadIdx.x == 0) {
        index_counts[b] = n_init + top_k + n_local;
    }
}
