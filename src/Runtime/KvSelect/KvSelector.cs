using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using KernelLM.Runtime.Cpu;

namespace KernelLM.Runtime.KvSelect;

/// <summary>
/// TokenSelect on the CPU device, the reference twin of kernels/kv_select.cu (same formula, same tie rule, same cache
/// test; header comment there). Per layer it keeps the index list [init | top-k ascending | local], the query of its
/// last selection and whether that is valid. All buffers are allocated at construction: a decode step allocates nothing.
///
///   candidates c = init .. n - local - 1;  s[h, c] = (q_h . k_{h / group, c}) / sqrt(head_dim)   (q: the mean of the rows)
///   p[h, c] = softmax over c of s[h, c];  v[c] = sum_h p[h, c];  top-k of v (ties: lower position first)
/// </summary>
public sealed unsafe class KvSelector
{
    private readonly CpuWorkerPool _pool;
    private readonly ScoreJob _job;
    private readonly int _heads;
    private readonly int _kvHeads;
    private readonly int _headDim;
    private readonly float[][] _cachedQuery;    // per layer [heads * head_dim]
    private readonly bool[] _valid;             // per layer: the cached query belongs to the list's middle part
    private readonly int[][] _indices;          // per layer [MaxIndices]
    private readonly int[] _counts;             // per layer
    private readonly float[] _query;            // [heads * head_dim] the step's mean query
    private readonly float[] _scores;           // [heads, capacity] per-head probabilities of the candidates
    private readonly float[] _votes;            // [capacity]
    private readonly int[] _histogram = new int[256];
    private long _selections;
    private long _hits;

    public KvSelector(KvSelectOptions options, int layers, int heads, int kvHeads, int headDim, int capacity, CpuWorkerPool? pool = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        if (heads <= 0 || kvHeads <= 0 || heads % kvHeads != 0)
        {
            throw new ArgumentException($"kv_select: {heads} query heads are not a multiple of {kvHeads} KV heads");
        }
        Options = options;
        Capacity = capacity;
        _pool = pool ?? CpuWorkerPool.Shared;
        _heads = heads;
        _kvHeads = kvHeads;
        _headDim = headDim;
        _cachedQuery = new float[layers][];
        _indices = new int[layers][];
        for (int layer = 0; layer < layers; layer++)
        {
            _cachedQuery[layer] = new float[heads * headDim];
            _indices[layer] = new int[options.MaxIndices];
        }
        _valid = new bool[layers];
        _counts = new int[layers];
        _query = new float[heads * headDim];
        _scores = new float[(long)heads * capacity];
        _votes = new float[capacity];
        _job = new ScoreJob(this);
    }

    public KvSelectOptions Options { get; }

    public int Capacity { get; }

    public KvSelectStatistics Statistics => new(_selections, _hits);

    /// <summary>Bytes of the selector's buffers (scores, votes, per-layer lists and cached queries).</summary>
    public long ByteLength => 4L * (_scores.LongLength + _votes.Length + _query.Length + _cachedQuery.Sum(q => (long)q.Length) + _indices.Sum(i => (long)i.Length));

    /// <summary>The soft votes of the layer's last new selection, candidate c at c - init (for tests and reports).</summary>
    public ReadOnlySpan<float> LastVotes(int context) => _votes.AsSpan(0, Math.Max(0, context - Options.Initial - Options.Local));

    /// <summary>Forgets every cached selection but keeps the counts (a rollback: the cached lists may name positions that
    /// are gone).</summary>
    public void Invalidate() => Array.Clear(_valid);

    /// <summary>Forgets every cached selection and the counts (a new sequence).</summary>
    public void Reset()
    {
        Array.Clear(_valid);
        Array.Clear(_counts);
        _selections = _hits = 0;
    }

    /// <summary>
    /// Selects for <paramref name="layer"/> given the step's queries q [tokens, heads * head_dim] (after RoPE) and the
    /// layer's cached keys. <paramref name="context"/>: positions the selection covers (decode: the cache length
    /// including the new token; a prefill chunk: its start). <paramref name="useCache"/>: whether a similar query may
    /// reuse the layer's last selection (decode). Returns false when the context is too short to select (full
    /// attention); else <paramref name="positions"/> is the ascending index list for <see cref="AttentionHook"/>.
    /// </summary>
    public bool Select(int layer, ReadOnlySpan<float> q, int tokens, KvCache cache, int context, bool useCache, out ReadOnlySpan<int> positions)
    {
        var options = Options;
        int width = _heads * _headDim;
        if (tokens < 1 || q.Length < (long)tokens * width)
        {
            throw new ArgumentException($"kv_select: q must hold {tokens} x {width} values");
        }
        if ((uint)layer >= (uint)_indices.Length || cache.KvHeads != _kvHeads || cache.HeadDim != _headDim || context > cache.Length || context > Capacity)
        {
            throw new ArgumentException($"kv_select: layer {layer} / context {context} do not fit the selector (layers {_indices.Length}, capacity {Capacity}) or the cache (length {cache.Length})");
        }
        if (!options.Selects(context))
        {
            _valid[layer] = false;
            positions = default;
            return false;
        }
        MeanQuery(q, tokens, _query);
        var indices = _indices[layer];
        if (useCache && options.UsesCache && _valid[layer] && Similar(_query, _cachedQuery[layer], options.CacheThreshold))
        {
            _hits++;
        }
        else
        {
            _selections++;
            _query.CopyTo(_cachedQuery[layer], 0);
            _valid[layer] = true;
            Votes(cache, layer, context);
            TopK(context, indices.AsSpan(options.Initial, options.TopK));
        }
        // The frame: init and local parts around the middle (cached or new).
        for (int i = 0; i < options.Initial; i++)
        {
            indices[i] = i;
        }
        for (int i = 0; i < options.Local; i++)
        {
            indices[options.Initial + options.TopK + i] = context - options.Local + i;
        }
        _counts[layer] = options.MaxIndices;
        positions = indices;
        return true;
    }

    /// <summary>Mean of the rows in fp32, rows added in order (as the kernels).</summary>
    private static void MeanQuery(ReadOnlySpan<float> q, int tokens, Span<float> mean)
    {
        int width = mean.Length;
        q[..width].CopyTo(mean);
        for (int t = 1; t < tokens; t++)
        {
            TensorPrimitives.Add(mean, q.Slice(t * width, width), mean);
        }
        if (tokens > 1)
        {
            TensorPrimitives.Multiply(mean, 1f / tokens, mean);
        }
    }

    /// <summary>cos(a, b) >= threshold, tested as a . b >= threshold |a| |b| in fp32 (no division), as the kernel.</summary>
    internal static bool Similar(ReadOnlySpan<float> a, ReadOnlySpan<float> b, float threshold)
    {
        float dot = TensorPrimitives.Dot(a, b);
        float normA = TensorPrimitives.Dot(a, a);
        float normB = TensorPrimitives.Dot(b, b);
        return normA > 0 && normB > 0 && dot >= threshold * MathF.Sqrt(normA) * MathF.Sqrt(normB);
    }

    /// <summary>Candidates per work item of the score job.</summary>
    private const int ScoreBlock = 512;

    /// <summary>The scores (in parallel over KV heads x blocks of candidates: each key row is read once for its whole GQA
    /// group), then per head the softmax over the candidates, then their sum over heads.</summary>
    private void Votes(KvCache cache, int layer, int context)
    {
        int candidates = context - Options.Initial - Options.Local;
        int blocks = (candidates + ScoreBlock - 1) / ScoreBlock;
        fixed (float* query = _query, scores = _scores)
        {
            _job.Query = query;
            _job.Scores = scores;
            _job.Cache = cache;
            _job.Layer = layer;
            _job.Candidates = candidates;
            _job.Blocks = blocks;
            _pool.Run(_job, _kvHeads * blocks, 1);
            _job.Cache = null;
            _job.Query = null;
            _job.Scores = null;
        }
        var votes = _votes.AsSpan(0, candidates);
        for (int h = 0; h < _heads; h++)
        {
            var row = _scores.AsSpan(h * Capacity, candidates);
            float max = TensorPrimitives.Max(row);
            TensorPrimitives.Subtract(row, max, row);
            TensorPrimitives.Exp(row, row);
            float inverse = 1f / TensorPrimitives.Sum(row);
            if (h == 0)
            {
                TensorPrimitives.Multiply(row, inverse, votes);
            }
            else
            {
                TensorPrimitives.MultiplyAdd(row, inverse, votes, votes);
            }
        }
    }

    private sealed class ScoreJob(KvSelector selector) : ParallelJob
    {
        public float* Query;
        public float* Scores;
        public KvCache? Cache;
        public int Layer;
        public int Candidates;
        public int Blocks;

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public override void Execute(int begin, int end, int worker)
        {
            int headDim = selector._headDim;
            int group = selector._heads / selector._kvHeads;
            float scale = 1f / MathF.Sqrt(headDim);
            for (int item = begin; item < end; item++)
            {
                int kv = item / Blocks;
                int first = item % Blocks * ScoreBlock;
                int last = Math.Min(Candidates, first + ScoreBlock);
                float* keys = Cache!.Keys(Layer, kv) + (long)selector.Options.Initial * headDim;
                for (int c = first; c < last; c++)
                {
                    var key = new ReadOnlySpan<float>(keys + (long)c * headDim, headDim);
                    for (int g = 0; g < group; g++)
                    {
                        int h = kv * group + g;
                        Scores[(long)h * selector.Capacity + c] = TensorPrimitives.Dot(new ReadOnlySpan<float>(Query + (long)h * headDim, headDim), key) * scale;
                    }
                }
            }
        }
    }

    /// <summary>The top-k candidates by vote, ascending positions, ties to the lower position: a 4-pass radix select on
    /// the votes' bits (non-negative floats order like their bits), then one ordered pass (as the kernels).</summary>
    private void TopK(int context, Span<int> destination)
    {
        int candidates = context - Options.Initial - Options.Local;
        var bits = System.Runtime.InteropServices.MemoryMarshal.Cast<float, uint>(_votes.AsSpan(0, candidates));
        var (threshold, equalNeeded) = RadixSelect(bits, destination.Length, _histogram);
        int written = 0, equal = 0;
        for (int c = 0; c < candidates; c++)
        {
            uint value = bits[c];
            if (value > threshold || (value == threshold && equal++ < equalNeeded))
            {
                destination[written++] = Options.Initial + c;
            }
        }
    }

    /// <summary>The bits of the k-th largest value and how many values equal to it belong to the top k.</summary>
    internal static (uint Threshold, int EqualNeeded) RadixSelect(ReadOnlySpan<uint> bits, int k, Span<int> histogram)
    {
        uint prefix = 0;
        int remaining = k;
        for (int pass = 0; pass < 4; pass++)
        {
            int shift = 24 - 8 * pass;
            uint highMask = pass == 0 ? 0u : 0xffffffffu << (shift + 8);
            histogram.Clear();
            foreach (uint value in bits)
            {
                if ((value & highMask) == prefix)
                {
                    histogram[(int)((value >> shift) & 0xff)]++;
                }
            }
            int bin = 255;
            while (bin > 0 && histogram[bin] < remaining)
            {
                remaining -= histogram[bin];
                bin--;
            }
            prefix |= (uint)bin << shift;
        }
        return (prefix, remaining);
    }
}
