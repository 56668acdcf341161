// attention.cu — the attention family over the device KV cache: append with RoPE, flash-decoding, and a
// FlashAttention-2-style prefill. docs/conventions.md ("Device KV cache", "Attention", "Attention hook") is the
// contract; this header is the manual.
//
// Formula. Query head h of sequence b at position p reads KV head kv = h / (heads / kv_heads) (GQA):
//   s_j = (q . k_j) * scale + bias[b, h, j]          scale = 1 / sqrt(head_dim) (passed in); bias optional
//   out = sum_j softmax(s)_j v_j                      over the visible keys j, fp32 online softmax
//   visible: j <= p (causal), p - window < j when window > 0 (Mistral), and with an index list only the
//   selected positions (below). A key whose score is -inf (bias) is masked. A query that sees no key at all
//   (everything masked, or an empty selection) gets a row of zeros instead of NaN.
//
// Layouts (row-major; T = float / bf16_t / f16_t, the same for q, k, v, the caches and the output):
//   k_cache, v_cache  [batch, kv_heads, capacity, head_dim] T   one layer's device KV cache, keys after RoPE
//   kv_append         k, v [batch, tokens, kv_heads, head_dim] T (k before RoPE); starts [batch] int32: the
//                     position of each sequence's first new token; inv_freq [head_dim / 2] f32
//   decode            q [batch, heads, head_dim] T (after RoPE); lengths [batch] int32: valid positions
//                     including the new token, so the query is at p = lengths[b] - 1; output like q;
//                     workspace (more than one split) f32: [batch, heads, splits, 2] (running max, sum) followed
//                     by [batch, heads, splits, head_dim] (unnormalised accumulators)
//   prefill           q, output [batch, tokens, heads, head_dim] T; starts [batch] int32: query t of sequence b
//                     is at position starts[b] + t, and the chunk's own keys/values are already appended
//
// The hook (null pointers = off; both attention kernels):
//   bias          [batch, heads, capacity] f32, added to the scaled score of (head, key position); -inf masks.
//   indices       [batch, max_indices] int32, index_counts [batch] int32: per sequence the first index_counts[b]
//                 entries are ascending cache positions, shared by every head (TokenSelect).
//                 decode: attends only to the listed positions (listing the newest one is the caller's job).
//                 prefill: attends to the listed positions below starts[b] (the cached prefix) plus the chunk's
//                 own positions, causally. Listed positions at or after the query are ignored in both.
//                 The sliding window still applies to listed positions.
//   rope_inv_freq [head_dim / 2] f32: compacted RoPE (TokenSelect's compacted position mode). The cache then holds
//                 keys before RoPE and q comes unrotated; each K row used is rotated by its slot index (the index of
//                 its position in the list, or the position itself without a list; prefill: the listed prefix is
//                 slots 0..m-1 and chunk token t is slot m + t) and each query by its own slot (decode: the last slot,
//                 i.e. the count of listed positions up to and including the query's, minus one; prefill: m + t), with
//                 rope.cu's rotate-half and fp32 angle (slot x inv_freq[i], sincosf), in fp32 inside the kernel.
//                 Without a list (full attention) slots are positions, so it equals standard RoPE up to rounding.
//                 Null: keys and queries are used as given (bit for bit the kernel without the argument).
//
// Requirements checked by the op entries (src/Runtime/Cuda/Ops/Attention.cs): head_dim a multiple of 8 and at
// most 256 (every row is whole 16-byte vectors in every dtype), heads a multiple of kv_heads. Values on the
// device (lengths, starts, indices) cannot be checked there; the kernels never read or write outside the
// cache for bad ones (positions outside [0, capacity) are skipped) but the result is then meaningless.
//
// kv_append_<T>: grid (tokens, kv_heads, batch), block head_dim / 2 rounded up to 32. Thread i rotates the pair
//   (i, i + head_dim/2) of one key (angle = position x inv_freq[i] in fp32, sincosf, as rope.cu) and copies the
//   same two elements of the value.
//
// attention_decode_<T>[_hd64|_hd128] + attention_decode_merge_<T> (flash-decoding):
//   grid (kv_heads x head_blocks, splits, batch). A block serves heads_per_block query heads of one KV head
//   (the whole GQA group when it has at most 8 heads, 4 in the any-head_dim variant, else the group in equal
//   parts), so each K/V row is read once per group. The visible keys of a sequence (its "slots": positions, or entries of the index
//   list) are cut into `splits` contiguous ranges of slots_per_split; the last split takes whatever remains,
//   so a small host-side bound only costs balance, never keys.
//   Inside a block each warp takes tiles of 32 slots in turn (no block barrier in the loop):
//     1. coalesced 16-byte loads of the tile's 32 K and V rows into the warp's shared memory;
//     2. lane j scores key j against every head of the block (q lives in shared memory as f32, read as
//        broadcast float4; the lane's K row is read from shared memory 16 bytes at a time and widened);
//     3. per head, the tile's max by warp shuffles; online softmax update (running max m, per-lane partial
//        sum l, accumulator rescale); the probabilities go to shared memory;
//     4. lane j owns head_dim/32 output dimensions (contiguous in the fast paths, strided otherwise) and
//        accumulates p x v over the tile's 32 rows for every head.
//   At the end the warps' states are merged through shared memory; with one split the block writes the
//   normalised output, otherwise (max, sum, accumulator) go to the workspace and attention_decode_merge_<T>
//   (grid (heads, batch), one thread per dimension) combines the splits:
//     M = max_s m_s;  out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
//   Shared memory (dynamic): heads_per_block x head_dim f32 for q, then per warp K and V tiles of
//   32 x (head_dim + 16 B of padding) T, 32 x heads_per_block f32 probabilities and 32 int32 positions.
//   The padding makes lane j's row reads (16 B at a row stride of 16 mod 32 bytes) free of bank conflicts.
//   Registers: per lane heads_per_block x (head_dim / 32) accumulators (8 x 2 or 8 x 4 in the head_dim 64 / 128
//   variants, 4 x 8 in the any-head_dim one) plus m, l and a score per head; no spills (artifacts/ptxas-report.txt).
//   Compacted RoPE: q is rotated in shared memory after it is staged; in step 2 a lane rotates its K row pair by pair
//   (one sincosf per pair and key) while it scores, instead of the 16-byte vector path.
//   Block: as many warps (up to 4) as fit in 100 KB of shared memory: 4 for 16-bit types up to head_dim 128,
//   2 for f32 at 128 or 16-bit types at 256, 1 for f32 at 256 (the launcher's arithmetic, Ops/Attention.cs).
//
// attention_prefill_<T>[_hd64|_hd128] (FlashAttention-2 with FMAs):
//   GQA heads are packed into the query rows: row r of KV head kv is (token r / group, head kv*group + r % group),
//   so a K/V tile serves all the heads of the group. grid (ceil(tokens x group / BLOCK_M), kv_heads, batch),
//   block 128 threads = 4 warps x 8 row groups of 4 lanes; each row group owns ROWS query rows (2 in the
//   fast paths, BLOCK_M = 64; 1 otherwise, BLOCK_M = 32). The key slots of a block (the selected prefix
//   positions then the chunk's, or simply 0..; clipped to the block's causal and window range) are walked in
//   tiles of 32:
//     1. the block stages the K and V tiles in shared memory as f32 (16-byte loads, widened once);
//        (compacted RoPE: the Q rows once after staging and each staged K row, in shared memory, behind a barrier)
//     2. lane (row group, sub) computes S for its rows and the 8 key columns sub + 4j (q rows and K rows
//        from shared memory as float4), applies scale, bias and the masks;
//     3. row max over the 4 lanes of the group (2 shuffles), online softmax update, P to shared memory;
//     4. O += P V: the lane owns the float4 chunks 16k + 4 sub of each of its rows (head_dim / 4 accumulators
//        per row). Every tile's score matrix lives only in registers and a 32-column shared strip.
//   Shared memory (dynamic): (BLOCK_M + 64) x (head_dim + 4) f32 for Q, K, V, BLOCK_M x 36 f32 for P and 32
//   int32 positions: 76 KB at head_dim 128, 43 KB at 64, 104 KB at 256. Registers: per lane ROWS x 8 scores and
//   ROWS x head_dim / 4 accumulators (64 at head_dim 128; 64 at most in the any-head_dim variant); no spills.
//   A tensor-core version would keep Q in registers as mma fragments, stage K/V as T with cp.async double
//   buffering, compute S = Q K^T and O += P V with mma.sync (bf16/f16 inputs, f32 accumulators, P converted to
//   T in registers), and do the row max/sum on the accumulator fragments' 4-lane quads, as here.
//
// Accumulation: fp32 everywhere (dot products, softmax with max subtraction, P V, the split merge); expf is the
// accurate one (no fast math). Results differ from the CPU in rounding only (docs/emulator.md for the emulator).
#include "common.cuh"

#define ATTENTION_MAX_HEAD_DIM 256
#define DECODE_TILE 32        // slots per warp tile: one per lane
#define DECODE_MAX_HEADS 8    // query heads per decode block (head_dim 64 / 128 variants)
#define DECODE_MAX_HEADS_GENERIC 4  // ... and in the any-head_dim variant, whose lanes hold up to 8 dimensions
#define PREFILL_WARPS 4
#define PREFILL_TILE 32       // key slots per prefill tile

__device__ __forceinline__ float negative_infinity() { return -__int_as_float(0x7f800000); }

// ------------------------------------------------------------------ vector loads

// One 32-bit word of T values widened to f32 (1 float, or 2 bf16 / f16).
__device__ __forceinline__ void widen_word(unsigned int word, float* out, float) { out[0] = __uint_as_float(word); }
__device__ __forceinline__ void widen_word(unsigned int word, float* out, bf16_t) {
    out[0] = __uint_as_float(word << 16);
    out[1] = __uint_as_float(word & 0xffff0000u);
}
__device__ __forceinline__ void widen_word(unsigned int word, float* out, f16_t) {
    f16_t low, high;
    low.bits = (unsigned short)(word & 0xffffu);
    high.bits = (unsigned short)(word >> 16);
    out[0] = f16_to_float(low);
    out[1] = f16_to_float(high);
}

// N consecutive T values at p (aligned to their total size: 16, 8 or 4 bytes) as one vector load, widened.
template <typename T, int N>
__device__ __forceinline__ void load_widen(const T* p, float* out) {
    constexpr int bytes = N * (int)sizeof(T);
    constexpr int per_word = 4 / (int)sizeof(T);
    if constexpr (bytes == 16) {
        uint4 raw = *reinterpret_cast<const uint4*>(p);
        widen_word(raw.x, out, T());
        widen_word(raw.y, out + per_word, T());
        widen_word(raw.z, out + 2 * per_word, T());
        widen_word(raw.w, out + 3 * per_word, T());
    } else if constexpr (bytes == 8) {
        uint2 raw = *reinterpret_cast<const uint2*>(p);
        widen_word(raw.x, out, T());
        widen_word(raw.y, out + per_word, T());
    } else if constexpr (bytes == 4) {
        widen_word(*reinterpret_cast<const unsigned int*>(p), out, T());
    } else {
        for (int i = 0; i < N; i++) {
            out[i] = to_float(p[i]);
        }
    }
}

__device__ __forceinline__ float4 load_float4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ void store_float4(float* p, float4 value) { *reinterpret_cast<float4*>(p) = value; }

// First index i in [0, n) with list[i] >= value, or n (list ascending).
__device__ __forceinline__ int lower_bound(const int* __restrict__ list, int n, int value) {
    int low = 0, high = n;
    while (low < high) {
        int middle = (low + high) >> 1;
        if (list[middle] < value) {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    return low;
}

// Compacted RoPE of one pair (i, i + half) of an f32 row in shared memory: rotate-half with angle = position x
// inv_freq[i] in fp32 and sincosf, as rope.cu and kv_append.
__device__ __forceinline__ void rope_pair(float* row, int half, int i, int position, const float* __restrict__ inv_freq) {
    float sine, cosine;
    sincosf((float)position * inv_freq[i], &sine, &cosine);
    float x = row[i];
    float y = row[i + half];
    row[i] = x * cosine - y * sine;
    row[i + half] = y * cosine + x * sine;
}

// ------------------------------------------------------------------ kv_append

template <typename T>
__device__ __forceinline__ void kv_append(const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ starts,
                                          const float* __restrict__ inv_freq, T* __restrict__ k_cache, T* __restrict__ v_cache,
                                          int tokens, int kv_heads, int head_dim, int capacity) {
    int half = head_dim / 2;
    int i = threadIdx.x;
    int token = blockIdx.x;
    int head = blockIdx.y;
    int b = blockIdx.z;
    int position = starts[b] + token;
    if (i >= half || position < 0 || position >= capacity) {
        return;
    }
    long source = (((long)b * tokens + token) * kv_heads + head) * head_dim;
    long destination = (((long)b * kv_heads + head) * capacity + position) * head_dim;
    float angle = (float)position * inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    float x = to_float(k[source + i]);
    float y = to_float(k[source + i + half]);
    k_cache[destination + i] = from_float<T>(x * c - y * s);
    k_cache[destination + i + half] = from_float<T>(y * c + x * s);
    v_cache[destination + i] = v[source + i];
    v_cache[destination + i + half] = v[source + i + half];
}

extern "C" __global__ void kv_append_f32(const float* k, const float* v, const int* starts, const float* inv_freq,
                                         float* k_cache, float* v_cache, int tokens, int kv_heads, int head_dim, int capacity) {
    kv_append(k, v, starts, inv_freq, k_cache, v_cache, tokens, kv_heads, head_dim, capacity);
}

extern "C" __global__ void kv_append_bf16(const bf16_t* k, const bf16_t* v, const int* starts, const float* inv_freq,
                                          bf16_t* k_cache, bf16_t* v_cache, int tokens, int kv_heads, int head_dim, int capacity) {
    kv_append(k, v, starts, inv_freq, k_cache, v_cache, tokens, kv_heads, head_dim, capacity);
}

extern "C" __global__ void kv_append_f16(const f16_t* k, const f16_t* v, const int* starts, const float* inv_freq,
                                         f16_t* k_cache, f16_t* v_cache, int tokens, int kv_heads, int head_dim, int capacity) {
    kv_append(k, v, starts, inv_freq, k_cache, v_cache, tokens, kv_heads, head_dim, capacity);
}

// ------------------------------------------------------------------ decode: one split of one head block

template <typename T, int HEAD_DIM>
__device__ __forceinline__ void attention_decode_split(
    const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache, const int* __restrict__ lengths,
    const float* __restrict__ bias, const int* __restrict__ indices, const int* __restrict__ index_counts,
    const float* __restrict__ rope_inv_freq, float* __restrict__ workspace, T* __restrict__ output, int heads, int kv_heads,
    int runtime_head_dim, int capacity, int window, int max_indices, int slots_per_split, float scale) {
    constexpr int VEC = 16 / (int)sizeof(T);                                   // T values per 16-byte load
    constexpr int MAX_DIM = HEAD_DIM ? HEAD_DIM : ATTENTION_MAX_HEAD_DIM;
    constexpr int DIMS = MAX_DIM / 32;                                        // output dimensions per lane
    constexpr int MAX_HEADS = HEAD_DIM ? DECODE_MAX_HEADS : DECODE_MAX_HEADS_GENERIC;  // accumulators: MAX_HEADS x DIMS
    const int head_dim = HEAD_DIM ? HEAD_DIM : runtime_head_dim;
    const int group = heads / kv_heads;
    const int head_blocks = (group + MAX_HEADS - 1) / MAX_HEADS;
    const int heads_per_block = (group + head_blocks - 1) / head_blocks;     // the launcher sizes shared memory with it
    const int kv = blockIdx.x / head_blocks;
    const int first_head = kv * group + (blockIdx.x % head_blocks) * heads_per_block;
    const int head_count = min(heads_per_block, kv * group + group - first_head);
    const int split = blockIdx.y;
    const int splits = gridDim.y;
    const int b = blockIdx.z;
    const int lane = threadIdx.x % KLM_WARP_SIZE;
    const int warp = threadIdx.x / KLM_WARP_SIZE;
    const int warps = blockDim.x / KLM_WARP_SIZE;

    // The sequence's slots: positions lowest..position, or the list entries inside that range.
    const int position = lengths[b] - 1;
    const int lowest = window > 0 ? max(0, position - window + 1) : 0;
    const int* list = indices != nullptr ? indices + (long)b * max_indices : nullptr;
    int slot_begin = 0, slot_end = 0;
    if (position >= 0) {
        if (list != nullptr) {
            slot_end = lower_bound(list, max(0, min(index_counts[b], max_indices)), position + 1);
            slot_begin = lower_bound(list, slot_end, lowest);
        } else {
            slot_begin = lowest;
            slot_end = min(position + 1, capacity);
        }
    }
    const int begin = slot_begin + split * slots_per_split;
    const int end = split == splits - 1 ? slot_end : min(begin + slots_per_split, slot_end);

    KLM_DYNAMIC_SHARED(unsigned char, shared);
    const int pitch = head_dim + VEC;                                         // + 16 bytes per row
    const long warp_bytes = 2L * DECODE_TILE * pitch * sizeof(T) + (long)heads_per_block * DECODE_TILE * 4 + DECODE_TILE * 4;
    float* q_s = reinterpret_cast<float*>(shared);                            // [heads_per_block][head_dim]
    T* k_s = reinterpret_cast<T*>(shared + (long)heads_per_block * head_dim * 4 + warp * warp_bytes);  // [32][pitch]
    T* v_s = k_s + DECODE_TILE * pitch;                                       // [32][pitch]
    float* p_s = reinterpret_cast<float*>(v_s + DECODE_TILE * pitch);        // [heads_per_block][32]
    int* position_s = reinterpret_cast<int*>(p_s + heads_per_block * DECODE_TILE);  // [32]

    const T* q_rows = q + ((long)b * heads + first_head) * head_dim;
    for (int i = threadIdx.x; i < head_count * head_dim; i += blockDim.x) {
        q_s[i] = to_float(q_rows[i]);
    }
    __syncthreads();
    if (rope_inv_freq != nullptr) {
        // Compacted RoPE: the query sits at the last slot (its own position, which the list must hold).
        const int half = head_dim / 2;
        for (int i = threadIdx.x; i < head_count * half; i += blockDim.x) {
            rope_pair(q_s + (i / half) * head_dim, half, i % half, slot_end - 1, rope_inv_freq);
        }
        __syncthreads();
    }

    const long cache_base = ((long)b * kv_heads + kv) * capacity * head_dim;
    const T* k_rows = k_cache + cache_base;
    const T* v_rows = v_cache + cache_base;
    const float* bias_rows = bias != nullptr ? bias + ((long)b * heads + first_head) * capacity : nullptr;

    float m[MAX_HEADS], l[MAX_HEADS], acc[MAX_HEADS][DIMS];
#pragma unroll
    for (int g = 0; g < MAX_HEADS; g++) {
        m[g] = negative_infinity();
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < DIMS; e++) {
            acc[g][e] = 0.0f;
        }
    }

    for (int tile = begin + warp * DECODE_TILE; tile < end; tile += warps * DECODE_TILE) {
        // 1. Which position each lane's slot is (-1: none or not visible), then the tile's rows.
        int slot = tile + lane;
        int key = -1;
        if (slot < end) {
            key = list != nullptr ? list[slot] : slot;
            if (key < lowest || key > position || key >= capacity) {
                key = -1;
            }
        }
        position_s[lane] = key;
        __syncwarp();
        const int vectors = head_dim / VEC;
        for (int i = lane; i < DECODE_TILE * vectors; i += KLM_WARP_SIZE) {
            int row = i / vectors;
            int column = (i % vectors) * VEC;
            int row_key = position_s[row];
            if (row_key >= 0) {
                *reinterpret_cast<uint4*>(k_s + row * pitch + column) =
                    *reinterpret_cast<const uint4*>(k_rows + (long)row_key * head_dim + column);
                *reinterpret_cast<uint4*>(v_s + row * pitch + column) =
                    *reinterpret_cast<const uint4*>(v_rows + (long)row_key * head_dim + column);
            }
        }
        __syncwarp();

        // 2. Lane j scores key j for every head of the block.
        float score[MAX_HEADS];
#pragma unroll
        for (int g = 0; g < MAX_HEADS; g++) {
            score[g] = 0.0f;
        }
        if (key >= 0 && rope_inv_freq != nullptr) {
            // Compacted RoPE: the lane's K row rotated by its slot index in fp32, pair (d, d + head_dim / 2) at a time.
            const T* k_row = k_s + lane * pitch;
            const int half = head_dim / 2;
            for (int d = 0; d < half; d++) {
                float sine, cosine;
                sincosf((float)slot * rope_inv_freq[d], &sine, &cosine);
                float x = to_float(k_row[d]);
                float y = to_float(k_row[d + half]);
                float rotated_x = x * cosine - y * sine;
                float rotated_y = y * cosine + x * sine;
#pragma unroll
                for (int g = 0; g < MAX_HEADS; g++) {
                    if (g < head_count) {
                        score[g] += q_s[g * head_dim + d] * rotated_x + q_s[g * head_dim + d + half] * rotated_y;
                    }
                }
            }
        } else if (key >= 0) {
            const T* k_row = k_s + lane * pitch;
#pragma unroll 4
            for (int d = 0; d < head_dim; d += VEC) {
                float k_values[VEC];
                load_widen<T, VEC>(k_row + d, k_values);
#pragma unroll
                for (int g = 0; g < MAX_HEADS; g++) {
                    if (g < head_count) {
#pragma unroll
                        for (int e = 0; e < VEC; e += 4) {
                            float4 qv = load_float4(q_s + g * head_dim + d + e);
                            score[g] += qv.x * k_values[e] + qv.y * k_values[e + 1] + qv.z * k_values[e + 2] + qv.w * k_values[e + 3];
                        }
                    }
                }
            }
        }

        // 3. Online softmax per head: the tile's max across the warp, rescale, probabilities to shared memory.
#pragma unroll
        for (int g = 0; g < MAX_HEADS; g++) {
            if (g < head_count) {
                float s = negative_infinity();
                if (key >= 0) {
                    s = score[g] * scale + (bias_rows != nullptr ? bias_rows[(long)g * capacity + key] : 0.0f);
                }
                float m_new = fmaxf(m[g], warp_reduce_max(s));
                float m_use = m_new == negative_infinity() ? 0.0f : m_new;   // nothing visible yet: keep zeros
                float correction = expf(m[g] - m_use);
                float p = expf(s - m_use);
                m[g] = m_new;
                l[g] = l[g] * correction + p;
#pragma unroll
                for (int e = 0; e < DIMS; e++) {
                    acc[g][e] *= correction;
                }
                p_s[g * DECODE_TILE + lane] = p;
            }
        }
        __syncwarp();

        // 4. acc += p v over the tile's rows; lane owns DIMS dimensions of every head.
#pragma unroll 2
        for (int row = 0; row < DECODE_TILE; row++) {
            if (position_s[row] < 0) {
                continue;                                                     // warp-uniform
            }
            float values[DIMS];
            if constexpr (HEAD_DIM != 0) {
                load_widen<T, DIMS>(v_s + row * pitch + lane * DIMS, values);
            } else {
#pragma unroll
                for (int e = 0; e < DIMS; e++) {
                    int d = lane + e * KLM_WARP_SIZE;
                    values[e] = d < head_dim ? to_float(v_s[row * pitch + d]) : 0.0f;
                }
            }
#pragma unroll
            for (int g = 0; g < MAX_HEADS; g++) {
                if (g < head_count) {
                    float p = p_s[g * DECODE_TILE + row];
#pragma unroll
                    for (int e = 0; e < DIMS; e++) {
                        acc[g][e] += p * values[e];
                    }
                }
            }
        }
        __syncwarp();
    }

    // Merge the warps' states (shared memory of the tiles is reused), then write the output or the split's partial.
    __syncthreads();
    float* m_s = reinterpret_cast<float*>(shared);                           // [warps][heads_per_block]
    float* l_s = m_s + warps * heads_per_block;                               // [warps][heads_per_block]
    float* acc_s = l_s + warps * heads_per_block;                             // [warps][heads_per_block][head_dim]
#pragma unroll
    for (int g = 0; g < MAX_HEADS; g++) {
        if (g < head_count) {
            float sum = warp_reduce_sum(l[g]);
            if (lane == 0) {
                m_s[warp * heads_per_block + g] = m[g];
                l_s[warp * heads_per_block + g] = sum;
            }
            float* row = acc_s + ((long)warp * heads_per_block + g) * head_dim;
#pragma unroll
            for (int e = 0; e < DIMS; e++) {
                int d = HEAD_DIM != 0 ? lane * DIMS + e : lane + e * KLM_WARP_SIZE;
                if (d < head_dim) {
                    row[d] = acc[g][e];
                }
            }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < head_count * head_dim; i += blockDim.x) {
        int g = i / head_dim;
        int d = i % head_dim;
        float block_max = negative_infinity();
        for (int w = 0; w < warps; w++) {
            block_max = fmaxf(block_max, m_s[w * heads_per_block + g]);
        }
        float sum = 0.0f, value = 0.0f;
        if (block_max != negative_infinity()) {
            for (int w = 0; w < warps; w++) {
                float weight = expf(m_s[w * heads_per_block + g] - block_max);
                sum += weight * l_s[w * heads_per_block + g];
                value += weight * acc_s[((long)w * heads_per_block + g) * head_dim + d];
            }
        }
        long row = (long)b * heads + first_head + g;
        if (output != nullptr) {
            output[row * head_dim + d] = from_float<T>(sum > 0.0f ? value / sum : 0.0f);
        } else {
            long batch = gridDim.z;
            workspace[batch * heads * splits * 2 + (row * splits + split) * head_dim + d] = value;
            if (d == 0) {
                workspace[(row * splits + split) * 2] = block_max;
                workspace[(row * splits + split) * 2 + 1] = sum;
            }
        }
    }
}


// ------------------------------------------------------------------ decode: merge of the splits

template <typename T>
__device__ __forceinline__ void attention_decode_merge(const float* __restrict__ workspace, T* __restrict__ output, int heads,
                                                       int head_dim, int splits) {
    const long row = (long)blockIdx.y * heads + blockIdx.x;
    const long batch = gridDim.y;
    const float* state = workspace + row * splits * 2;
    const float* partial = workspace + batch * heads * splits * 2 + row * splits * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float global_max = negative_infinity();
        for (int s = 0; s < splits; s++) {
            global_max = fmaxf(global_max, state[2 * s]);
        }
        float sum = 0.0f, value = 0.0f;
        if (global_max != negative_infinity()) {
            for (int s = 0; s < splits; s++) {
                float weight = expf(state[2 * s] - global_max);
                sum += weight * state[2 * s + 1];
                value += weight * partial[(long)s * head_dim + d];
            }
        }
        output[row * head_dim + d] = from_float<T>(sum > 0.0f ? value / sum : 0.0f);
    }
}

// ------------------------------------------------------------------ prefill

template <typename T, int HEAD_DIM>
__device__ __forceinline__ void attention_prefill(
    const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache, const int* __restrict__ starts,
    const float* __restrict__ bias, const int* __restrict__ indices, const int* __restrict__ index_counts,
    const float* __restrict__ rope_inv_freq, T* __restrict__ output, int tokens, int heads, int kv_heads, int runtime_head_dim,
    int capacity, int window, int max_indices, float scale) {
    constexpr int VEC = 16 / (int)sizeof(T);
    constexpr int ROWS = HEAD_DIM ? 2 : 1;                                    // query rows per lane
    constexpr int BLOCK_M = PREFILL_WARPS * 8 * ROWS;                         // query rows per block
    constexpr int MAX_DIM = HEAD_DIM ? HEAD_DIM : ATTENTION_MAX_HEAD_DIM;
    constexpr int CHUNKS = MAX_DIM / 16;                                      // float4 output chunks per lane and row
    constexpr int COLUMNS = PREFILL_TILE / 4;                                 // key columns per lane: sub + 4 j
    const int head_dim = HEAD_DIM ? HEAD_DIM : runtime_head_dim;
    const int group = heads / kv_heads;
    const int rows_total = tokens * group;
    const int first_row = blockIdx.x * BLOCK_M;
    const int kv = blockIdx.y;
    const int b = blockIdx.z;
    const int lane = threadIdx.x % KLM_WARP_SIZE;
    const int warp = threadIdx.x / KLM_WARP_SIZE;
    const int sub = lane % 4;
    const int row_group = lane / 4;
    const int start = starts[b];

    KLM_DYNAMIC_SHARED(float, shared);
    const int pitch = head_dim + 4;
    const int p_pitch = PREFILL_TILE + 4;
    float* q_s = shared;                                                      // [BLOCK_M][pitch]
    float* k_s = q_s + BLOCK_M * pitch;                                       // [PREFILL_TILE][pitch]
    float* v_s = k_s + PREFILL_TILE * pitch;                                  // [PREFILL_TILE][pitch]
    float* p_s = v_s + PREFILL_TILE * pitch;                                  // [BLOCK_M][p_pitch]
    int* position_s = reinterpret_cast<int*>(p_s + BLOCK_M * p_pitch);        // [PREFILL_TILE]

    // Key slots: the selected prefix positions (all of 0..start-1 without a list), then the chunk's positions.
    const int* list = indices != nullptr ? indices + (long)b * max_indices : nullptr;
    const int prefix = list != nullptr ? lower_bound(list, max(0, min(index_counts[b], max_indices)), start) : start;
    const int last_token = (min(first_row + BLOCK_M, rows_total) - 1) / group;  // the grid gives every block a row
    const int first_token = first_row / group;
    const int slot_end = prefix + last_token + 1;
    int slot_begin = 0;
    if (window > 0) {
        int lowest = start + first_token - window + 1;                        // lowest position any row here sees
        if (lowest >= start) {
            slot_begin = prefix + (lowest - start);
        } else if (lowest > 0) {
            slot_begin = list != nullptr ? lower_bound(list, prefix, lowest) : lowest;
        }
    }

    // The lane's query rows.
    int local_row[ROWS], head[ROWS], query_position[ROWS];
    bool valid[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; i++) {
        local_row[i] = warp * 8 * ROWS + i * 8 + row_group;
        int r = first_row + local_row[i];
        valid[i] = r < rows_total;
        head[i] = kv * group + r % group;
        query_position[i] = start + r / group;
    }

    // Q tile as f32.
    const int vectors = head_dim / VEC;
    for (int i = threadIdx.x; i < BLOCK_M * vectors; i += blockDim.x) {
        int r = i / vectors;
        int column = (i % vectors) * VEC;
        int row = first_row + r;
        float values[VEC];
        if (row < rows_total) {
            int token = row / group;
            int h = kv * group + row % group;
            load_widen<T, VEC>(q + (((long)b * tokens + token) * heads + h) * head_dim + column, values);
        } else {
#pragma unroll
            for (int e = 0; e < VEC; e++) {
                values[e] = 0.0f;
            }
        }
#pragma unroll
        for (int e = 0; e < VEC; e += 4) {
            store_float4(q_s + r * pitch + column + e, make_float4(values[e], values[e + 1], values[e + 2], values[e + 3]));
        }
    }
    if (rope_inv_freq != nullptr) {
        // Compacted RoPE: row r is token (first_row + r) / group of the chunk, at slot prefix + token (the rows past
        // the chunk are zeros and stay zeros). The tile loop's first barrier publishes the rotated rows.
        __syncthreads();
        const int half = head_dim / 2;
        for (int i = threadIdx.x; i < BLOCK_M * half; i += blockDim.x) {
            int r = i / half;
            rope_pair(q_s + r * pitch, half, i % half, prefix + (first_row + r) / group, rope_inv_freq);
        }
    }

    const long cache_base = ((long)b * kv_heads + kv) * capacity * head_dim;
    const T* k_rows = k_cache + cache_base;
    const T* v_rows = v_cache + cache_base;

    float m[ROWS], l[ROWS], acc[ROWS][CHUNKS * 4];
#pragma unroll
    for (int i = 0; i < ROWS; i++) {
        m[i] = negative_infinity();
        l[i] = 0.0f;
#pragma unroll
        for (int e = 0; e < CHUNKS * 4; e++) {
            acc[i][e] = 0.0f;
        }
    }

    for (int tile = slot_begin; tile < slot_end; tile += PREFILL_TILE) {
        // 1. Stage the tile's K and V rows as f32 (zeros for slots past the end or outside the cache).
        for (int i = threadIdx.x; i < PREFILL_TILE * vectors; i += blockDim.x) {
            int r = i / vectors;
            int column = (i % vectors) * VEC;
            int slot = tile + r;
            int key = -1;
            if (slot < slot_end) {
                key = slot < prefix ? (list != nullptr ? list[slot] : slot) : start + (slot - prefix);
                if (key < 0 || key >= capacity) {
                    key = -1;
                }
            }
            float k_values[VEC], v_values[VEC];
            if (key >= 0) {
                load_widen<T, VEC>(k_rows + (long)key * head_dim + column, k_values);
                load_widen<T, VEC>(v_rows + (long)key * head_dim + column, v_values);
            } else {
#pragma unroll
                for (int e = 0; e < VEC; e++) {
                    k_values[e] = 0.0f;
                    v_values[e] = 0.0f;
                }
            }
#pragma unroll
            for (int e = 0; e < VEC; e += 4) {
                store_float4(k_s + r * pitch + column + e, make_float4(k_values[e], k_values[e + 1], k_values[e + 2], k_values[e + 3]));
                store_float4(v_s + r * pitch + column + e, make_float4(v_values[e], v_values[e + 1], v_values[e + 2], v_values[e + 3]));
            }
            if (column == 0) {
                position_s[r] = key;
            }
        }
        __syncthreads();
        if (rope_inv_freq != nullptr) {
            // Compacted RoPE: each staged K row rotated by its slot index (prefix slots 0..prefix-1, the chunk's after).
            const int half = head_dim / 2;
            for (int i = threadIdx.x; i < PREFILL_TILE * half; i += blockDim.x) {
                int r = i / half;
                rope_pair(k_s + r * pitch, half, i % half, tile + r, rope_inv_freq);
            }
            __syncthreads();
        }

        // 2. S = Q K^T for the lane's rows and columns sub + 4 j, then scale, bias and masks.
        float s[ROWS][COLUMNS];
#pragma unroll
        for (int i = 0; i < ROWS; i++) {
#pragma unroll
            for (int j = 0; j < COLUMNS; j++) {
                s[i][j] = 0.0f;
            }
        }
#pragma unroll 2
        for (int d = 0; d < head_dim; d += 4) {
            float4 qv[ROWS];
#pragma unroll
            for (int i = 0; i < ROWS; i++) {
                qv[i] = load_float4(q_s + local_row[i] * pitch + d);
            }
#pragma unroll
            for (int j = 0; j < COLUMNS; j++) {
                float4 kv4 = load_float4(k_s + (sub + 4 * j) * pitch + d);
#pragma unroll
                for (int i = 0; i < ROWS; i++) {
                    s[i][j] += qv[i].x * kv4.x + qv[i].y * kv4.y + qv[i].z * kv4.z + qv[i].w * kv4.w;
                }
            }
        }
#pragma unroll
        for (int i = 0; i < ROWS; i++) {
            float row_max = negative_infinity();
#pragma unroll
            for (int j = 0; j < COLUMNS; j++) {
                int key = position_s[sub + 4 * j];
                bool visible = valid[i] && key >= 0 && key <= query_position[i] && (window <= 0 || key > query_position[i] - window);
                float score = negative_infinity();
                if (visible) {
                    score = s[i][j] * scale + (bias != nullptr ? bias[((long)b * heads + head[i]) * capacity + key] : 0.0f);
                }
                s[i][j] = score;
                row_max = fmaxf(row_max, score);
            }
            // 3. Online softmax: the row's max over its 4 lanes, rescale, P to shared memory.
            row_max = fmaxf(row_max, __shfl_xor_sync(KLM_FULL_MASK, row_max, 1));
            row_max = fmaxf(row_max, __shfl_xor_sync(KLM_FULL_MASK, row_max, 2));
            float m_new = fmaxf(m[i], row_max);
            float m_use = m_new == negative_infinity() ? 0.0f : m_new;
            float correction = expf(m[i] - m_use);
            m[i] = m_new;
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < COLUMNS; j++) {
                float p = expf(s[i][j] - m_use);
                sum += p;
                p_s[local_row[i] * p_pitch + sub + 4 * j] = p;
            }
            l[i] = l[i] * correction + sum;
#pragma unroll
            for (int e = 0; e < CHUNKS * 4; e++) {
                acc[i][e] *= correction;
            }
        }
        __syncwarp();

        // 4. O += P V: the lane's float4 chunks 16 k + 4 sub of its rows.
#pragma unroll 1
        for (int c = 0; c < PREFILL_TILE; c += 4) {
            float4 p4[ROWS];
#pragma unroll
            for (int i = 0; i < ROWS; i++) {
                p4[i] = load_float4(p_s + local_row[i] * p_pitch + c);
            }
#pragma unroll
            for (int cc = 0; cc < 4; cc++) {
                const float* v_row = v_s + (c + cc) * pitch + 4 * sub;
#pragma unroll
                for (int k = 0; k < CHUNKS; k++) {
                    if (16 * k + 4 * sub < head_dim) {
                        float4 v4 = load_float4(v_row + 16 * k);
#pragma unroll
                        for (int i = 0; i < ROWS; i++) {
                            float p = cc == 0 ? p4[i].x : cc == 1 ? p4[i].y : cc == 2 ? p4[i].z : p4[i].w;
                            acc[i][4 * k] += p * v4.x;
                            acc[i][4 * k + 1] += p * v4.y;
                            acc[i][4 * k + 2] += p * v4.z;
                            acc[i][4 * k + 3] += p * v4.w;
                        }
                    }
                }
            }
        }
        __syncthreads();                                                      // the next tile overwrites K, V, positions
    }

    // Normalise by the row sum (over the row's 4 lanes) and write.
#pragma unroll
    for (int i = 0; i < ROWS; i++) {
        float sum = l[i];
        sum += __shfl_xor_sync(KLM_FULL_MASK, sum, 1);
        sum += __shfl_xor_sync(KLM_FULL_MASK, sum, 2);
        if (valid[i]) {
            float inverse = sum > 0.0f ? 1.0f / sum : 0.0f;
            int token = query_position[i] - start;
            T* out = output + (((long)b * tokens + token) * heads + head[i]) * head_dim + 4 * sub;
#pragma unroll
            for (int k = 0; k < CHUNKS; k++) {
                if (16 * k + 4 * sub < head_dim) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        out[16 * k + e] = from_float<T>(acc[i][4 * k + e] * inverse);
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ entry points

extern "C" __global__ __launch_bounds__(128, 2) void attention_decode_f32(
    const float* q, const float* k_cache, const float* v_cache, const int* lengths, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, float* workspace, float* output, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, int slots_per_split, float scale) {
    attention_decode_split<float, 0>(q, k_cache, v_cache, lengths, bias, indices, index_counts, rope_inv_freq, workspace, output, heads,
        kv_heads, head_dim, capacity, window, max_indices, slots_per_split, scale);
}

extern "C" __global__ __launch_bounds__(128, 2) void attention_decode_f32_hd64(
    const float* q, const float* k_cache, const float* v_cache, const int* lengths, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, float* workspace, float* output, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, int slots_per_split, float scale) {
    attention_decode_split<float, 64>(q, k_cache, v_cache, lengths, bias, indices, index_counts, rope_inv_freq, workspace, output, heads,
        kv_heads, head_dim, capacity, window, max_indices, slots_per_split, scale);
}

extern "C" __global__ __launch_bounds__(128, 2) void attention_decode_f32_hd128(
    const float* q, const float* k_cache, const float* v_cache, const int* lengths, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, float* workspace, float* output, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, int slots_per_split, float scale) {
    attention_decode_split<float, 128>(q, k_cache, v_cache, lengths, bias, indices, index_counts, rope_inv_freq, workspace, output, heads,
        kv_heads, head_dim, capacity, window, max_indices, slots_per_split, scale);
}

extern "C" __global__ void attention_decode_merge_f32(const float* workspace, float* output, int heads, int head_dim, int splits) {
    attention_decode_merge(workspace, output, heads, head_dim, splits);
}

extern "C" __global__ __launch_bounds__(128, 2) void attention_prefill_f32(
    const float* q, const float* k_cache, const float* v_cache, const int* starts, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, float* output, int tokens, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, float scale) {
    attention_prefill<float, 0>(q, k_cache, v_cache, starts, bias, indices, index_counts, rope_inv_freq, output, tokens, heads, kv_heads,
        head_dim, capacity, window, max_indices, scale);
}

extern "C" __global__ __launch_bounds__(128, 2) void attention_prefill_f32_hd64(
    const float* q, const float* k_cache, const float* v_cache, const int* starts, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, float* output, int tokens, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, float scale) {
    attention_prefill<float, 64>(q, k_cache, v_cache, starts, bias, indices, index_counts, rope_inv_freq, output, tokens, heads, kv_heads,
        head_dim, capacity, window, max_indices, scale);
}

extern "C" __global__ __launch_bounds__(128, 2) void attention_prefill_f32_hd128(
    const float* q, const float* k_cache, const float* v_cache, const int* starts, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, float* output, int tokens, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, float scale) {
    attention_prefill<float, 128>(q, k_cache, v_cache, starts, bias, indices, index_counts, rope_inv_freq, output, tokens, heads, kv_heads,
        head_dim, capacity, window, max_indices, scale);
}

extern "C" __global__ __launch_bounds__(128, 2) void attention_decode_bf16(
    const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache, const int* lengths, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, float* workspace, bf16_t* output, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, int slots_per_split, float scale) {
    attention_decode_split<bf16_t, 0>(q, k_cache, v_cache, lengths, bias, indices, index_counts, rope_inv_freq, workspace, output, heads,
        kv_heads, head_dim, capacity, window, max_indices, slots_per_split, scale);
}

extern "C" __global__ __launch_bounds__(128, 2) void attention_decode_bf16_hd64(
    const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache, const int* lengths, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, float* workspace, bf16_t* output, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, int slots_per_split, float scale) {
    attention_decode_split<bf16_t, 64>(q, k_cache, v_cache, lengths, bias, indices, index_counts, rope_inv_freq, workspace, output, heads,
        kv_heads, head_dim, capacity, window, max_indices, slots_per_split, scale);
}

extern "C" __global__ __launch_bounds__(128, 2) void attention_decode_bf16_hd128(
    const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache, const int* lengths, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, float* workspace, bf16_t* output, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, int slots_per_split, float scale) {
    attention_decode_split<bf16_t, 128>(q, k_cache, v_cache, lengths, bias, indices, index_counts, rope_inv_freq, workspace, output, heads,
        kv_heads, head_dim, capacity, window, max_indices, slots_per_split, scale);
}

extern "C" __global__ void attention_decode_merge_bf16(const float* workspace, bf16_t* output, int heads, int head_dim, int splits) {
    attention_decode_merge(workspace, output, heads, head_dim, splits);
}

extern "C" __global__ __launch_bounds__(128, 2) void attention_prefill_bf16(
    const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache, const int* starts, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, bf16_t* output, int tokens, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, float scale) {
    attention_prefill<bf16_t, 0>(q, k_cache, v_cache, starts, bias, indices, index_counts, rope_inv_freq, output, tokens, heads, kv_heads,
        head_dim, capacity, window, max_indices, scale);
}

extern "C" __global__ __launch_bounds__(128, 2) void attention_prefill_bf16_hd64(
    const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache, const int* starts, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, bf16_t* output, int tokens, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, float scale) {
    attention_prefill<bf16_t, 64>(q, k_cache, v_cache, starts, bias, indices, index_counts, rope_inv_freq, output, tokens, heads, kv_heads,
        head_dim, capacity, window, max_indices, scale);
}

extern "C" __global__ __launch_bounds__(128, 2) void attention_prefill_bf16_hd128(
    const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache, const int* starts, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, bf16_t* output, int tokens, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, float scale) {
    attention_prefill<bf16_t, 128>(q, k_cache, v_cache, starts, bias, indices, index_counts, rope_inv_freq, output, tokens, heads, kv_heads,
        head_dim, capacity, window, max_indices, scale);
}

extern "C" __global__ __launch_bounds__(128, 2) void attention_decode_f16(
    const f16_t* q, const f16_t* k_cache, const f16_t* v_cache, const int* lengths, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, float* workspace, f16_t* output, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, int slots_per_split, float scale) {
    attention_decode_split<f16_t, 0>(q, k_cache, v_cache, lengths, bias, indices, index_counts, rope_inv_freq, workspace, output, heads,
        kv_heads, head_dim, capacity, window, max_indices, slots_per_split, scale);
}

extern "C" __global__ __launch_bounds__(128, 2) void attention_decode_f16_hd64(
    const f16_t* q, const f16_t* k_cache, const f16_t* v_cache, const int* lengths, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, float* workspace, f16_t* output, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, int slots_per_split, float scale) {
    attention_decode_split<f16_t, 64>(q, k_cache, v_cache, lengths, bias, indices, index_counts, rope_inv_freq, workspace, output, heads,
        kv_heads, head_dim, capacity, window, max_indices, slots_per_split, scale);
}

extern "C" __global__ __launch_bounds__(128, 2) void attention_decode_f16_hd128(
    const f16_t* q, const f16_t* k_cache, const f16_t* v_cache, const int* lengths, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, float* workspace, f16_t* output, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, int slots_per_split, float scale) {
    attention_decode_split<f16_t, 128>(q, k_cache, v_cache, lengths, bias, indices, index_counts, rope_inv_freq, workspace, output, heads,
        kv_heads, head_dim, capacity, window, max_indices, slots_per_split, scale);
}

extern "C" __global__ void attention_decode_merge_f16(const float* workspace, f16_t* output, int heads, int head_dim, int splits) {
    attention_decode_merge(workspace, output, heads, head_dim, splits);
}

extern "C" __global__ __launch_bounds__(128, 2) void attention_prefill_f16(
    const f16_t* q, const f16_t* k_cache, const f16_t* v_cache, const int* starts, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, f16_t* output, int tokens, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, float scale) {
    attention_prefill<f16_t, 0>(q, k_cache, v_cache, starts, bias, indices, index_counts, rope_inv_freq, output, tokens, heads, kv_heads,
        head_dim, capacity, window, max_indices, scale);
}

extern "C" __global__ __launch_bounds__(128, 2) void attention_prefill_f16_hd64(
    const f16_t* q, const f16_t* k_cache, const f16_t* v_cache, const int* starts, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, f16_t* output, int tokens, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, float scale) {
    attention_prefill<f16_t, 64>(q, k_cache, v_cache, starts, bias, indices, index_counts, rope_inv_freq, output, tokens, heads, kv_heads,
        head_dim, capacity, window, max_indices, scale);
}

extern "C" __global__ __launch_bounds__(128, 2) void attention_prefill_f16_hd128(
    const f16_t* q, const f16_t* k_cache, const f16_t* v_cache, const int* starts, const float* bias, const int* indices,
    const int* index_counts, const float* rope_inv_freq, f16_t* output, int tokens, int heads, int kv_heads, int head_dim, int capacity, int window,
    int max_indices, float scale) {
    attention_prefill<f16_t, 128>(q, k_cache, v_cache, starts, bias, indices, index_counts, rope_inv_freq, output, tokens, heads, kv_heads,
        head_dim, capacity, window, max_indices, scale);
}
