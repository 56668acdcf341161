using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Ops;
using KernelLM.Runtime.Sampling;

namespace KernelLM.Tests.Conformance;

/// <summary>
/// Sampling on the CUDA devices against the CPU sampler: on the same logits and the same uniform draw, the
/// short-list path (top-k or min-p set) must choose the CPU's token; the long path (no top-k, a flat row) must
/// keep exactly the tokens the definitions keep, with the right mass (checked on a grid of draws); the seeded
/// draw is deterministic and advances its counter; the repetition penalty matches the CPU's.
/// </summary>
[TestFixture]
public sealed class SamplingConformanceTests
{
    [OneTimeTearDown]
    public void TearDown() => ConformanceDevices.DisposeAll();

    private static IEnumerable<string> CudaDevices => ["cuda-emulated", "cuda"];

    private static CudaDevice Device(string name) => ((CudaOpBackend)ConformanceDevices.Get(name)).Device;

    private static float[] Logits(int vocabulary, int seed, double spread)
    {
        var random = new Random(seed);
        return Enumerable.Range(0, vocabulary).Select(_ => (float)((random.NextDouble() * 2 - 1) * spread)).ToArray();
    }

    private static int[] SampleOnDevice(CudaDevice device, DType dtype, float[] row, int vocabulary, SamplingOptions options, double[] uniforms)
    {
        int rows = uniforms.Length;
        var all = Enumerable.Repeat(row, rows).SelectMany(r => r).ToArray();
        using var logits = device.Allocate("logits", dtype, rows, vocabulary);
        logits.Upload<byte>(OpBackend.Encode(dtype, all));
        using var draws = device.Allocate("uniforms", DType.F64, rows);
        draws.Upload<double>(uniforms);
        using var output = device.Allocate("ids", DType.I32, rows);
        CudaOps.Sample(device, logits, vocabulary, options, output, draws, counters: null);
        return output.Download<int>();
    }

    public static IEnumerable<TestCaseData> ShortListCases() =>
        from device in CudaDevices
        from dtype in new[] { DType.F32, DType.BF16 }
        from vocabulary in new[] { 2048, 32000 }
        where dtype == DType.F32 || vocabulary == 2048
        from options in new[] { "t=0.8,k=40,p=0.95,minp=0.05", "t=1.3,k=5,p=1,minp=0", "t=0.7,k=0,p=1,minp=0.5", "t=1,k=2000,p=0.5,minp=0", "t=0,k=0,p=1,minp=0" }
        select new TestCaseData(device, dtype, vocabulary, options).SetName($"sample({device}, {dtype}, vocab={vocabulary}, {options})");

    private static SamplingOptions Parse(string text)
    {
        var fields = text.Split(',').Select(f => f.Split('=')).ToDictionary(f => f[0], f => float.Parse(f[1], System.Globalization.CultureInfo.InvariantCulture));
        return new SamplingOptions { Temperature = fields["t"], TopK = (int)fields["k"], TopP = fields["p"], MinP = fields["minp"], RepetitionPenalty = 1 };
    }

    [TestCaseSource(nameof(ShortListCases))]
    public void Short_list_path_chooses_the_cpu_samplers_token(string deviceName, DType dtype, int vocabulary, string optionText)
    {
        var device = Device(deviceName);
        var options = Parse(optionText);
        var row = Distinct(dtype, OpBackend.Representable(dtype, Logits(vocabulary, vocabulary + optionText.Length, 6)));
        var random = new Random(17);
        var uniforms = Enumerable.Range(0, 24).Select(_ => random.NextDouble()).ToArray();
        var chosen = SampleOnDevice(device, dtype, row, vocabulary, options, uniforms);
        var sampler = new Sampler(vocabulary);
        var expected = uniforms.Select(u => sampler.Sample(row, options, [], u)).ToArray();
        Assert.That(chosen, Is.EqualTo(expected), $"tokens for draws {string.Join(", ", uniforms.Select(u => u.ToString("F4", System.Globalization.CultureInfo.InvariantCulture)))}");
    }

    /// <summary>
    /// Makes every value distinct (moving duplicates down to the next representable value): the CPU sampler
    /// orders ties arbitrarily and keeps exactly k at a tied k-th value, the kernel orders ties by id and keeps
    /// them all, so the token-for-token comparison is defined only without ties (bf16 rows have many).
    /// </summary>
    private static float[] Distinct(DType dtype, float[] row)
    {
        var result = (float[])row.Clone();
        var order = Enumerable.Range(0, row.Length).OrderByDescending(i => row[i]).ToArray();
        for (int n = 1; n < order.Length; n++)
        {
            float previous = result[order[n - 1]];
            if (result[order[n]] >= previous)
            {
                result[order[n]] = dtype == DType.BF16
                    ? BFloat16.ToSingle((ushort)(BFloat16.FromSingle(previous) + (previous > 0 ? -1 : 1)))
                    : MathF.BitDecrement(previous);
            }
        }
        return result;
    }

    public static IEnumerable<TestCaseData> LongPathCases() =>
        from device in CudaDevices
        from topP in new[] { 1f, 0.9f, 0.3f }
        select new TestCaseData(device, topP).SetName($"sample_long_path({device}, vocab=3000, top_p={topP})");

    [TestCaseSource(nameof(LongPathCases))]
    public void Long_path_keeps_the_nucleus_with_the_right_mass(string deviceName, float topP)
    {
        const int vocabulary = 3000;
        const int draws = 100;
        var device = Device(deviceName);
        var options = new SamplingOptions { Temperature = 1, TopK = 0, TopP = topP, MinP = 0 };
        var row = Logits(vocabulary, 5, 1.5);
        // The definitions in fp64: sort, softmax, the shortest prefix reaching top_p.
        var order = Enumerable.Range(0, vocabulary).OrderByDescending(i => row[i]).ToArray();
        double max = row[order[0]];
        var weights = order.Select(i => Math.Exp(row[i] - max)).ToArray();
        double total = weights.Sum();
        int keep = vocabulary;
        double cumulative = 0;
        for (int i = 0; i < vocabulary && topP < 1; i++)
        {
            cumulative += weights[i] / total;
            if (cumulative >= topP)
            {
                keep = i + 1;
                break;
            }
        }
        double kept = weights.Take(keep).Sum();
        var probability = new Dictionary<int, double>();
        for (int i = 0; i < keep; i++)
        {
            probability[order[i]] = weights[i] / kept;
        }
        var uniforms = Enumerable.Range(0, draws).Select(j => (j + 0.5) / draws).ToArray();
        var chosen = SampleOnDevice(device, DType.F32, row, vocabulary, options, uniforms);
        Assert.That(chosen.Where(t => !probability.ContainsKey(t)), Is.Empty, "every choice is in the nucleus");
        // A grid of draws walking a fixed order: each token gets its mass x draws, within one draw either side.
        foreach (var group in chosen.GroupBy(t => t))
        {
            Assert.That(group.Count(), Is.EqualTo(probability[group.Key] * draws).Within(1.0 + 1e-6), $"draws of token {group.Key}");
        }
        int expectedTokens = probability.Count(p => p.Value * draws >= 1.0 + 1e-6);
        Assert.That(chosen.Distinct().Count(), Is.GreaterThanOrEqualTo(expectedTokens), "tokens with at least one draw's mass are drawn");
    }

    [TestCaseSource(nameof(CudaDevices))]
    public void Seeded_draws_are_deterministic_and_advance_the_counter(string deviceName)
    {
        const int vocabulary = 512;
        var device = Device(deviceName);
        var options = new SamplingOptions { Temperature = 1, TopK = 0, TopP = 1, MinP = 0 };
        var row = Logits(vocabulary, 9, 0.1);
        const int rows = 4;
        using var logits = device.Allocate("logits", DType.F32, rows, vocabulary);
        logits.Upload<float>(Enumerable.Repeat(row, rows).SelectMany(r => r).ToArray());
        using var output = device.Allocate("ids", DType.I32, rows);
        using var counters = device.Allocate("counters", DType.U64, rows);

        int[][] Run(ulong seed)
        {
            counters.Upload<ulong>(new ulong[rows]);
            var steps = new int[6][];
            for (int step = 0; step < steps.Length; step++)
            {
                CudaOps.Sample(device, logits, vocabulary, options, output, uniforms: null, counters, seed);
                steps[step] = output.Download<int>();
            }
            return steps;
        }

        var first = Run(42);
        var again = Run(42);
        var other = Run(43);
        Assert.That(again, Is.EqualTo(first), "same seed, same tokens");
        Assert.That(other, Is.Not.EqualTo(first), "another seed, other tokens");
        Assert.That(first.Select(s => s[0]).Distinct().Count(), Is.GreaterThan(1), "the counter advances: a near-flat row gives different tokens step to step");
        Assert.That(counters.Download<ulong>(), Has.All.EqualTo(6UL));
    }

    [TestCaseSource(nameof(CudaDevices))]
    public void Repetition_penalty_applies_once_per_distinct_token_and_clears_its_flags(string deviceName)
    {
        const int vocabulary = 300;
        var device = Device(deviceName);
        var row = Logits(vocabulary, 3, 4);
        int[] history = [5, 17, 5, 299, 17, 17, 0, 42, 42];
        int[] lengths = [7, 9];
        using var logits = device.Allocate("logits", DType.F32, 2, vocabulary);
        logits.Upload<float>(row.Concat(row).ToArray());
        using var historyTensor = device.Allocate("history", DType.I32, 2, history.Length);
        historyTensor.Upload<int>(history.Concat(history).ToArray());
        using var lengthTensor = device.Allocate("history_length", DType.I32, 2);
        lengthTensor.Upload<int>(lengths);
        using var flags = device.Allocate("flags", DType.I32, 2, vocabulary);
        flags.Upload<int>(new int[2 * vocabulary]);
        CudaOps.RepetitionPenalty(device, logits, vocabulary, historyTensor, lengthTensor, 1.3f, flags);
        var result = logits.Download<float>();
        for (int r = 0; r < 2; r++)
        {
            var seen = history.Take(lengths[r]).ToHashSet();
            for (int i = 0; i < vocabulary; i++)
            {
                float expected = seen.Contains(i) ? (row[i] > 0 ? row[i] / 1.3f : row[i] * 1.3f) : row[i];
                Assert.That(result[r * vocabulary + i], Is.EqualTo(expected), $"row {r}, token {i}");
            }
        }
        Assert.That(flags.Download<int>(), Has.All.Zero, "the scratch is zero again for the next step");
    }
}
