// vocab_stats.cu — the fused one-pass reduction over rows of vocabulary logits: the device twin of
// src/Runtime/Signals/VocabStats.cs (same fields, same layout, same NaN / +inf cases). Definitions and their
// precision: docs/token-signals.md.
//
// For a row x (V logits), an optional token t and an optional reference row y (q = softmax(y)):
//   m = max_i x_i,  S_k = sum_i exp(k (x_i - m)) (k = 1..4),  T = sum_i exp(x_i - m) (x_i - m)
//   MaxLogit = m,  LogSumExp L = m + log S1,  Entropy = max(0, log S1 - T / S1),  TokenLogProb = x_t - L
//   Margin = p(top 1) - p(top 2) (p(top 2) = 0 when the row has one finite entry)
//   Kurtosis = m4 / m2^2 - 3 from the raw moments M_k = V^(k-1) S_k / S1^k of q = V p (mean 1): m2 = M2 - 1,
//              m4 = M4 - 4 M3 + 6 M2 - 3; 0 when m2 <= VOCAB_STATS_UNIFORM_FLOOR (VocabStats.Kurtosis)
//   KlPq = C_p / S1 - L + L_q,  C_p = sum over x_i, y_i both finite of exp(x_i - m)(x_i - y_i);
//          +inf when some finite x_i has y_i = -inf.  KlQp likewise with x and y swapped (+inf: y_i finite, x_i = -inf)
//   TokenLogRatio = (x_t - L) - (y_t - L_q)
//   top-k: the k largest logits by decreasing value, ties to the lower id; -inf entries are never listed; unused
//   slots hold id -1 and log-prob -inf. A NaN or +inf logit (in x or y), no finite x, or (with y) no finite y:
//   every stat NaN, ids -1, log-probs NaN. No token: TokenLogProb and TokenLogRatio NaN; no reference: KlPq, KlQp
//   and TokenLogRatio NaN.
//
// Layouts: logits, reference: [rows, V] row-major T (f32 / bf16); reference may be null.
//          tokens: [rows] int32 or null; an id < 0 means "no token" for that row, an id >= V gives NaN token fields.
//          stats: [rows, 9] f32 in VocabStatsField order; top_ids: [rows, top_k] int32; top_log_probs: [rows, top_k] f32.
//          partials: [rows, splits] VocabStatsPartial (192 B), the caller's workspace (CudaOps.VocabStatsWorkspaceBytes).
//
// Launch: two kernels on one stream (CudaOps.VocabStatsLaunch computes splits and slice; top_k in 0..16).
//   1. vocab_stats_<dtype>: grid (rows * splits), block (256), 43 KB of static shared memory. Block b reads row
//      b / splits, elements [s * slice, min(V, (s + 1) * slice)) with s = b % splits, once, and writes one partial.
//      The split: slice ≈ 2048 elements (8 per thread: one 128-bit bf16 load, two f32 ones), so one decode row of
//      128256 / 151936 logits is read by 63 / 75 blocks at once, the whole row in flight (one block per SM cannot
//      pull a row from HBM fast enough). With many rows the splits shrink so that rows * splits stays near 1024 blocks
//      (about 8 per SM of a 132-SM H100/H200: enough loads in flight to cover memory latency; more splitting only adds
//      partials), down to one block per row from 1024 rows on. slice is a multiple of 8 elements, so every slice
//      starts at the row's alignment modulo 16 bytes. At most 128 splits per row (V > 256K gets longer slices).
//   2. vocab_stats_merge: grid (rows), block (128 >= splits). Merges the row's partials in fp64, writes the outputs.
//   A second launch rather than a last-block-done counter: no zeroed workspace to keep between calls and no
//   communication between blocks (so the emulator race-checks every access), for one more launch on the stream.
//   Registers (ptxas, NVRTC 11.8, sm_90): 78 (f32) / 80 (bf16) / 76 (merge), no spills: 3 blocks of 256 per SM.
//
// Algorithm of a block (both kernels share the merge code):
//   - each thread reads its entries of the slice: a scalar head up to the first 16-byte-aligned element (x and y must
//     be aligned alike, else the whole slice is read with scalar loads), 128-bit loads (4 f32 / 8 bf16; two per row
//     in flight per thread, widened when used), and a scalar tail. Per step it takes the max of what it loaded; when
//     that beats the running max m, the sums move to it (S_k *= r^k, T = r (T + (m_old - m) S1), C_p *= r,
//     r = exp(m_old - m)); then every entry adds its terms. -inf entries add 0 (their shift counts as 0, so
//     0 * -inf never makes a NaN). Accumulation is fp32 with expf (not __expf, whose error grows with |x - m|).
//   - each thread keeps its best keep = max(top_k, 2) entries (2 at least, for the margin) sorted in its own column
//     of the shared scratch; a register copy of the keep-th (value, id) filters the stream, so after a thread's first
//     entries nearly nothing reaches the insertion sort, and the list costs no registers during the scan.
//   - block merge: every thread stores its sums in shared memory (its list is already there), one barrier, then
//     warp 0 alone: each lane folds 8 (kernel 2: 4) threads' sums, rescaling the side with the smaller max, and a warp
//     tree (shuffles) finishes; the lists merge in keep rounds: each lane offers the best head of its 8 (4) lists,
//     a warp max (then a warp min over the ids of equal keys) picks the winner, whose owner advances. Lists hold order
//     keys (the fp32 bits made monotonic as an unsigned, -0 as +0), so a round is two redux.sync instructions.
//   Precision: a thread's fp32 sums carry (terms + ~5 per rescale) roundings, the block merge at most 52 more
//   (7 serial merges, each a sum and a rescale, then one rescale and a 5-level tree); kernel 2 adds nothing
//   measurable (fp64). CudaOps.VocabStatsLayout.SumLength derives the n of the tests' tolerances from the launch.
#include "common.cuh"

#define VOCAB_STATS_TOP_MAX 16              // = VocabStats.MaxTopK
#define VOCAB_STATS_BLOCK 256               // threads of vocab_stats_<dtype> (CudaOps.VocabStatsBlockSize)
#define VOCAB_STATS_MERGE_BLOCK 128         // threads of vocab_stats_merge = the most splits per row
#define VOCAB_STATS_UNIFORM_FLOOR 1e-6      // = VocabStats.UniformVarianceFloor
#define VOCAB_STATS_EMPTY 0x007fffffu       // order key of -inf: an empty list slot (its id is -1)

#define VOCAB_STATS_INVALID 1u              // a NaN or +inf logit in x or y
#define VOCAB_STATS_KL_PQ_INFINITE 2u       // some finite x_i has y_i = -inf
#define VOCAB_STATS_KL_QP_INFINITE 4u       // some finite y_i has x_i = -inf

// One block's reduction of one row slice. Sums are relative to the slice's own maxima.
struct VocabStatsPartial {
    float max_logit, s1, s2, s3, s4, t, cross;      // p side: m, S1..S4, T, C_p
    float reference_max, reference_s1, reference_cross;  // q side: m_q, S1_q, C_q (with a reference)
    float token_logit, token_reference;             // x_t, y_t: written only by the block whose slice holds t
    unsigned int flags, unused[3];                  // VOCAB_STATS_* bits
    unsigned int top_keys[VOCAB_STATS_TOP_MAX];     // the slice's best max(top_k, 2) entries, order keys, sorted
    int top_ids[VOCAB_STATS_TOP_MAX];
};
static_assert(sizeof(VocabStatsPartial) == 192, "CudaOps.VocabStatsPartialBytes");

// ------------------------------------------------------------------ order keys

// fp32 -> unsigned with the same order (negative values reversed); -0 maps to +0's key since they compare equal.
__device__ __forceinline__ unsigned int order_key(float value) {
    unsigned int bits = __float_as_uint(value);
    bits = bits == 0x80000000u ? 0u : bits;
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float key_value(unsigned int key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// ------------------------------------------------------------------ running sums (A = float per thread, double in the merge)

__device__ __forceinline__ float negative_infinity(float) { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ double negative_infinity(double) { return -__longlong_as_double(0x7ff0000000000000LL); }
__device__ __forceinline__ float exp_of(float value) { return expf(value); }
__device__ __forceinline__ double exp_of(double value) { return exp(value); }

template <typename A>
struct VocabMoments {
    A max_p, s1, s2, s3, s4, t, cross_p;   // relative to max_p
    A max_q, s1_q, cross_q;                // relative to max_q
    unsigned int flags;
};

template <typename A>
__device__ __forceinline__ void moments_clear(VocabMoments<A>& m) {
    m.max_p = negative_infinity(A());
    m.max_q = negative_infinity(A());
    m.s1 = m.s2 = m.s3 = m.s4 = m.t = m.cross_p = A(0);
    m.s1_q = m.cross_q = A(0);
    m.flags = 0;
}

// Moves the p sums to a max M >= max_p. A state with no finite entry (max_p = -inf) holds zeros and takes M as is.
template <typename A>
__device__ __forceinline__ void rescale_p(VocabMoments<A>& m, A new_max) {
    if (m.max_p == negative_infinity(A())) {
        m.max_p = new_max;
        return;
    }
    A shift = m.max_p - new_max;
    A r = exp_of(shift);
    A r2 = r * r;
    m.t = r * (m.t + shift * m.s1);
    m.s1 *= r;
    m.s2 *= r2;
    m.s3 *= r2 * r;
    m.s4 *= r2 * r2;
    m.cross_p *= r;
    m.max_p = new_max;
}

template <typename A>
__device__ __forceinline__ void rescale_q(VocabMoments<A>& m, A new_max) {
    if (m.max_q == negative_infinity(A())) {
        m.max_q = new_max;
        return;
    }
    A r = exp_of(m.max_q - new_max);
    m.s1_q *= r;
    m.cross_q *= r;
    m.max_q = new_max;
}

// a += b: the side with the smaller max is rescaled to the larger one (one exponential per side).
template <typename A>
__device__ __forceinline__ void moments_merge(VocabMoments<A>& a, VocabMoments<A> b) {
    if (b.max_p > a.max_p) {
        VocabMoments<A> larger = b;
        b.max_p = a.max_p; b.s1 = a.s1; b.s2 = a.s2; b.s3 = a.s3; b.s4 = a.s4; b.t = a.t; b.cross_p = a.cross_p;
        a.max_p = larger.max_p; a.s1 = larger.s1; a.s2 = larger.s2; a.s3 = larger.s3; a.s4 = larger.s4; a.t = larger.t;
        a.cross_p = larger.cross_p;
    }
    rescale_p(b, a.max_p);
    a.s1 += b.s1;
    a.s2 += b.s2;
    a.s3 += b.s3;
    a.s4 += b.s4;
    a.t += b.t;
    a.cross_p += b.cross_p;
    if (b.max_q > a.max_q) {
        A max_q = b.max_q, s1_q = b.s1_q, cross_q = b.cross_q;
        b.max_q = a.max_q; b.s1_q = a.s1_q; b.cross_q = a.cross_q;
        a.max_q = max_q; a.s1_q = s1_q; a.cross_q = cross_q;
    }
    rescale_q(b, a.max_q);
    a.s1_q += b.s1_q;
    a.cross_q += b.cross_q;
    a.flags |= b.flags;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A value) {
    for (int offset = KLM_WARP_SIZE / 2; offset > 0; offset >>= 1) {
        value += __shfl_xor_sync(KLM_FULL_MASK, value, offset);
    }
    return value;
}

template <typename A>
__device__ __forceinline__ A warp_max(A value) {
    for (int offset = KLM_WARP_SIZE / 2; offset > 0; offset >>= 1) {
        value = fmax(value, __shfl_xor_sync(KLM_FULL_MASK, value, offset));
    }
    return value;
}

// Every lane of the warp ends with the warp's merged state.
template <typename A>
__device__ __forceinline__ void moments_warp_reduce(VocabMoments<A>& m) {
    rescale_p(m, warp_max(m.max_p));
    rescale_q(m, warp_max(m.max_q));
    m.s1 = warp_sum(m.s1);
    m.s2 = warp_sum(m.s2);
    m.s3 = warp_sum(m.s3);
    m.s4 = warp_sum(m.s4);
    m.t = warp_sum(m.t);
    m.cross_p = warp_sum(m.cross_p);
    m.s1_q = warp_sum(m.s1_q);
    m.cross_q = warp_sum(m.cross_q);
    m.flags = warp_reduce_or_u32(m.flags);
}

// ------------------------------------------------------------------ block merge (shared by both kernels)

// Each thread's state, stored by field / by list slot so that a warp's 32 accesses hit 32 banks.
template <typename A, int BLOCK>
struct VocabStatsScratch {
    A moments[10][BLOCK];
    unsigned int flags[BLOCK];
    unsigned int keys[VOCAB_STATS_TOP_MAX][BLOCK];
    int ids[VOCAB_STATS_TOP_MAX][BLOCK];
};

template <typename A, int BLOCK>
__device__ __forceinline__ void moments_store(VocabStatsScratch<A, BLOCK>& scratch, int thread, const VocabMoments<A>& m) {
    scratch.moments[0][thread] = m.max_p;
    scratch.moments[1][thread] = m.s1;
    scratch.moments[2][thread] = m.s2;
    scratch.moments[3][thread] = m.s3;
    scratch.moments[4][thread] = m.s4;
    scratch.moments[5][thread] = m.t;
    scratch.moments[6][thread] = m.cross_p;
    scratch.moments[7][thread] = m.max_q;
    scratch.moments[8][thread] = m.s1_q;
    scratch.moments[9][thread] = m.cross_q;
    scratch.flags[thread] = m.flags;
}

template <typename A, int BLOCK>
__device__ __forceinline__ VocabMoments<A> moments_load(const VocabStatsScratch<A, BLOCK>& scratch, int thread) {
    VocabMoments<A> m;
    m.max_p = scratch.moments[0][thread];
    m.s1 = scratch.moments[1][thread];
    m.s2 = scratch.moments[2][thread];
    m.s3 = scratch.moments[3][thread];
    m.s4 = scratch.moments[4][thread];
    m.t = scratch.moments[5][thread];
    m.cross_p = scratch.moments[6][thread];
    m.max_q = scratch.moments[7][thread];
    m.s1_q = scratch.moments[8][thread];
    m.cross_q = scratch.moments[9][thread];
    m.flags = scratch.flags[thread];
    return m;
}

// Warp 0 only, after the barrier: lane l folds threads l, l + 32, ...; then the warp tree. Every lane gets the block's state.
template <typename A, int BLOCK>
__device__ __forceinline__ VocabMoments<A> moments_block_fold(const VocabStatsScratch<A, BLOCK>& scratch) {
    int lane = threadIdx.x % KLM_WARP_SIZE;
    VocabMoments<A> m = moments_load(scratch, lane);
#pragma unroll 1
    for (int i = 1; i < BLOCK / KLM_WARP_SIZE; i++) {
        moments_merge(m, moments_load(scratch, lane + i * KLM_WARP_SIZE));
    }
    moments_warp_reduce(m);
    return m;
}

// Warp 0 only, after the barrier: merges the BLOCK sorted lists of the scratch (entries 0..keep-1 of each) into the best
// `keep` entries; lane 0 writes round r's winner to out_keys[r] / out_ids[r] (VOCAB_STATS_EMPTY / -1 once the lists
// run out). Lane l owns lists l, l + 32, ...; it offers the best of their heads, the warp takes the largest key (ties:
// the lower id), and the owner of the winner advances that list.
template <typename A, int BLOCK>
__device__ __forceinline__ void top_block_merge(const VocabStatsScratch<A, BLOCK>& scratch, int keep, unsigned int* out_keys, int* out_ids) {
    const int lists = BLOCK / KLM_WARP_SIZE;
    int lane = threadIdx.x % KLM_WARP_SIZE;
    int head[lists];
#pragma unroll
    for (int i = 0; i < lists; i++) {
        head[i] = 0;
    }
    for (int round = 0; round < keep; round++) {
        unsigned int best = VOCAB_STATS_EMPTY;
        unsigned int best_id = 0xffffffffu;
        int best_list = -1;
#pragma unroll
        for (int i = 0; i < lists; i++) {
            if (head[i] < keep) {
                unsigned int key = scratch.keys[head[i]][lane + i * KLM_WARP_SIZE];
                unsigned int id = (unsigned int)scratch.ids[head[i]][lane + i * KLM_WARP_SIZE];
                if (key > best || (key == best && id < best_id)) {
                    best = key;
                    best_id = id;
                    best_list = i;
                }
            }
        }
        unsigned int top = warp_reduce_max_u32(best);
        unsigned int top_id = warp_reduce_min_u32(best == top ? best_id : 0xffffffffu);
        if (lane == 0) {
            out_keys[round] = top;
            out_ids[round] = (int)top_id;
        }
        if (top != VOCAB_STATS_EMPTY && best == top && best_id == top_id) {
#pragma unroll
            for (int i = 0; i < lists; i++) {
                head[i] += i == best_list ? 1 : 0;
            }
        }
    }
}

// ------------------------------------------------------------------ kernel 1: one slice per block

// A thread's best entries, kept sorted (larger value first, then lower id) as order keys in its own column of the
// block's shared scratch (slot j at keys[j * VOCAB_STATS_BLOCK]), where the block merge reads them. `filled` counts
// them, up to keep = max(top_k, 2); `last` / `last_id` are entry keep - 1 once the list is full (-inf, -1 before),
// which a newcomer must beat: after a thread's first entries almost nothing does, so the list costs no registers in
// the scan and shared-memory traffic only on the rare insertions.
struct TopList {
    unsigned int* keys;
    int* ids;
    int filled;
    int keep;
    float last;
    int last_id;
};

__device__ __forceinline__ bool ranks_before(float value, int id, float other, int other_id) {
    return value > other || (value == other && id < other_id);
}

// Insertion sort from the bottom: entries the newcomer ranks before move down one slot (the last one drops out).
__device__ __forceinline__ void top_insert(TopList& list, float value, int id) {
    unsigned int key = order_key(value);
    int slot = list.filled < list.keep ? list.filled : list.keep - 1;
    while (slot > 0) {
        unsigned int above = list.keys[(slot - 1) * VOCAB_STATS_BLOCK];
        int above_id = list.ids[(slot - 1) * VOCAB_STATS_BLOCK];
        if (!(key > above || (key == above && id < above_id))) {
            break;
        }
        list.keys[slot * VOCAB_STATS_BLOCK] = above;
        list.ids[slot * VOCAB_STATS_BLOCK] = above_id;
        slot--;
    }
    list.keys[slot * VOCAB_STATS_BLOCK] = key;
    list.ids[slot * VOCAB_STATS_BLOCK] = id;
    list.filled = min(list.filled + 1, list.keep);
    if (list.filled == list.keep) {
        list.last = key_value(list.keys[(list.keep - 1) * VOCAB_STATS_BLOCK]);
        list.last_id = list.ids[(list.keep - 1) * VOCAB_STATS_BLOCK];
    }
}

// N consecutive entries of one row from 128-bit loads: 4 f32, or 8 bf16 (two per 32-bit word, the lower id in the
// low half), widened when used rather than unpacked into registers up front.
__device__ __forceinline__ float vector_entry(float4 v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
__device__ __forceinline__ float vector_entry(uint4 v, int i) {
    unsigned int word = i / 2 == 0 ? v.x : i / 2 == 1 ? v.y : i / 2 == 2 ? v.z : v.w;
    return __uint_as_float(i % 2 == 0 ? word << 16 : word & 0xffff0000u);
}

template <typename T> struct VocabVector;

template <> struct VocabVector<float> {
    typedef float4 type;
    static const int count = 4;
    static __device__ __forceinline__ float4 negative_infinity() {
        float value = -__int_as_float(0x7f800000);
        return make_float4(value, value, value, value);
    }
};

template <> struct VocabVector<bf16_t> {
    typedef uint4 type;
    static const int count = 8;
    static __device__ __forceinline__ uint4 negative_infinity() { return make_uint4(0xff80ff80u, 0xff80ff80u, 0xff80ff80u, 0xff80ff80u); }
};

// What a thread adds in one step: one scalar entry, or two 128-bit loads of each row (entries of the second follow
// those of the first; its ids start at id_b).
struct ScalarEntries {
    static const int count = 1;
    float x_value, y_value;
    int first_id;
    __device__ __forceinline__ float x(int) const { return x_value; }
    __device__ __forceinline__ float y(int) const { return y_value; }
    __device__ __forceinline__ int id(int) const { return first_id; }
};

template <typename T>
struct VectorEntries {
    typedef typename VocabVector<T>::type Vector;
    static const int per_vector = VocabVector<T>::count;
    static const int count = 2 * per_vector;
    Vector xa, xb, ya, yb;
    int id_a, id_b;
    __device__ __forceinline__ float x(int i) const { return i < per_vector ? vector_entry(xa, i) : vector_entry(xb, i - per_vector); }
    __device__ __forceinline__ float y(int i) const { return i < per_vector ? vector_entry(ya, i) : vector_entry(yb, i - per_vector); }
    __device__ __forceinline__ int id(int i) const { return i < per_vector ? id_a + i : id_b + i - per_vector; }
};

// Adds a step's entries to a thread's state. Padding entries are -inf in both rows, which adds nothing.
template <bool REF, typename Entries>
__device__ __forceinline__ void accumulate(VocabMoments<float>& m, TopList& top, const Entries& entries) {
    const int N = Entries::count;
    const float infinity = __int_as_float(0x7f800000);
    bool bad = false;
    float x_max = -infinity;
    unsigned int candidates = 0;
#pragma unroll
    for (int i = 0; i < N; i++) {
        float x = entries.x(i);
        x_max = fmaxf(x_max, x);
        bad |= !(x < infinity);   // NaN or +inf
        candidates |= ranks_before(x, entries.id(i), top.last, top.last_id) ? 1u << i : 0u;
    }
    if (x_max > m.max_p) {
        rescale_p(m, x_max);
    }
    // Rare once a thread's list has filled: one insertion site, the entry picked by an unrolled select.
    while (candidates != 0) {
        int pick = __ffs(candidates) - 1;
        candidates &= candidates - 1;
        float value = entries.x(0);
        int id = entries.id(0);
#pragma unroll
        for (int i = 1; i < N; i++) {
            value = pick == i ? entries.x(i) : value;
            id = pick == i ? entries.id(i) : id;
        }
        if (ranks_before(value, id, top.last, top.last_id)) {
            top_insert(top, value, id);
        }
    }
    if (REF) {
        float y_max = -infinity;
#pragma unroll
        for (int i = 0; i < N; i++) {
            y_max = fmaxf(y_max, entries.y(i));
            bad |= !(entries.y(i) < infinity);
        }
        if (y_max > m.max_q) {
            rescale_q(m, y_max);
        }
    }
#pragma unroll
    for (int i = 0; i < N; i++) {
        float x = entries.x(i);
        bool live_x = x > -infinity;
        float shift = live_x ? x - m.max_p : 0.0f;
        float e = live_x ? expf(shift) : 0.0f;
        float e2 = e * e;
        m.s1 += e;
        m.s2 += e2;
        m.s3 += e2 * e;
        m.s4 += e2 * e2;
        m.t += e * shift;
        if (REF) {
            float y = entries.y(i);
            bool live_y = y > -infinity;
            float f = live_y ? expf(y - m.max_q) : 0.0f;
            m.s1_q += f;
            float difference = live_x && live_y ? x - y : 0.0f;
            m.cross_p += e * difference;
            m.cross_q -= f * difference;
            if (live_x != live_y) {
                m.flags |= live_x ? VOCAB_STATS_KL_PQ_INFINITE : VOCAB_STATS_KL_QP_INFINITE;
            }
        }
    }
    if (bad) {
        m.flags |= VOCAB_STATS_INVALID;
    }
}

template <typename T, bool REF>
__device__ __forceinline__ void vocab_stats_slice(const T* __restrict__ x, const T* __restrict__ y, int begin, int end, int keep,
                                                  float token_x, float token_y, bool holds_token,
                                                  VocabStatsScratch<float, VOCAB_STATS_BLOCK>& scratch, VocabStatsPartial* __restrict__ out) {
    typedef VocabVector<T> Vectors;
    typedef typename Vectors::type Vector;
    const int N = Vectors::count;
    VocabMoments<float> m;
    moments_clear(m);
    TopList top;
    top.keys = &scratch.keys[0][threadIdx.x];
    top.ids = &scratch.ids[0][threadIdx.x];
    top.filled = 0;
    top.keep = keep;
    top.last = -__int_as_float(0x7f800000);
    top.last_id = -1;
    for (int j = 0; j < keep; j++) {
        top.keys[j * VOCAB_STATS_BLOCK] = VOCAB_STATS_EMPTY;
        top.ids[j * VOCAB_STATS_BLOCK] = -1;
    }

    // A scalar head up to 16-byte alignment (x and y alike, else the whole slice is scalar), the 128-bit body, a
    // scalar tail. The list compares ids, so the order a thread visits its entries in does not matter.
    unsigned long long x_address = (unsigned long long)(x + begin);
    bool aligned = x_address % sizeof(T) == 0 && (!REF || ((x_address ^ (unsigned long long)(y + begin)) & 15) == 0);
    int length = end - begin;
    int head = (int)(((16 - (x_address & 15)) & 15) / sizeof(T));
    if (!aligned || head > length) {
        head = length;
    }
    int vectors = (length - head) / N;
    int body = begin + head;
    int tail = body + vectors * N;
    int scalars = head + (end - tail);
    for (int k = threadIdx.x; k < scalars; k += VOCAB_STATS_BLOCK) {
        ScalarEntries entries;
        entries.first_id = k < head ? begin + k : tail + (k - head);
        entries.x_value = to_float(x[entries.first_id]);
        entries.y_value = REF ? to_float(y[entries.first_id]) : 0.0f;
        accumulate<REF>(m, top, entries);
    }
    const Vector* x_vectors = reinterpret_cast<const Vector*>(x + body);
    const Vector* y_vectors = REF ? reinterpret_cast<const Vector*>(y + body) : x_vectors;
    for (int v = threadIdx.x; v < vectors; v += 2 * VOCAB_STATS_BLOCK) {
        // Two loads per row in flight; past the end the second is -inf in both rows, which adds nothing.
        bool second = v + VOCAB_STATS_BLOCK < vectors;
        VectorEntries<T> entries;
        entries.xa = x_vectors[v];
        entries.xb = second ? x_vectors[v + VOCAB_STATS_BLOCK] : Vectors::negative_infinity();
        entries.ya = REF ? y_vectors[v] : entries.xa;
        entries.yb = REF && second ? y_vectors[v + VOCAB_STATS_BLOCK] : Vectors::negative_infinity();
        entries.id_a = body + v * N;
        entries.id_b = body + (v + VOCAB_STATS_BLOCK) * N;
        accumulate<REF>(m, top, entries);
    }

    moments_store(scratch, threadIdx.x, m);
    __syncthreads();
    if (threadIdx.x < KLM_WARP_SIZE) {
        VocabMoments<float> total = moments_block_fold(scratch);
        top_block_merge(scratch, keep, out->top_keys, out->top_ids);
        if (threadIdx.x == 0) {
            out->max_logit = total.max_p;
            out->s1 = total.s1;
            out->s2 = total.s2;
            out->s3 = total.s3;
            out->s4 = total.s4;
            out->t = total.t;
            out->cross = total.cross_p;
            out->reference_max = total.max_q;
            out->reference_s1 = total.s1_q;
            out->reference_cross = total.cross_q;
            out->flags = total.flags;
            if (holds_token) {
                out->token_logit = token_x;
                out->token_reference = token_y;
            }
        }
    }
}

template <typename T>
__device__ __forceinline__ void vocab_stats(const T* logits, const T* reference, const int* tokens, VocabStatsPartial* partials,
                                            int vocabulary, int slice, int splits, int top_k) {
    __shared__ VocabStatsScratch<float, VOCAB_STATS_BLOCK> scratch;
    int row = blockIdx.x / splits;
    int split = blockIdx.x % splits;
    int begin = split * slice;
    int end = min(vocabulary, begin + slice);
    const T* x = logits + (long long)row * vocabulary;
    const T* y = reference ? reference + (long long)row * vocabulary : reference;
    int keep = max(top_k, 2);
    // The block whose slice holds the token keeps its logits for the merge (loaded first, to overlap the scan).
    float token_x = 0.0f, token_y = 0.0f;
    bool holds_token = false;
    if (threadIdx.x == 0 && tokens) {
        int token = tokens[row];
        if (token >= begin && token < end) {
            holds_token = true;
            token_x = to_float(x[token]);
            token_y = y ? to_float(y[token]) : 0.0f;
        }
    }
    if (y) {
        vocab_stats_slice<T, true>(x, y, begin, end, keep, token_x, token_y, holds_token, scratch, partials + blockIdx.x);
    } else {
        vocab_stats_slice<T, false>(x, y, begin, end, keep, token_x, token_y, holds_token, scratch, partials + blockIdx.x);
    }
}

extern "C" __global__ __launch_bounds__(256) void vocab_stats_f32(const float* logits, const float* reference, const int* tokens,
                                                                  VocabStatsPartial* partials, int vocabulary, int slice, int splits, int top_k) {
    vocab_stats(logits, reference, tokens, partials, vocabulary, slice, splits, top_k);
}

extern "C" __global__ __launch_bounds__(256) void vocab_stats_bf16(const bf16_t* logits, const bf16_t* reference, const int* tokens,
                                                                   VocabStatsPartial* partials, int vocabulary, int slice, int splits, int top_k) {
    vocab_stats(logits, reference, tokens, partials, vocabulary, slice, splits, top_k);
}

// ------------------------------------------------------------------ kernel 2: merge a row's partials, write the outputs

__device__ __forceinline__ double vocab_kurtosis(double s1, double s2, double s3, double s4, int vocabulary) {
    double v = vocabulary;
    double m2_raw = v * (s2 / (s1 * s1));
    double m3_raw = v * v * (s3 / (s1 * s1 * s1));
    double m4_raw = v * v * v * (s4 / (s1 * s1 * s1 * s1));
    double m2 = m2_raw - 1.0;
    if (!(m2 > VOCAB_STATS_UNIFORM_FLOOR)) {
        return 0.0;
    }
    double m4 = m4_raw - 4.0 * m3_raw + 6.0 * m2_raw - 3.0;
    return m4 / (m2 * m2) - 3.0;
}

extern "C" __global__ __launch_bounds__(128) void vocab_stats_merge(const VocabStatsPartial* partials, const int* tokens, float* stats,
                                                                    int* top_ids, float* top_log_probs, int vocabulary, int slice,
                                                                    int splits, int top_k, int has_reference) {
    __shared__ VocabStatsScratch<double, VOCAB_STATS_MERGE_BLOCK> scratch;
    __shared__ unsigned int final_keys[VOCAB_STATS_TOP_MAX];
    __shared__ int final_ids[VOCAB_STATS_TOP_MAX];
    int row = blockIdx.x;
    int keep = max(top_k, 2);
    const VocabStatsPartial* row_partials = partials + (long long)row * splits;
    int thread = threadIdx.x;
    VocabMoments<double> m;
    moments_clear(m);
    if (thread < splits) {
        const VocabStatsPartial* p = row_partials + thread;
        m.max_p = p->max_logit;
        m.s1 = p->s1;
        m.s2 = p->s2;
        m.s3 = p->s3;
        m.s4 = p->s4;
        m.t = p->t;
        m.cross_p = p->cross;
        m.max_q = p->reference_max;
        m.s1_q = p->reference_s1;
        m.cross_q = p->reference_cross;
        m.flags = p->flags;
    }
    moments_store(scratch, thread, m);
    for (int j = 0; j < keep; j++) {
        scratch.keys[j][thread] = thread < splits ? row_partials[thread].top_keys[j] : VOCAB_STATS_EMPTY;
        scratch.ids[j][thread] = thread < splits ? row_partials[thread].top_ids[j] : -1;
    }
    __syncthreads();
    if (thread >= KLM_WARP_SIZE) {
        return;
    }
    VocabMoments<double> total = moments_block_fold(scratch);
    top_block_merge(scratch, keep, final_keys, final_ids);
    if (thread != 0) {
        return;
    }
    // Thread 0 wrote final_keys / final_ids itself: no barrier needed to read them.
    const double infinity = __longlong_as_double(0x7ff0000000000000LL);
    const float nan = klm_nan();
    float* out = stats + (long long)row * 9;
    int* ids = top_ids + (long long)row * top_k;
    float* log_probs = top_log_probs + (long long)row * top_k;
    bool undefined = (total.flags & VOCAB_STATS_INVALID) != 0 || total.max_p == -infinity || (has_reference && total.max_q == -infinity);
    if (undefined) {
        for (int field = 0; field < 9; field++) {
            out[field] = nan;
        }
        for (int i = 0; i < top_k; i++) {
            ids[i] = -1;
            log_probs[i] = nan;
        }
        return;
    }
    double log_s1 = log(total.s1);
    double log_sum_exp = total.max_p + log_s1;
    int token = tokens ? tokens[row] : -1;
    double token_log_prob = nan;
    double token_reference = nan;
    if (token >= 0 && token < vocabulary) {
        const VocabStatsPartial* holder = row_partials + token / slice;
        token_log_prob = (double)holder->token_logit - log_sum_exp;
        token_reference = holder->token_reference;
    }
    double p1 = exp((double)key_value(final_keys[0]) - log_sum_exp);
    double p2 = final_keys[1] == VOCAB_STATS_EMPTY ? 0.0 : exp((double)key_value(final_keys[1]) - log_sum_exp);
    out[0] = (float)total.max_p;                                     // MaxLogit
    out[1] = (float)log_sum_exp;                                     // LogSumExp
    out[2] = (float)fmax(0.0, log_s1 - total.t / total.s1);          // Entropy
    out[3] = (float)token_log_prob;                                  // TokenLogProb
    out[4] = (float)(p1 - p2);                                       // Margin
    out[5] = (float)vocab_kurtosis(total.s1, total.s2, total.s3, total.s4, vocabulary);  // Kurtosis
    if (has_reference) {
        double reference_log_sum_exp = total.max_q + log(total.s1_q);
        out[6] = (total.flags & VOCAB_STATS_KL_PQ_INFINITE) ? (float)infinity
                                                            : (float)fmax(0.0, total.cross_p / total.s1 - log_sum_exp + reference_log_sum_exp);
        out[7] = (total.flags & VOCAB_STATS_KL_QP_INFINITE) ? (float)infinity
                                                            : (float)fmax(0.0, total.cross_q / total.s1_q - reference_log_sum_exp + log_sum_exp);
        out[8] = (float)(token_log_prob - (token_reference - reference_log_sum_exp));  // TokenLogRatio
    } else {
        out[6] = nan;
        out[7] = nan;
        out[8] = nan;
    }
    for (int i = 0; i < top_k; i++) {
        ids[i] = final_ids[i];
        log_probs[i] = final_ids[i] < 0 ? (float)-infinity : (float)((double)key_value(final_keys[i]) - log_sum_exp);
    }
}
