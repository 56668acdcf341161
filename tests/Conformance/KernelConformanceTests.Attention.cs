using KernelLM.Runtime;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Conformance;

/// <summary>
/// The attention family (kernels/attention.cu on the CUDA devices, CpuDevice.Attention on the CPU) against the fp64
/// ReferenceOps.Attention: GQA groups of 1, 3, 4, 5 and 16 (16 and 5 span two decode blocks, the latter unevenly), head_dim 32/64/80/96/128, batches whose sequences differ in
/// length, odd chunk sizes after a prefix, the sliding window, and the hook (a key bias with -inf masks, large
/// positive entries and one fully masked head; random sorted index lists with entries the queries must ignore).
/// Decode cases name their split count (0 = the launcher's choice; the emulated device reports 4 SMs, so that is
/// usually 1 and the merge kernel is covered by the forced counts).
/// </summary>
public sealed partial class KernelConformanceTests
{
    private const string NoHook = "none";
    private const string BiasHook = "bias";
    private const string IndexHook = "indices";
    private const string BothHooks = "bias+indices";
    // Compacted RoPE (TokenSelect's compacted positions): the caches hold keys before RoPE, q is unrotated.
    private const string RopeHook = "rope";
    private const string IndexRopeHook = "indices+rope";
    private const string AllHooks = "bias+indices+rope";

    private static bool HasBias(string hook) => hook.StartsWith("bias", StringComparison.Ordinal);
    private static bool HasIndices(string hook) => hook.Contains("indices", StringComparison.Ordinal);
    private static bool HasRope(string hook) => hook.EndsWith("rope", StringComparison.Ordinal);

    // ------------------------------------------------------------------ kv_append

    public static IEnumerable<TestCaseData> KvAppendCases() => Cases("kv_append", device =>
        from dtype in device.Activations
        from shape in new (int KvHeads, int HeadDim, int Batch, int Tokens, int Start)[] { (2, 64, 2, 7, 25), (2, 128, 1, 1, 1000), (1, 80, 2, 13, 3), (4, 32, 1, 111, 0) }
        select new object[] { dtype, P("kv_heads", shape.KvHeads), P("head_dim", shape.HeadDim), P("batch", shape.Batch), P("tokens", shape.Tokens), P("start", shape.Start) });

    [TestCaseSource(nameof(KvAppendCases))]
    public void kv_append(string deviceName, DType dtype, int kvHeads, int headDim, int batch, int tokens, int start)
    {
        var device = ConformanceDevices.Get(deviceName);
        int capacity = start + tokens + 4;
        int[] starts = Enumerable.Range(0, batch).Select(b => b == 0 ? start : start / 3).ToArray();
        int cacheElements = batch * kvHeads * capacity * headDim;
        var problem = new AttentionProblem(batch, kvHeads, kvHeads, headDim, capacity,
            OpBackend.Representable(dtype, Random(headDim + 1, cacheElements, 3)), OpBackend.Representable(dtype, Random(headDim + 2, cacheElements, 3)), 0);
        int rowWidth = kvHeads * headDim;
        var k = OpBackend.Representable(dtype, Random(tokens + 3, batch * tokens * rowWidth, 2));
        var v = OpBackend.Representable(dtype, Random(tokens + 4, batch * tokens * rowWidth, 2));
        var inverse = Enumerable.Range(0, headDim / 2).Select(i => 1f / MathF.Pow(500000f, 2f * i / headDim)).ToArray();

        var (keys, values) = device.KvAppend(dtype, problem, k, v, tokens, starts, inverse);

        string what = $"kv_append({dtype}, kv_heads={kvHeads}, head_dim={headDim}, batch={batch}, tokens={tokens}, start={start})";
        var expectedKeys = problem.Keys.Select(x => (double)x).ToArray();
        var expectedValues = problem.Values.Select(x => (double)x).ToArray();
        var written = new bool[cacheElements];
        for (int b = 0; b < batch; b++)
        {
            var rotated = ReferenceOps.Rope(k.Skip(b * tokens * rowWidth).Take(tokens * rowWidth).Select(x => (double)x).ToArray(), tokens, kvHeads, headDim,
                starts[b], inverse.Select(x => (double)x).ToArray());
            for (int t = 0; t < tokens; t++)
            {
                for (int h = 0; h < kvHeads; h++)
                {
                    for (int d = 0; d < headDim; d++)
                    {
                        int cache = ((b * kvHeads + h) * capacity + starts[b] + t) * headDim + d;
                        int source = (t * kvHeads + h) * headDim + d;
                        expectedKeys[cache] = rotated[source];
                        expectedValues[cache] = v[b * tokens * rowWidth + source];
                        written[cache] = true;
                    }
                }
            }
        }
        // Written keys: RoPE's bound at their position; values are copies; every other position is untouched.
        AssertClose(keys, expectedKeys, i =>
            {
                if (!written[i])
                {
                    return 0;
                }
                int position = i / headDim % capacity;
                return Tolerances.Rope(position, 2 * 2) + StorageRoundoff(dtype) * Math.Abs(expectedKeys[i]) + StorageFloor(dtype);
            }, what + " keys");
        AssertClose(values, expectedValues, _ => 0, what + " values");
    }

    public static IEnumerable<TestCaseData> KvAppendUnrotatedCases() => Cases("kv_append_unrotated", device =>
        from dtype in device.Activations
        from shape in new (int KvHeads, int HeadDim, int Batch, int Tokens, int Start)[] { (2, 64, 2, 7, 25), (1, 80, 1, 13, 1000) }
        select new object[] { dtype, P("kv_heads", shape.KvHeads), P("head_dim", shape.HeadDim), P("batch", shape.Batch), P("tokens", shape.Tokens), P("start", shape.Start) });

    /// <summary>TokenSelect's compacted positions store keys before RoPE by appending with a zero inv_freq: angle 0, cos 1,
    /// sin 0, so the keys (like the values) must be exact copies at their positions, at any position.</summary>
    [TestCaseSource(nameof(KvAppendUnrotatedCases))]
    public void kv_append_unrotated(string deviceName, DType dtype, int kvHeads, int headDim, int batch, int tokens, int start)
    {
        var device = ConformanceDevices.Get(deviceName);
        int capacity = start + tokens + 4;
        int[] starts = Enumerable.Range(0, batch).Select(b => b == 0 ? start : start / 3).ToArray();
        int cacheElements = batch * kvHeads * capacity * headDim;
        var problem = new AttentionProblem(batch, kvHeads, kvHeads, headDim, capacity,
            OpBackend.Representable(dtype, Random(headDim + 5, cacheElements, 3)), OpBackend.Representable(dtype, Random(headDim + 6, cacheElements, 3)), 0);
        int rowWidth = kvHeads * headDim;
        var k = OpBackend.Representable(dtype, Random(tokens + 7, batch * tokens * rowWidth, 2));
        var v = OpBackend.Representable(dtype, Random(tokens + 8, batch * tokens * rowWidth, 2));

        var (keys, values) = device.KvAppend(dtype, problem, k, v, tokens, starts, new float[headDim / 2]);

        var expectedKeys = (float[])problem.Keys.Clone();
        var expectedValues = (float[])problem.Values.Clone();
        for (int b = 0; b < batch; b++)
        {
            for (int t = 0; t < tokens; t++)
            {
                for (int h = 0; h < kvHeads; h++)
                {
                    int cache = ((b * kvHeads + h) * capacity + starts[b] + t) * headDim;
                    int source = b * tokens * rowWidth + (t * kvHeads + h) * headDim;
                    k.AsSpan(source, headDim).CopyTo(expectedKeys.AsSpan(cache, headDim));
                    v.AsSpan(source, headDim).CopyTo(expectedValues.AsSpan(cache, headDim));
                }
            }
        }
        string what = $"kv_append_unrotated({dtype}, kv_heads={kvHeads}, head_dim={headDim}, batch={batch}, tokens={tokens}, start={start})";
        Assert.That(keys, Is.EqualTo(expectedKeys), what + " keys");
        Assert.That(values, Is.EqualTo(expectedValues), what + " values");
    }

    // ------------------------------------------------------------------ attention_decode

    public static IEnumerable<TestCaseData> AttentionDecodeCases() => Cases("attention_decode", device =>
        from dtype in device.Activations
        from shape in new (int Heads, int KvHeads, int HeadDim, int Batch, int Length, int Window, int Splits, string Hook)[]
        {
            (8, 2, 64, 2, 300, 0, 0, NoHook),
            (8, 2, 64, 2, 300, 0, 3, NoHook),
            (8, 2, 64, 1, 1, 0, 0, NoHook),
            (32, 8, 128, 1, 4097, 0, 4, NoHook),
            (32, 8, 128, 2, 700, 0, 0, BiasHook),
            (4, 4, 32, 2, 129, 0, 2, NoHook),
            (12, 4, 80, 2, 200, 0, 3, NoHook),
            (16, 1, 64, 1, 150, 0, 2, NoHook),
            (10, 2, 96, 1, 150, 0, 2, NoHook),
            (8, 2, 64, 2, 300, 64, 3, NoHook),
            (8, 2, 128, 2, 257, 0, 2, BiasHook),
            (8, 2, 64, 2, 500, 0, 3, IndexHook),
            (8, 2, 64, 2, 500, 100, 3, IndexHook),
            (8, 2, 96, 2, 333, 0, 2, BothHooks),
            (8, 2, 64, 2, 300, 0, 3, RopeHook),
            (8, 2, 64, 2, 500, 0, 3, IndexRopeHook),
            (32, 8, 128, 1, 1100, 0, 0, IndexRopeHook),
            (12, 4, 80, 2, 200, 0, 1, IndexRopeHook),
            (8, 2, 64, 2, 500, 100, 2, IndexRopeHook),
            (8, 2, 96, 2, 333, 0, 2, AllHooks),
        }
        select new object[]
        {
            dtype, P("heads", shape.Heads), P("kv_heads", shape.KvHeads), P("head_dim", shape.HeadDim), P("batch", shape.Batch),
            P("length", shape.Length), P("window", shape.Window), P("splits", shape.Splits), shape.Hook,
        });

    [TestCaseSource(nameof(AttentionDecodeCases))]
    public void attention_decode(string deviceName, DType dtype, int heads, int kvHeads, int headDim, int batch, int length, int window, int splits, string hook)
    {
        var device = ConformanceDevices.Get(deviceName);
        // The second sequence is shorter: the batch's lengths differ.
        int[] lengths = Enumerable.Range(0, batch).Select(b => b == 0 ? length : Math.Max(1, length * 2 / 3 - 5)).ToArray();
        int capacity = length + 7;
        var problem = NewProblem(dtype, batch, heads, kvHeads, headDim, capacity, window, hook, seed: heads * 7 + length,
            selectBelow: b => lengths[b] - 1, mustSelect: b => lengths[b] - 1);
        var q = OpBackend.Representable(dtype, Random(length + headDim, batch * heads * headDim, 2));

        var output = device.AttentionDecode(dtype, problem, q, lengths, splits);

        string what = $"attention_decode({dtype}, heads={heads}, kv_heads={kvHeads}, head_dim={headDim}, batch={batch}, length={length}, window={window}, splits={splits}, {hook})";
        int width = heads * headDim;
        var expected = new double[batch * width];
        for (int b = 0; b < batch; b++)
        {
            Reference(problem, b, q.AsSpan(b * width, width), tokens: 1, start: lengths[b] - 1).CopyTo(expected, b * width);
        }
        AssertAttention(output, expected, problem, q, dtype, keys: window > 0 ? Math.Min(window, length) : length, what);
    }

    // ------------------------------------------------------------------ attention_prefill

    public static IEnumerable<TestCaseData> AttentionPrefillCases() => Cases("attention_prefill", device =>
        from dtype in device.Activations
        from shape in new (int Heads, int KvHeads, int HeadDim, int Batch, int Start, int Tokens, int Window, string Hook)[]
        {
            (8, 2, 64, 1, 0, 1, 0, NoHook),
            (8, 2, 64, 1, 0, 7, 0, NoHook),
            (8, 2, 64, 1, 0, 111, 0, NoHook),
            (8, 2, 64, 1, 500, 1, 0, NoHook),
            (8, 2, 64, 1, 500, 7, 0, NoHook),
            (8, 2, 64, 1, 500, 111, 0, NoHook),
            (8, 2, 64, 1, 500, 300, 0, NoHook),
            (8, 2, 128, 2, 200, 37, 0, NoHook),
            (4, 4, 32, 2, 50, 20, 0, NoHook),
            (12, 4, 80, 1, 50, 20, 0, NoHook),
            (16, 1, 64, 1, 20, 9, 0, NoHook),
            (8, 2, 64, 1, 500, 111, 64, NoHook),
            (8, 2, 64, 2, 100, 30, 0, BiasHook),
            (8, 2, 64, 1, 500, 40, 0, IndexHook),
            (8, 2, 128, 1, 300, 50, 40, IndexHook),
            (8, 2, 96, 2, 120, 17, 0, BothHooks),
            (8, 2, 64, 1, 100, 37, 0, RopeHook),
            (8, 2, 64, 2, 500, 40, 0, IndexRopeHook),
            (8, 2, 128, 1, 300, 50, 40, IndexRopeHook),
            (12, 4, 80, 1, 150, 20, 0, IndexRopeHook),
            (8, 2, 96, 2, 120, 17, 0, AllHooks),
        }
        select new object[]
        {
            dtype, P("heads", shape.Heads), P("kv_heads", shape.KvHeads), P("head_dim", shape.HeadDim), P("batch", shape.Batch),
            P("start", shape.Start), P("tokens", shape.Tokens), P("window", shape.Window), shape.Hook,
        });

    [TestCaseSource(nameof(AttentionPrefillCases))]
    public void attention_prefill(string deviceName, DType dtype, int heads, int kvHeads, int headDim, int batch, int start, int tokens, int window, string hook)
    {
        var device = ConformanceDevices.Get(deviceName);
        // The second sequence continues from a shorter prefix.
        int[] starts = Enumerable.Range(0, batch).Select(b => b == 0 ? start : start / 3 + 1).ToArray();
        int capacity = start + tokens + 5;
        // Index lists cover the prefix and also list chunk positions (>= start), which prefill must ignore.
        var problem = NewProblem(dtype, batch, heads, kvHeads, headDim, capacity, window, hook, seed: heads * 11 + start + tokens,
            selectBelow: b => starts[b] + tokens, mustSelect: _ => -1);
        var q = OpBackend.Representable(dtype, Random(start + tokens + headDim, batch * tokens * heads * headDim, 2));

        var output = device.AttentionPrefill(dtype, problem, q, tokens, starts);

        string what = $"attention_prefill({dtype}, heads={heads}, kv_heads={kvHeads}, head_dim={headDim}, batch={batch}, start={start}, tokens={tokens}, window={window}, {hook})";
        int width = tokens * heads * headDim;
        var expected = new double[batch * width];
        for (int b = 0; b < batch; b++)
        {
            Reference(problem, b, q.AsSpan(b * width, width), tokens, starts[b]).CopyTo(expected, b * width);
        }
        AssertAttention(output, expected, problem, q, dtype, keys: window > 0 ? Math.Min(window, start + tokens) : start + tokens, what);
    }

    // ------------------------------------------------------------------ helpers

    /// <summary>
    /// Random caches (values representable in the dtype) and the hook: a bias in [-2, 2] with about a fifth of the
    /// keys at -inf, a few boosted (+30 on even heads, +6 on odd ones), and the last head of sequence 0 masked
    /// entirely (it must come out as zeros); index lists of about a third of the positions below
    /// <paramref name="selectBelow"/>(b), plus <paramref name="mustSelect"/>(b) (decode's newest position) and one
    /// position past it, which attention must ignore.
    /// </summary>
    private static AttentionProblem NewProblem(DType dtype, int batch, int heads, int kvHeads, int headDim, int capacity, int window, string hook, int seed,
        Func<int, int> selectBelow, Func<int, int> mustSelect)
    {
        int cacheElements = batch * kvHeads * capacity * headDim;
        var problem = new AttentionProblem(batch, heads, kvHeads, headDim, capacity,
            OpBackend.Representable(dtype, Random(seed, cacheElements, 2)), OpBackend.Representable(dtype, Random(seed + 1, cacheElements, 3)), window);
        var random = new Random(seed + 2);
        float[]? bias = null;
        if (HasBias(hook))
        {
            bias = new float[batch * heads * capacity];
            for (int b = 0; b < batch; b++)
            {
                for (int h = 0; h < heads; h++)
                {
                    for (int j = 0; j < capacity; j++)
                    {
                        float value = (float)(random.NextDouble() * 4 - 2);
                        if ((j * 7 + h * 3 + b) % 5 == 0 || (b == 0 && h == heads - 1))
                        {
                            value = float.NegativeInfinity;
                        }
                        else if ((j * 13 + h) % 97 == 0)
                        {
                            value = h % 2 == 0 ? 30 : 6;
                        }
                        bias[(b * heads + h) * capacity + j] = value;
                    }
                }
            }
        }
        int[][]? selected = null;
        if (HasIndices(hook))
        {
            selected = new int[batch][];
            for (int b = 0; b < batch; b++)
            {
                var list = Enumerable.Range(0, Math.Min(selectBelow(b), capacity)).Where(_ => random.NextDouble() < 0.35).ToList();
                int newest = mustSelect(b);
                if (newest >= 0)
                {
                    list.RemoveAll(position => position >= newest);
                    list.Add(newest);
                    if (newest + 1 < capacity)
                    {
                        list.Add(newest + 1);
                    }
                }
                selected[b] = [.. list];
            }
        }
        // Compacted RoPE: inv_freq of rope_theta 10000, as RopeTable computes it (fp32).
        float[]? frequencies = HasRope(hook)
            ? Enumerable.Range(0, headDim / 2).Select(i => 1f / MathF.Pow(10000f, (float)(2 * i) / headDim)).ToArray()
            : null;
        return problem with { Bias = bias, Selected = selected, RopeInverseFrequencies = frequencies };
    }

    /// <summary>max |q . k| over the queries of each sequence (q: [batch, rows, heads, head_dim]) and every key of
    /// the KV head they read.</summary>
    private static double MaxAbsoluteDot(AttentionProblem problem, float[] q)
    {
        int headDim = problem.HeadDim, group = problem.Heads / problem.KvHeads;
        int rows = q.Length / (problem.Batch * problem.Heads * headDim);
        double max = 0;
        for (int b = 0; b < problem.Batch; b++)
        {
            for (int r = 0; r < rows; r++)
            {
                for (int h = 0; h < problem.Heads; h++)
                {
                    var query = q.AsSpan(((b * rows + r) * problem.Heads + h) * headDim, headDim);
                    for (int j = 0; j < problem.Capacity; j++)
                    {
                        var key = problem.Keys.AsSpan(((b * problem.KvHeads + h / group) * problem.Capacity + j) * headDim, headDim);
                        max = Math.Max(max, Math.Abs(System.Numerics.Tensors.TensorPrimitives.Dot(query, key)));
                    }
                }
            }
        }
        // The fp32 dot's own rounding is far below what the bound multiplies it by.
        return max;
    }

    /// <summary>The largest Euclidean norm of the rows of <paramref name="rows"/> (rows of <paramref name="width"/> values).</summary>
    private static double MaxNorm(float[] rows, int width)
    {
        double max = 0;
        for (int offset = 0; offset + width <= rows.Length; offset += width)
        {
            max = Math.Max(max, System.Numerics.Tensors.TensorPrimitives.Norm(rows.AsSpan(offset, width)));
        }
        return max;
    }

    /// <summary>ReferenceOps.Attention for sequence b: its cache in [position, kv_head, head_dim] order, its bias and list.</summary>
    private static double[] Reference(AttentionProblem problem, int b, ReadOnlySpan<float> q, int tokens, int start)
    {
        int kvHeads = problem.KvHeads, headDim = problem.HeadDim, capacity = problem.Capacity;
        var keys = new double[capacity * kvHeads * headDim];
        var values = new double[keys.Length];
        for (int h = 0; h < kvHeads; h++)
        {
            for (int j = 0; j < capacity; j++)
            {
                for (int d = 0; d < headDim; d++)
                {
                    int cache = ((b * kvHeads + h) * capacity + j) * headDim + d;
                    keys[(j * kvHeads + h) * headDim + d] = problem.Keys[cache];
                    values[(j * kvHeads + h) * headDim + d] = problem.Values[cache];
                }
            }
        }
        double[]? bias = problem.Bias?.Skip(b * problem.Heads * capacity).Take(problem.Heads * capacity).Select(x => (double)x).ToArray();
        var query = new double[q.Length];
        for (int i = 0; i < q.Length; i++)
        {
            query[i] = q[i];
        }
        if (problem.RopeInverseFrequencies is { } frequencies)
        {
            // Compacted RoPE: key j at its slot (its index in the list below start, m + (j - start) from start on, j
            // without a list; a key that is neither listed nor in the chunk is never visible), query t at m + t.
            int[]? list = problem.Selected?[b];
            int m = list is null ? start : list.Count(position => position < start);
            for (int j = 0; j < capacity; j++)
            {
                int slot = list is null ? j : j >= start ? m + (j - start) : Math.Max(0, Array.IndexOf(list, j));
                for (int h = 0; h < kvHeads; h++)
                {
                    RotateReference(keys.AsSpan((j * kvHeads + h) * headDim, headDim), slot, frequencies);
                }
            }
            for (int t = 0; t < tokens; t++)
            {
                for (int h = 0; h < problem.Heads; h++)
                {
                    RotateReference(query.AsSpan((t * problem.Heads + h) * headDim, headDim), m + t, frequencies);
                }
            }
        }
        return ReferenceOps.Attention(query, tokens, problem.Heads, keys, values, kvHeads, headDim, start, problem.Window, bias, capacity, problem.Selected?[b]);
    }

    /// <summary>Rotate-half in fp64 with the kernels' fp32 angle (slot x inv_freq rounded to fp32), as rope.cu.</summary>
    private static void RotateReference(Span<double> row, int slot, float[] frequencies)
    {
        int half = row.Length / 2;
        for (int i = 0; i < half; i++)
        {
            double angle = (float)slot * frequencies[i];
            double x = row[i], y = row[i + half];
            row[i] = x * Math.Cos(angle) - y * Math.Sin(angle);
            row[i + half] = y * Math.Cos(angle) + x * Math.Sin(angle);
        }
    }

    /// <summary>Tolerances.Attention over at most <paramref name="keys"/> keys, with the largest |score| of the data
    /// (every query against every cached key of its sequence and KV head, plus the largest finite |bias|) and |v|,
    /// plus the output's storage rounding.</summary>
    private static void AssertAttention(float[] output, double[] expected, AttentionProblem problem, float[] q, DType dtype, int keys, string what)
    {
        double maxBias = problem.Bias?.Where(float.IsFinite).Select(x => Math.Abs(x)).DefaultIfEmpty(0f).Max() ?? 0;
        double maxValue = problem.Values.Max(x => Math.Abs(x));
        double maxScore, bound;
        if (problem.RopeInverseFrequencies is null)
        {
            maxScore = MaxAbsoluteDot(problem, q) / Math.Sqrt(problem.HeadDim) + maxBias;
            bound = Tolerances.Attention(problem.HeadDim, keys, maxScore, maxValue);
        }
        else
        {
            // Rotation keeps norms: |q_rot . k_rot| <= |q| |k|; the fp32 rotation of both adds its own score error.
            double normProduct = MaxNorm(q, problem.HeadDim) * MaxNorm(problem.Keys, problem.HeadDim);
            maxScore = normProduct / Math.Sqrt(problem.HeadDim) + maxBias;
            bound = Tolerances.Attention(problem.HeadDim, keys, maxScore, maxValue)
                    + 2 * Tolerances.CompactedRopeScore(normProduct) / Math.Sqrt(problem.HeadDim) * maxValue;
        }
        AssertClose(output, expected, i => bound + StorageRoundoff(dtype) * Math.Abs(expected[i]) + StorageFloor(dtype), what);
        if (problem.Bias is not null)
        {
            // The fully masked head of sequence 0 is exactly zero everywhere (not NaN).
            int width = problem.Heads * problem.HeadDim;
            for (int t = 0; t < expected.Length / problem.Batch / width; t++)
            {
                int offset = t * width + (problem.Heads - 1) * problem.HeadDim;
                Assert.That(output.AsSpan(offset, problem.HeadDim).ToArray(), Is.All.EqualTo(0f), $"{what}: a query that sees no key");
            }
        }
    }
}
