using KernelLM.Runtime;
using KernelLM.Runtime.Cpu;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Cpu;

/// <summary>
/// Every CPU op against the fp64 reference in <see cref="ReferenceOps"/>, odd sizes included, with a guard
/// region of sentinels after each output to catch out-of-bounds writes.
/// </summary>
[TestFixture]
public sealed unsafe class CpuOpsTests
{
    private const int Guard = 37;
    private const float Sentinel = -7.77e7f;
    private CpuDevice _device = null!;

    [OneTimeSetUp]
    public void SetUp() => _device = new CpuDevice(threads: 2, scratchFloats: 4096);

    [OneTimeTearDown]
    public void TearDown() => _device.Dispose();

    private static float[] Random(Random random, int count, double scale = 1)
    {
        var values = new float[count];
        for (int i = 0; i < count; i++)
        {
            values[i] = (float)((random.NextDouble() * 2 - 1) * scale);
        }
        return values;
    }

    private static float[] WithGuard(int count, Random? fill = null)
    {
        var values = new float[count + Guard];
        for (int i = 0; i < count; i++)
        {
            values[i] = fill is null ? 0 : (float)(fill.NextDouble() - 0.5);
        }
        values.AsSpan(count).Fill(Sentinel);
        return values;
    }

    private static void AssertGuard(float[] values, int count, string op)
    {
        for (int i = count; i < values.Length; i++)
        {
            Assert.That(values[i], Is.EqualTo(Sentinel), $"{op}: wrote past its output at element {i} (output has {count})");
        }
    }

    /// <summary>Stores w (fp32 values) in the given dtype and returns the stored bytes and their exact fp32 widening.</summary>
    private static (byte[] Bytes, double[] Widened) Store(float[] w, DType dtype)
    {
        var widened = new double[w.Length];
        byte[] bytes;
        switch (dtype)
        {
            case DType.F32:
                bytes = new byte[w.Length * 4];
                Buffer.BlockCopy(w, 0, bytes, 0, bytes.Length);
                for (int i = 0; i < w.Length; i++)
                {
                    widened[i] = w[i];
                }
                break;
            case DType.F16:
                bytes = new byte[w.Length * 2];
                for (int i = 0; i < w.Length; i++)
                {
                    var half = (Half)w[i];
                    BitConverter.TryWriteBytes(bytes.AsSpan(i * 2), half);
                    widened[i] = (double)(float)half;
                }
                break;
            default:
                bytes = new byte[w.Length * 2];
                for (int i = 0; i < w.Length; i++)
                {
                    ushort bits = BFloat16.FromSingle(w[i]);
                    BitConverter.TryWriteBytes(bytes.AsSpan(i * 2), bits);
                    widened[i] = BFloat16.ToSingle(bits);
                }
                break;
        }
        return (bytes, widened);
    }

    private static IEnumerable<TestCaseData> LinearCases()
    {
        foreach (var dtype in new[] { DType.BF16, DType.F16, DType.F32 })
        {
            foreach (var (tokens, rows, cols, bias, accumulate) in new[]
                     {
                         (1, 111, 500, false, false), (1, 64, 33, true, false), (5, 19, 111, true, true),
                         (4, 256, 256, false, false), (9, 130, 1000, false, true), (1, 7, 3, true, false), (2, 1, 1, false, false),
                     })
            {
                string name = $"linear({dtype.ToString().ToLowerInvariant()}, tokens={tokens}, rows={rows}, cols={cols}{(bias ? ", bias" : "")}{(accumulate ? ", accumulate" : "")})";
                yield return new TestCaseData(dtype, tokens, rows, cols, bias, accumulate).SetName(name);
            }
        }
    }

    [TestCaseSource(nameof(LinearCases))]
    public void Linear_matches_fp64_reference(DType dtype, int tokens, int rows, int cols, bool withBias, bool accumulate)
    {
        var random = new Random(rows * 31 + cols);
        var (bytes, widened) = Store(Random(random, rows * cols), dtype);
        var x = Random(random, tokens * cols, 2);
        var bias = withBias ? Random(random, rows) : [];
        var y = WithGuard(tokens * rows, accumulate ? random : null);
        var initial = (float[])y.Clone();

        fixed (byte* data = bytes)
        {
            var weight = new WeightMatrix("w", dtype, rows, cols, data);
            _device.Linear(x, tokens, weight, bias, y.AsSpan(0, tokens * rows), accumulate);
        }

        var xd = x.Select(v => (double)v).ToArray();
        var expected = ReferenceOps.Linear(xd, tokens, widened, rows, cols, withBias ? bias.Select(v => (double)v).ToArray() : null);
        var magnitude = ReferenceOps.LinearMagnitude(xd, tokens, widened, rows, cols);
        for (int i = 0; i < tokens * rows; i++)
        {
            double reference = expected[i] + (accumulate ? initial[i] : 0);
            double tolerance = Tolerances.DotProduct(cols + 2, magnitude[i] + Math.Abs(reference) + (withBias ? 1 : 0));
            Assert.That(y[i], Is.EqualTo(reference).Within(tolerance), $"element {i} (token {i / rows}, row {i % rows})");
        }
        AssertGuard(y, tokens * rows, "linear");
    }

    [TestCase(1, 111, TestName = "rms_norm(rows=1, cols=111)")]
    [TestCase(19, 111, TestName = "rms_norm(rows=19, cols=111)")]
    [TestCase(3, 4096, TestName = "rms_norm(rows=3, cols=4096)")]
    public void RmsNorm_matches_fp64_reference(int rows, int cols)
    {
        var random = new Random(cols);
        var x = Random(random, rows * cols, 3);
        var weight = Random(random, cols, 1.5);
        var y = WithGuard(rows * cols);
        CpuDevice.RmsNorm(x, weight, 1e-5f, y.AsSpan(0, rows * cols), rows);
        var expected = ReferenceOps.RmsNorm(x.Select(v => (double)v).ToArray(), rows, weight.Select(v => (double)v).ToArray(), 1e-5);
        for (int i = 0; i < rows * cols; i++)
        {
            Assert.That(y[i], Is.EqualTo(expected[i]).Within(Tolerances.RmsNorm(cols, Math.Abs(expected[i]))), $"element {i}");
        }
        AssertGuard(y, rows * cols, "rms_norm");
    }

    [TestCase(1, 8, 32, 0, TestName = "rope(tokens=1, heads=8, head_dim=32, start=0)")]
    [TestCase(7, 3, 64, 100, TestName = "rope(tokens=7, heads=3, head_dim=64, start=100)")]
    [TestCase(5, 2, 6, 1500, TestName = "rope(tokens=5, heads=2, head_dim=6, start=1500)")]
    public void Rope_matches_fp64_reference(int tokens, int heads, int headDim, int start)
    {
        var random = new Random(headDim + start);
        int half = headDim / 2;
        var inverse = Enumerable.Range(0, half).Select(i => 1f / MathF.Pow(10000f, 2f * i / headDim)).ToArray();
        int positions = start + tokens;
        var cos = new float[positions * half];
        var sin = new float[positions * half];
        for (int p = 0; p < positions; p++)
        {
            for (int i = 0; i < half; i++)
            {
                float angle = p * inverse[i];
                cos[p * half + i] = MathF.Cos(angle);
                sin[p * half + i] = MathF.Sin(angle);
            }
        }
        var x = Random(random, tokens * heads * headDim);
        var y = WithGuard(x.Length);
        x.CopyTo(y, 0);
        CpuDevice.Rope(y.AsSpan(0, x.Length), tokens, heads, headDim, start, cos, sin);
        var expected = ReferenceOps.Rope(x.Select(v => (double)v).ToArray(), tokens, heads, headDim, start, inverse.Select(v => (double)v).ToArray());
        for (int i = 0; i < x.Length; i++)
        {
            int position = start + i / (heads * headDim);
            Assert.That(y[i], Is.EqualTo(expected[i]).Within(Tolerances.Rope(position, 2)), $"element {i}");
        }
        AssertGuard(y, x.Length, "rope");
    }

    [TestCase(1, 8, 4, 32, 0, 0, TestName = "attention(tokens=1, heads=8, kv_heads=4, head_dim=32, start=0)")]
    [TestCase(1, 8, 2, 64, 300, 0, TestName = "attention(tokens=1, heads=8, kv_heads=2, head_dim=64, start=300)")]
    [TestCase(13, 6, 6, 16, 5, 0, TestName = "attention(tokens=13, heads=6, kv_heads=6, head_dim=16, start=5)")]
    [TestCase(11, 4, 1, 24, 20, 7, TestName = "attention(tokens=11, heads=4, kv_heads=1, head_dim=24, start=20, window=7)")]
    public void Attention_matches_fp64_reference(int tokens, int heads, int kvHeads, int headDim, int start, int window)
    {
        var random = new Random(heads * 100 + start);
        int positions = start + tokens;
        using var cache = new KvCache(layers: 2, kvHeads, headDim, capacity: positions + 3);
        var keys = Random(random, positions * kvHeads * headDim, 2);
        var values = Random(random, positions * kvHeads * headDim, 3);
        cache.Write(1, 0, positions, keys, values);
        cache.Length = positions;
        var q = Random(random, tokens * heads * headDim, 2);
        var output = WithGuard(q.Length);
        _device.Attention(q, cache, 1, heads, start, tokens, window, output.AsSpan(0, q.Length));
        var expected = ReferenceOps.Attention(q.Select(v => (double)v).ToArray(), tokens, heads, keys.Select(v => (double)v).ToArray(),
            values.Select(v => (double)v).ToArray(), kvHeads, headDim, start, window);
        double maxScore = 2 * 2 * headDim / Math.Sqrt(headDim);
        for (int i = 0; i < q.Length; i++)
        {
            Assert.That(output[i], Is.EqualTo(expected[i]).Within(Tolerances.Attention(headDim, positions, maxScore, 3)), $"element {i}");
        }
        AssertGuard(output, q.Length, "attention");
    }

    [Test]
    public void Attention_reads_only_its_layer_and_kv_head()
    {
        // Poison every other layer and head: a wrong GQA mapping or layer offset turns the output into NaN.
        const int heads = 4, kvHeads = 2, headDim = 8, positions = 6;
        using var cache = new KvCache(layers: 3, kvHeads, headDim, capacity: positions);
        var poison = Enumerable.Repeat(float.NaN, positions * kvHeads * headDim).ToArray();
        cache.Write(0, 0, positions, poison, poison);
        cache.Write(2, 0, positions, poison, poison);
        var random = new Random(5);
        var keys = Random(random, positions * kvHeads * headDim);
        var values = Random(random, positions * kvHeads * headDim);
        cache.Write(1, 0, positions, keys, values);
        cache.Length = positions;
        var q = Random(random, heads * headDim);
        var output = new float[heads * headDim];
        _device.Attention(q, cache, 1, heads, positions - 1, 1, 0, output);
        Assert.That(output.All(float.IsFinite), Is.True);
        var expected = ReferenceOps.Attention(q.Select(v => (double)v).ToArray(), 1, heads, keys.Select(v => (double)v).ToArray(),
            values.Select(v => (double)v).ToArray(), kvHeads, headDim, positions - 1, 0);
        Assert.That(output.Select(v => (double)v), Is.EqualTo(expected).Within(1e-5));
    }

    [Test]
    public void Attention_hook_that_changes_nothing_gives_the_same_bits()
    {
        // A zero bias and a selection of every prefix position take the hooked path; the result must not move.
        const int heads = 6, kvHeads = 3, headDim = 16, start = 9, tokens = 5, window = 7;
        int positions = start + tokens;
        using var cache = new KvCache(layers: 1, kvHeads, headDim, capacity: positions + 2);
        var random = new Random(8);
        cache.Write(0, 0, positions, Random(random, positions * kvHeads * headDim), Random(random, positions * kvHeads * headDim));
        cache.Length = positions;
        var q = Random(random, tokens * heads * headDim, 2);
        var plain = new float[q.Length];
        _device.Attention(q, cache, 0, heads, start, tokens, window, plain);
        var hooked = new float[q.Length];
        var zeros = new float[heads * cache.Capacity];
        int[] everything = Enumerable.Range(0, start).ToArray();
        _device.Attention(q, cache, 0, heads, start, tokens, window, hooked, new AttentionHook { KeyBias = zeros, SelectedPositions = everything });
        Assert.That(hooked, Is.EqualTo(plain));
    }

    [Test]
    public void Attention_hook_is_validated()
    {
        using var cache = new KvCache(layers: 1, kvHeads: 1, headDim: 8, capacity: 10);
        cache.Length = 4;
        var q = new float[8];
        var output = new float[8];
        Assert.That(() => _device.Attention(q, cache, 0, 1, 3, 1, 0, output, new AttentionHook { KeyBias = new float[9] }),
            Throws.ArgumentException.With.Message.Contains("key bias holds 9 values"));
        Assert.That(() => _device.Attention(q, cache, 0, 1, 3, 1, 0, output, new AttentionHook { SelectedPositions = new[] { 0, 2, 2 } }),
            Throws.ArgumentException.With.Message.Contains("not strictly ascending"));
        Assert.That(() => _device.Attention(q, cache, 0, 1, 3, 1, 0, output, new AttentionHook { SelectedPositions = new[] { 10 } }),
            Throws.ArgumentException.With.Message.Contains("capacity 10"));
        // Compacted RoPE tables: cos and sin of the same length, at least [positions, head_dim / 2] = [4, 4].
        Assert.That(() => _device.Attention(q, cache, 0, 1, 3, 1, 0, output, new AttentionHook { RopeCos = new float[16], RopeSin = new float[12] }),
            Throws.ArgumentException.With.Message.Contains("compacted RoPE tables hold 16 cos and 12 sin"));
        Assert.That(() => _device.Attention(q, cache, 0, 1, 3, 1, 0, output, new AttentionHook { RopeCos = new float[12], RopeSin = new float[12] }),
            Throws.ArgumentException.With.Message.Contains("[positions 4, head_dim / 2 = 4]"));
    }

    [TestCase(1, TestName = "silu_mul(n=1)")]
    [TestCase(1001, TestName = "silu_mul(n=1001)")]
    public void SiluMultiply_matches_fp64_reference(int n)
    {
        var random = new Random(n);
        var gate = Random(random, n, 8);
        var up = Random(random, n, 2);
        var result = (float[])gate.Clone();
        CpuDevice.SiluMultiply(result, up, new float[n]);
        for (int i = 0; i < n; i++)
        {
            double expected = ReferenceOps.Silu(gate[i]) * up[i];
            Assert.That(result[i], Is.EqualTo(expected).Within(1e-6 * (1 + Math.Abs(expected))), $"element {i}");
        }
    }

    [TestCase(DType.BF16)]
    [TestCase(DType.F16)]
    [TestCase(DType.F32)]
    public void Embedding_widens_the_row_exactly(DType dtype)
    {
        var random = new Random(3);
        const int rows = 17, cols = 45;
        var (bytes, widened) = Store(Random(random, rows * cols), dtype);
        var row = WithGuard(cols);
        fixed (byte* data = bytes)
        {
            var table = new WeightMatrix("embed", dtype, rows, cols, data);
            CpuDevice.Embedding(table, 13, row.AsSpan(0, cols));
            Assert.That(() => CpuDevice.Embedding(table, rows, row.AsSpan(0, cols)), Throws.InstanceOf<ArgumentOutOfRangeException>().With.Message.Contains("embed"));
        }
        Assert.That(row.Take(cols).Select(v => (double)v), Is.EqualTo(widened.Skip(13 * cols).Take(cols)));
        AssertGuard(row, cols, "embedding");
    }

    [Test]
    public void Bf16_round_trip_rounds_to_nearest_even()
    {
        Assert.Multiple(() =>
        {
            Assert.That(BFloat16.FromSingle(1f), Is.EqualTo(0x3F80));
            // 1 + 2^-8 is exactly half-way between 1 and the next bf16 (1 + 2^-7): ties go to even (1).
            Assert.That(BFloat16.FromSingle(1f + 1f / 256), Is.EqualTo(0x3F80));
            Assert.That(BFloat16.FromSingle(1f + 3f / 256), Is.EqualTo(0x3F82));
            Assert.That(float.IsNaN(BFloat16.ToSingle(BFloat16.FromSingle(float.NaN))), Is.True);
            Assert.That(BFloat16.ToSingle(BFloat16.FromSingle(-2.5f)), Is.EqualTo(-2.5f));
        });
        var source = Enumerable.Range(0, 37).Select(i => (ushort)(0x3F00 + i * 17)).ToArray();
        var widened = new float[37];
        BFloat16.ToSingle(source, widened);
        for (int i = 0; i < source.Length; i++)
        {
            Assert.That(widened[i], Is.EqualTo(BitConverter.Int32BitsToSingle(source[i] << 16)));
        }
    }

    [Test]
    public void Linear_rejects_mismatched_shapes_naming_the_weight()
    {
        var bytes = new byte[4 * 6 * 2];
        fixed (byte* data = bytes)
        {
            var weight = new WeightMatrix("model.layers.3.mlp.up_proj.weight", DType.BF16, 4, 6, data);
            Assert.That(() => _device.Linear(new float[5], 1, weight, default, new float[4]),
                Throws.ArgumentException.With.Message.Contains("model.layers.3.mlp.up_proj.weight"));
            Assert.That(() => _device.Linear(new float[6], 1, weight, default, new float[3]),
                Throws.ArgumentException.With.Message.Contains("output"));
            Assert.That(() => _device.Linear(new float[6], 1, weight, new float[3], new float[4]),
                Throws.ArgumentException.With.Message.Contains("bias"));
        }
    }

    [Test]
    public void Worker_pool_covers_every_index_once_and_propagates_errors()
    {
        using var pool = new CpuWorkerPool(3);
        var job = new CountingJob(10_007);
        for (int round = 0; round < 20; round++)
        {
            pool.Run(job, 10_007, grain: 13 + round);
        }
        Assert.That(job.Counts.All(c => c == 20), Is.True, "every index executed exactly once per dispatch");
        Assert.That(() => pool.Run(new FailingJob(), 100, 1), Throws.InvalidOperationException.With.Message.EqualTo("job failed"));
        pool.Run(job, 10_007, 50);
        Assert.That(job.Counts.All(c => c == 21), Is.True, "the pool still works after a failed job");
    }

    [Test]
    public void Worker_pool_never_runs_a_job_after_its_dispatch_returned()
    {
        // Alternate dispatches of very different sizes: a worker waking late for an earlier dispatch must not
        // claim items (of a later, larger one) nor run an earlier job once its Run has returned.
        using var pool = new CpuWorkerPool(3);
        var small = new ArmedJob(3);
        var large = new ArmedJob(997);
        for (int round = 0; round < 4000; round++)
        {
            var job = round % 3 == 0 ? large : small;
            job.Armed = true;
            pool.Run(job, job.Counts.Length, 1 + round % 5);
            job.Armed = false;
        }
        Assert.Multiple(() =>
        {
            Assert.That(small.StaleRuns + large.StaleRuns, Is.Zero, "executions outside their dispatch");
            Assert.That(small.Counts.Distinct(), Is.EqualTo(new[] { 4000 - 1334 }), "each small item once per dispatch");
            Assert.That(large.Counts.Distinct(), Is.EqualTo(new[] { 1334 }), "each large item once per dispatch");
        });
    }

    private sealed class ArmedJob(int count) : ParallelJob
    {
        private int _staleRuns;

        public volatile bool Armed;

        public int[] Counts { get; } = new int[count];

        public int StaleRuns => _staleRuns;

        public override void Execute(int begin, int end, int worker)
        {
            if (!Armed || end > Counts.Length)
            {
                Interlocked.Increment(ref _staleRuns);
                return;
            }
            for (int i = begin; i < end; i++)
            {
                Interlocked.Increment(ref Counts[i]);
            }
        }
    }

    private sealed class CountingJob(int count) : ParallelJob
    {
        public int[] Counts { get; } = new int[count];

        public override void Execute(int begin, int end, int worker)
        {
            for (int i = begin; i < end; i++)
            {
                Interlocked.Increment(ref Counts[i]);
            }
        }
    }

    private sealed class FailingJob : ParallelJob
    {
        public override void Execute(int begin, int end, int worker) => throw new InvalidOperationException("job failed");
    }
}
