using System.Numerics;
using System.Numerics.Tensors;
using System.Runtime.CompilerServices;

namespace KernelLM.Runtime.Cpu;

/// <summary>
/// The CPU device: every decoder op as a validated entry point (spans, shapes checked, errors name the
/// tensor) over a launcher that splits the work across <see cref="CpuWorkerPool"/> (pointers, grain maths)
/// over the kernels in <see cref="CpuKernels"/>. Jobs and per-thread scratch are allocated once here, so
/// no op allocates. Activations are fp32; weights stay in their stored dtype. Not thread-safe: one
/// forward pass at a time per device.
/// </summary>
public sealed unsafe class CpuDevice : IDisposable
{
    /// <summary>Below this many multiply-adds an op runs on the calling thread: waking workers costs more.</summary>
    private const long SerialWorkLimit = 96 * 1024;

    /// <summary>Target multiply-adds per chunk handed to a worker.</summary>
    private const long ChunkWork = 48 * 1024;

    private readonly CpuWorkerPool _pool;
    private readonly bool _ownsPool;
    private readonly NativeBuffer<float>[] _scratch;
    private readonly LinearJob _linear;
    private readonly AttentionJob _attention;

    public CpuDevice(int threads, int scratchFloats)
    {
        _ownsPool = threads != CpuWorkerPool.Shared.ThreadCount;
        _pool = _ownsPool ? new CpuWorkerPool(threads) : CpuWorkerPool.Shared;
        ScratchFloats = scratchFloats;
        _scratch = new NativeBuffer<float>[_pool.ThreadCount];
        for (int i = 0; i < _scratch.Length; i++)
        {
            _scratch[i] = new NativeBuffer<float>(scratchFloats);
        }
        _linear = new LinearJob(this);
        _attention = new AttentionJob(this);
    }

    public int ThreadCount => _pool.ThreadCount;

    /// <summary>The worker pool the device's ops run on (KV selection scores on it too).</summary>
    public CpuWorkerPool Pool => _pool;
    public int ScratchFloats { get; }

    private float* Scratch(int worker) => _scratch[worker].Data;

    // ---------------------------------------------------------------- linear: y = x W^T (+ b) (+ y)

    /// <summary>
    /// y[t, r] (+)= sum_c x[t, c] * W[r, c] + bias[r], for t in [0, tokens).
    /// x: [tokens, W.Cols] fp32; W: [rows, cols] f32/f16/bf16; bias: [rows] or empty; y: [tokens, W.Rows].
    /// With <paramref name="accumulate"/>, adds into y (the fused residual add).
    /// </summary>
    public void Linear(ReadOnlySpan<float> x, int tokens, in WeightMatrix weight, ReadOnlySpan<float> bias, Span<float> y, bool accumulate = false)
    {
        if (x.Length < (long)tokens * weight.Cols)
        {
            throw new ArgumentException($"linear '{weight.Name}': input holds {x.Length} values, needs {tokens} x {weight.Cols}", nameof(x));
        }
        if (y.Length < (long)tokens * weight.Rows)
        {
            throw new ArgumentException($"linear '{weight.Name}': output holds {y.Length} values, needs {tokens} x {weight.Rows}", nameof(y));
        }
        if (!bias.IsEmpty && bias.Length != weight.Rows)
        {
            throw new ArgumentException($"linear '{weight.Name}': bias has {bias.Length} values, expected {weight.Rows}", nameof(bias));
        }
        if (weight.DType == DType.F16 && weight.Cols > ScratchFloats)
        {
            throw new ArgumentException($"linear '{weight.Name}': {weight.Cols} columns exceed the device scratch of {ScratchFloats}");
        }
        fixed (float* xp = x, bp = bias, yp = y)
        {
            LaunchLinear(xp, tokens, weight, bias.IsEmpty ? null : bp, yp, accumulate);
        }
    }

    private void LaunchLinear(float* x, int tokens, in WeightMatrix weight, float* bias, float* y, bool accumulate)
    {
        var job = _linear;
        job.X = x;
        job.Tokens = tokens;
        job.Weight = weight;
        job.Bias = bias;
        job.Y = y;
        job.Accumulate = accumulate;
        long work = (long)weight.Rows * weight.Cols * tokens;
        int grain = work <= SerialWorkLimit
            ? weight.Rows
            : (int)Math.Clamp(ChunkWork / ((long)weight.Cols * tokens), 1, Math.Max(1, weight.Rows / (4 * _pool.ThreadCount)));
        // Whole blocks of four rows per chunk (the decode kernel's unit).
        grain = Math.Min(weight.Rows, (grain + 3) & ~3);
        _pool.Run(job, weight.Rows, grain);
        job.Weight = default;
    }

    private sealed class LinearJob(CpuDevice device) : ParallelJob
    {
        public float* X;
        public int Tokens;
        public WeightMatrix Weight;
        public float* Bias;
        public float* Y;
        public bool Accumulate;

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public override void Execute(int begin, int end, int worker)
        {
            int cols = Weight.Cols;
            float* partial = stackalloc float[4];
            if (Tokens < 4 && Weight.DType == DType.F32)
            {
                // Decode, f32 weights: four weight rows per pass over each activation row (down_proj
                // [2048, 8192]: 24.5 -> 28.7 GB/s on one core). Measured slower for bf16 (gate/up 22.4 ->
                // 16.3 GB/s: the widening of four rows at once contends with the FMAs), so bf16 keeps the
                // one-row kernel with four accumulators.
                RowBlocks<F32Row>(begin, end, partial);
                return;
            }
            for (int r = begin; r < end; r++)
            {
                byte* row = Weight.Row(r);
                float bias = Bias == null ? 0f : Bias[r];
                if (Weight.DType == DType.F16)
                {
                    float* widened = device.Scratch(worker);
                    TensorPrimitives.ConvertToSingle(new ReadOnlySpan<Half>(row, cols), new Span<float>(widened, cols));
                    row = (byte*)widened;
                }
                if (Weight.DType == DType.BF16)
                {
                    Row<Bf16Row>(row, r, bias, partial);
                }
                else
                {
                    Row<F32Row>(row, r, bias, partial);
                }
            }
        }

        /// <summary>Rows [begin, end) for each of the (fewer than four) tokens, four rows per kernel call.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private void RowBlocks<TRow>(int begin, int end, float* partial) where TRow : struct, IWeightRow
        {
            int cols = Weight.Cols;
            int rows = Weight.Rows;
            for (int t = 0; t < Tokens; t++)
            {
                float* x = X + (long)t * cols;
                float* y = Y + (long)t * rows;
                int r = begin;
                for (; r + 4 <= end; r += 4)
                {
                    CpuKernels.Dot4Rows<TRow>(Weight.Row(r), Weight.Row(r + 1), Weight.Row(r + 2), Weight.Row(r + 3), x, cols, partial);
                    for (int j = 0; j < 4; j++)
                    {
                        Store(y + r + j, partial[j] + (Bias == null ? 0f : Bias[r + j]));
                    }
                }
                for (; r < end; r++)
                {
                    Store(y + r, CpuKernels.Dot<TRow>(Weight.Row(r), x, cols) + (Bias == null ? 0f : Bias[r]));
                }
            }
        }

        /// <summary>Output row r for every token: four tokens per pass over the weight row, then the rest.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private void Row<TRow>(byte* row, int r, float bias, float* partial) where TRow : struct, IWeightRow
        {
            int cols = Weight.Cols;
            int rows = Weight.Rows;
            int t = 0;
            for (; t + 4 <= Tokens; t += 4)
            {
                float* x0 = X + (long)t * cols;
                CpuKernels.Dot4<TRow>(row, x0, x0 + cols, x0 + 2 * cols, x0 + 3 * cols, cols, partial);
                for (int j = 0; j < 4; j++)
                {
                    Store(Y + (long)(t + j) * rows + r, partial[j] + bias);
                }
            }
            for (; t < Tokens; t++)
            {
                Store(Y + (long)t * rows + r, CpuKernels.Dot<TRow>(row, X + (long)t * cols, cols) + bias);
            }
        }

        private void Store(float* destination, float value)
        {
            if (Accumulate)
            {
                *destination += value;
            }
            else
            {
                *destination = value;
            }
        }
    }

    // ---------------------------------------------------------------- attention

    /// <summary>
    /// Causal grouped-query attention of <paramref name="tokens"/> new queries at positions
    /// start.. against the KV cache of <paramref name="layer"/> (which must already hold them):
    /// out[t, h] = softmax_j(q[t, h] . k[j, h / group] * scale + bias[h, j]) v[j, h / group], j in [lo, start + t],
    /// lo = start + t - window + 1 with a sliding window (0 = none), else 0; with a position selection only the
    /// selected positions below start and the chunk's own (see <see cref="AttentionHook"/>, shared with the CUDA
    /// kernels). q, output: [tokens, heads * head_dim] fp32. Scores and softmax in fp32 with max subtraction.
    /// </summary>
    public void Attention(ReadOnlySpan<float> q, KvCache cache, int layer, int heads, int start, int tokens, int slidingWindow, Span<float> output,
        AttentionHook hook = default)
    {
        int width = heads * cache.HeadDim;
        if (heads % cache.KvHeads != 0)
        {
            throw new ArgumentException($"attention: {heads} query heads are not a multiple of {cache.KvHeads} KV heads");
        }
        if (q.Length < (long)tokens * width || output.Length < (long)tokens * width)
        {
            throw new ArgumentException($"attention: q and output must hold {tokens} x {width} values");
        }
        if (start + tokens > cache.Capacity || start + tokens > cache.Length)
        {
            throw new ArgumentException($"attention: positions up to {start + tokens} are not in the KV cache (length {cache.Length})");
        }
        if (start + tokens > ScratchFloats)
        {
            throw new ArgumentException($"attention: {start + tokens} positions exceed the device scratch of {ScratchFloats}");
        }
        ValidateHook(hook, heads, cache.Capacity, cache.HeadDim, start + tokens);
        fixed (float* qp = q, op = output, bias = hook.KeyBias, ropeCos = hook.RopeCos, ropeSin = hook.RopeSin)
        fixed (int* selected = hook.SelectedPositions)
        {
            var job = _attention;
            job.Q = qp;
            job.Output = op;
            job.Bias = hook.KeyBias.IsEmpty ? null : bias;
            job.Selects = hook.SelectsPositions;
            job.Selected = selected;
            job.SelectedCount = hook.SelectedPositions.Length;
            job.RopeCos = hook.CompactedRope ? ropeCos : null;
            job.RopeSin = hook.CompactedRope ? ropeSin : null;
            // Compacted slots: the listed prefix is 0..m-1, chunk token t is m + t (without a list m = start).
            int prefixSlots = start;
            if (hook.SelectsPositions)
            {
                prefixSlots = 0;
                while (prefixSlots < hook.SelectedPositions.Length && hook.SelectedPositions[prefixSlots] < start)
                {
                    prefixSlots++;
                }
            }
            job.PrefixSlots = prefixSlots;
            job.Cache = cache;
            job.Layer = layer;
            job.Heads = heads;
            job.Start = start;
            job.Window = slidingWindow;
            job.Scale = 1f / MathF.Sqrt(cache.HeadDim);
            long work = (long)tokens * heads * (start + tokens) * cache.HeadDim * 2;
            int items = tokens * heads;
            int grain = work <= SerialWorkLimit ? items : 1;
            _pool.Run(job, items, grain);
            job.Cache = null;
            job.Bias = null;
            job.Selected = null;
            job.RopeCos = null;
            job.RopeSin = null;
        }
    }

    private static void ValidateHook(AttentionHook hook, int heads, int capacity, int headDim, int positions)
    {
        if (hook.RopeCos.Length != hook.RopeSin.Length || (hook.CompactedRope && (long)positions * (headDim / 2) > hook.RopeCos.Length))
        {
            throw new ArgumentException($"attention: the compacted RoPE tables hold {hook.RopeCos.Length} cos and {hook.RopeSin.Length} sin values; " +
                                        $"expected the same number, at least [positions {positions}, head_dim / 2 = {headDim / 2}]");
        }
        if (!hook.KeyBias.IsEmpty && hook.KeyBias.Length != (long)heads * capacity)
        {
            throw new ArgumentException($"attention: the key bias holds {hook.KeyBias.Length} values; expected [heads {heads}, capacity {capacity}]");
        }
        var selected = hook.SelectedPositions;
        for (int i = 0; i < selected.Length; i++)
        {
            if ((uint)selected[i] >= (uint)capacity || (i > 0 && selected[i] <= selected[i - 1]))
            {
                throw new ArgumentException($"attention: selected position [{i}] = {selected[i]} is not strictly ascending inside the cache capacity {capacity}");
            }
        }
    }

    private sealed class AttentionJob(CpuDevice device) : ParallelJob
    {
        public float* Q;
        public float* Output;
        public KvCache? Cache;
        public int Layer;
        public int Heads;
        public int Start;
        public int Window;
        public float Scale;
        public float* Bias;          // [heads, capacity] or null
        public bool Selects;
        public int* Selected;        // ascending positions when Selects
        public int SelectedCount;
        public float* RopeCos;       // [positions, head_dim / 2] for compacted RoPE, or null
        public float* RopeSin;
        public int PrefixSlots;      // compacted slot of position start: listed positions below start (start without a list)

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public override void Execute(int begin, int end, int worker)
        {
            var cache = Cache!;
            int headDim = cache.HeadDim;
            int group = Heads / cache.KvHeads;
            float* scores = device.Scratch(worker);
            bool hooked = Bias != null || Selects || RopeCos != null;
            for (int item = begin; item < end; item++)
            {
                if (hooked)
                {
                    AttendHooked(item / Heads, item % Heads, cache, group, scores);
                    continue;
                }
                int t = item / Heads;
                int h = item % Heads;
                int position = Start + t;
                int first = Window > 0 ? Math.Max(0, position - Window + 1) : 0;
                int count = position - first + 1;
                float* query = Q + ((long)t * Heads + h) * headDim;
                float* keys = cache.Keys(Layer, h / group) + (long)first * headDim;
                float* values = cache.Values(Layer, h / group) + (long)first * headDim;
                var queryRow = new ReadOnlySpan<float>(query, headDim);
                float max = float.NegativeInfinity;
                for (int j = 0; j < count; j++)
                {
                    float s = TensorPrimitives.Dot(queryRow, new ReadOnlySpan<float>(keys + (long)j * headDim, headDim)) * Scale;
                    scores[j] = s;
                    max = MathF.Max(max, s);
                }
                var probabilities = new Span<float>(scores, count);
                TensorPrimitives.Subtract(probabilities, max, probabilities);
                TensorPrimitives.Exp(probabilities, probabilities);
                float inverseSum = 1f / TensorPrimitives.Sum(probabilities);
                var outputRow = new Span<float>(Output + ((long)t * Heads + h) * headDim, headDim);
                outputRow.Clear();
                for (int j = 0; j < count; j++)
                {
                    TensorPrimitives.MultiplyAdd(new ReadOnlySpan<float>(values + (long)j * headDim, headDim), probabilities[j], outputRow, outputRow);
                }
                TensorPrimitives.Multiply(outputRow, inverseSum, outputRow);
            }
        }

        /// <summary>One (token, head) with the hook: the keys come from <see cref="KeyWalk"/> (walked twice, for the
        /// scores and for the values, in the same order), the bias is added to the scaled scores, and a query
        /// that sees no finite score gets zeros.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private void AttendHooked(int t, int h, KvCache cache, int group, float* scores)
        {
            int headDim = cache.HeadDim;
            int position = Start + t;
            int first = Window > 0 ? Math.Max(0, position - Window + 1) : 0;
            scoped ReadOnlySpan<float> queryRow = new ReadOnlySpan<float>(Q + ((long)t * Heads + h) * headDim, headDim);
            bool rope = RopeCos != null;
            Span<float> rotatedQuery = rope ? stackalloc float[headDim] : default;
            Span<float> rotatedKey = rope ? stackalloc float[headDim] : default;
            if (rope)
            {
                Rotate(queryRow, rotatedQuery, PrefixSlots + t);
                queryRow = rotatedQuery;
            }
            float* keys = cache.Keys(Layer, h / group);
            float* values = cache.Values(Layer, h / group);
            float* bias = Bias == null ? null : Bias + (long)h * cache.Capacity;
            var outputRow = new Span<float>(Output + ((long)t * Heads + h) * headDim, headDim);
            outputRow.Clear();

            var walk = new KeyWalk(Selects ? Selected : null, SelectedCount, Start, first, position);
            int count = 0;
            float max = float.NegativeInfinity;
            while (walk.Next(out int j))
            {
                scoped ReadOnlySpan<float> keyRow = new ReadOnlySpan<float>(keys + (long)j * headDim, headDim);
                if (rope)
                {
                    Rotate(keyRow, rotatedKey, walk.Slot(j, PrefixSlots));
                    keyRow = rotatedKey;
                }
                float s = TensorPrimitives.Dot(queryRow, keyRow) * Scale;
                if (bias != null)
                {
                    s += bias[j];
                }
                scores[count++] = s;
                max = MathF.Max(max, s);
            }
            if (float.IsNegativeInfinity(max) || count == 0)
            {
                return;
            }
            var probabilities = new Span<float>(scores, count);
            TensorPrimitives.Subtract(probabilities, max, probabilities);
            TensorPrimitives.Exp(probabilities, probabilities);
            float inverseSum = 1f / TensorPrimitives.Sum(probabilities);
            walk = new KeyWalk(Selects ? Selected : null, SelectedCount, Start, first, position);
            for (int i = 0; walk.Next(out int j); i++)
            {
                if (probabilities[i] != 0)
                {
                    TensorPrimitives.MultiplyAdd(new ReadOnlySpan<float>(values + (long)j * headDim, headDim), probabilities[i], outputRow, outputRow);
                }
            }
            TensorPrimitives.Multiply(outputRow, inverseSum, outputRow);
        }

        /// <summary>Compacted RoPE of one row at <paramref name="slot"/>: rotate-half with the table's row, as <see cref="Rope"/>
        /// (the same products and sums, each rounded, so the same bits), with SIMD vectors over the halves.</summary>
        private void Rotate(ReadOnlySpan<float> row, Span<float> rotated, int slot)
        {
            int half = row.Length / 2;
            float* c = RopeCos + (long)slot * half;
            float* s = RopeSin + (long)slot * half;
            int i = 0;
            fixed (float* source = row, destination = rotated)
            {
                for (; i + Vector<float>.Count <= half; i += Vector<float>.Count)
                {
                    var a = Vector.Load(source + i);
                    var b = Vector.Load(source + half + i);
                    var cosine = Vector.Load(c + i);
                    var sine = Vector.Load(s + i);
                    Vector.Store(a * cosine - b * sine, destination + i);
                    Vector.Store(b * cosine + a * sine, destination + half + i);
                }
                for (; i < half; i++)
                {
                    float a = source[i];
                    float b = source[half + i];
                    destination[i] = a * c[i] - b * s[i];
                    destination[half + i] = b * c[i] + a * s[i];
                }
            }
        }
    }

    /// <summary>The keys a query at <c>position</c> sees, ascending: the selected positions in [first, start) (all of
    /// them without a selection), then max(first, start)..position.</summary>
    private struct KeyWalk(int* selected, int selectedCount, int start, int first, int position)
    {
        private int _index;
        private int _next = selected == null ? first : Math.Max(first, start);

        /// <summary>The compacted slot of the key <see cref="Next"/> just gave: its index in the list for a listed prefix
        /// position, prefixSlots + (key - start) for a chunk position, the key itself without a list.</summary>
        public readonly int Slot(int key, int prefixSlots) =>
            selected == null ? key : key < start ? _index - 1 : prefixSlots + (key - start);

        public bool Next(out int key)
        {
            while (selected != null && _index < selectedCount)
            {
                int candidate = selected[_index++];
                if (candidate >= start)
                {
                    _index = selectedCount;
                    break;
                }
                if (candidate >= first)
                {
                    key = candidate;
                    return true;
                }
            }
            key = _next;
            if (_next > position)
            {
                return false;
            }
            _next++;
            return true;
        }
    }

    // ---------------------------------------------------------------- element-wise and row ops (serial: memory-bound and small)

    /// <summary>y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight, rows of weight.Length; fp32 throughout (HF LlamaRMSNorm).</summary>
    public static void RmsNorm(ReadOnlySpan<float> x, ReadOnlySpan<float> weight, float epsilon, Span<float> y, int rows)
    {
        int cols = weight.Length;
        if (x.Length < rows * cols || y.Length < rows * cols)
        {
            throw new ArgumentException($"rms_norm: x and y must hold {rows} x {cols} values");
        }
        for (int r = 0; r < rows; r++)
        {
            var row = x.Slice(r * cols, cols);
            var output = y.Slice(r * cols, cols);
            float meanSquare = TensorPrimitives.SumOfSquares(row) / cols;
            float scale = 1f / MathF.Sqrt(meanSquare + epsilon);
            TensorPrimitives.Multiply(row, scale, output);
            TensorPrimitives.Multiply(output, weight, output);
        }
    }

    /// <summary>
    /// RoPE, HF rotate-half convention, in place on x: [tokens, heads, head_dim] at positions start..:
    /// for i below half, (x_i, x_{i+half}) -> (x_i cos - x_{i+half} sin, x_{i+half} cos + x_i sin),
    /// with angle = position * inv_freq[i]; cos/sin tables: [max_position, half].
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Rope(Span<float> x, int tokens, int heads, int headDim, int start, ReadOnlySpan<float> cos, ReadOnlySpan<float> sin)
    {
        int half = headDim / 2;
        if (x.Length < tokens * heads * headDim)
        {
            throw new ArgumentException($"rope: x must hold {tokens} x {heads} x {headDim} values");
        }
        if ((long)(start + tokens) * half > cos.Length)
        {
            throw new ContextLengthException($"rope: position {start + tokens - 1} is beyond the RoPE table of {cos.Length / half} positions");
        }
        for (int t = 0; t < tokens; t++)
        {
            var c = cos.Slice((start + t) * half, half);
            var s = sin.Slice((start + t) * half, half);
            for (int h = 0; h < heads; h++)
            {
                var head = x.Slice((t * heads + h) * headDim, headDim);
                for (int i = 0; i < half; i++)
                {
                    float a = head[i];
                    float b = head[i + half];
                    head[i] = a * c[i] - b * s[i];
                    head[i + half] = b * c[i] + a * s[i];
                }
            }
        }
    }

    /// <summary>gate = silu(gate) * up = gate * sigmoid(gate) * up, element-wise, in place on gate.
    /// scratch: at least gate.Length floats.</summary>
    public static void SiluMultiply(Span<float> gate, ReadOnlySpan<float> up, Span<float> scratch)
    {
        if (up.Length < gate.Length || scratch.Length < gate.Length)
        {
            throw new ArgumentException("silu_mul: up and scratch must be at least as long as gate");
        }
        var sigmoid = scratch[..gate.Length];
        TensorPrimitives.Sigmoid(gate, sigmoid);
        TensorPrimitives.Multiply(gate, sigmoid, gate);
        TensorPrimitives.Multiply(gate, up[..gate.Length], gate);
    }

    /// <summary>Writes row <paramref name="token"/> of the embedding table, widened to fp32, into destination.</summary>
    public static void Embedding(in WeightMatrix table, int token, Span<float> destination)
    {
        if ((uint)token >= (uint)table.Rows)
        {
            throw new ArgumentOutOfRangeException(nameof(token), $"token id {token} is outside the vocabulary of {table.Rows} ('{table.Name}')");
        }
        table.ReadRow(token, destination);
    }

    public void Dispose()
    {
        foreach (var buffer in _scratch)
        {
            buffer.Dispose();
        }
        if (_ownsPool)
        {
            _pool.Dispose();
        }
    }
}
