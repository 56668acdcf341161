using KernelLM.Runtime;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Conformance;

/// <summary>
/// The kernel conformance suite (in the spirit of llama.cpp's test-backend-ops): every op, many shapes (odd
/// sizes, non-powers of two, large rows), every activation dtype a device computes in, on every device
/// (the CPU device; the emulated CUDA device, which executes the real kernels in CI; the real CUDA device when
/// one exists, else its cases are skipped with the reason), against the fp64 references with named per-dtype
/// tolerances. Inputs are first rounded to the dtype, so the reference and the device see identical values.
/// Test names read `rms_norm(cuda-emulated, BF16, rows=19, cols=111)`.
/// </summary>
[TestFixture]
public sealed partial class KernelConformanceTests
{
    [OneTimeTearDown]
    public void TearDown() => ConformanceDevices.DisposeAll();

    private static IEnumerable<TestCaseData> Cases(string op, Func<ConformanceDevice, IEnumerable<object[]>> shapes)
    {
        foreach (var device in ConformanceDevices.All)
        {
            foreach (object[] arguments in shapes(device))
            {
                string text = string.Join(", ", arguments.Select(a => a is KeyValuePair<string, int> pair ? $"{pair.Key}={pair.Value}" : a.ToString()));
                var values = arguments.Select(a => a is KeyValuePair<string, int> pair ? pair.Value : a).Prepend(device.Name).ToArray();
                yield return new TestCaseData(values).SetName($"{op}({device.Name}, {text})");
            }
        }
    }

    private static KeyValuePair<string, int> P(string name, int value) => new(name, value);

    /// <summary>Unit roundoff of storing a result in the dtype: fp32 2^-24, f16 2^-11, bf16 2^-8.</summary>
    private static double StorageRoundoff(DType dtype) => dtype switch
    {
        DType.F32 => Tolerances.UnitRoundoff,
        DType.F16 => 1.0 / 2048,
        _ => 1.0 / 256,
    };

    /// <summary>Smallest positive subnormal of the dtype: the absolute floor of its rounding error.</summary>
    private static double StorageFloor(DType dtype) => dtype == DType.F16 ? 5.96e-8 : 1e-38;

    private static float[] Random(int seed, int count, double scale = 1)
    {
        var random = new Random(seed);
        return Enumerable.Range(0, count).Select(_ => (float)((random.NextDouble() * 2 - 1) * scale)).ToArray();
    }

    private static void AssertClose(float[] actual, double[] expected, Func<int, double> tolerance, string what)
    {
        Assert.That(actual, Has.Length.EqualTo(expected.Length), what);
        for (int i = 0; i < expected.Length; i++)
        {
            double error = Math.Abs(actual[i] - expected[i]);
            if (!(error <= tolerance(i)))
            {
                Assert.Fail($"{what}: element {i} = {actual[i]}, reference {expected[i]} (|error| {error:E2} > {tolerance(i):E2})");
            }
        }
    }

    // ------------------------------------------------------------------ embedding

    public static IEnumerable<TestCaseData> EmbeddingCases() => Cases("embedding", device =>
        from table in new[] { DType.F32, DType.BF16, DType.F16 }
        from cols in new[] { 1, 33, 4097 }
        from tokens in new[] { 1, 7 }
        select new object[] { table, P("cols", cols), P("tokens", tokens) });

    [TestCaseSource(nameof(EmbeddingCases))]
    public void embedding(string deviceName, DType table, int cols, int tokens)
    {
        var device = ConformanceDevices.Get(deviceName);
        const int rows = 1000;
        var values = OpBackend.Representable(table, Random(cols + tokens, rows * cols, 3));
        int[] ids = Enumerable.Range(0, tokens).Select(t => (t * 379 + 11) % rows).ToArray();
        ids[^1] = rows - 1;
        var output = device.Embedding(table, values, rows, cols, ids);
        var expected = ids.SelectMany(id => values.Skip(id * cols).Take(cols)).Select(v => (double)v).ToArray();
        AssertClose(output, expected, _ => 0, $"embedding({table}, cols={cols}, tokens={tokens}) must widen exactly");
    }

    // ------------------------------------------------------------------ rms_norm

    public static IEnumerable<TestCaseData> RmsNormCases() => Cases("rms_norm", device =>
        from dtype in device.Activations
        from rows in new[] { 1, 19 }
        from cols in new[] { 1, 111, 4096, 8193 }
        select new object[] { dtype, P("rows", rows), P("cols", cols) });

    [TestCaseSource(nameof(RmsNormCases))]
    public void rms_norm(string deviceName, DType dtype, int rows, int cols)
    {
        var device = ConformanceDevices.Get(deviceName);
        var x = OpBackend.Representable(dtype, Random(rows * 7 + cols, rows * cols, 4));
        var weight = Random(cols, cols, 1.5);
        var output = device.RmsNorm(dtype, x, weight, 1e-5f);
        var expected = ReferenceOps.RmsNorm(x.Select(v => (double)v).ToArray(), rows, weight.Select(v => (double)v).ToArray(), 1e-5);
        AssertClose(output, expected, i => Tolerances.RmsNorm(cols, Math.Abs(expected[i])) + StorageRoundoff(dtype) * Math.Abs(expected[i]) + StorageFloor(dtype),
            $"rms_norm({dtype}, rows={rows}, cols={cols})");
    }

    // ------------------------------------------------------------------ rope

    public static IEnumerable<TestCaseData> RopeCases() => Cases("rope", device =>
        from dtype in device.Activations
        from tokens in new[] { 1, 7 }
        from heads in new[] { 3, 8 }
        from headDim in new[] { 6, 64, 128 }
        from start in new[] { 0, 1000 }
        select new object[] { dtype, P("tokens", tokens), P("heads", heads), P("head_dim", headDim), P("start", start) });

    [TestCaseSource(nameof(RopeCases))]
    public void rope(string deviceName, DType dtype, int tokens, int heads, int headDim, int start)
    {
        var device = ConformanceDevices.Get(deviceName);
        int half = headDim / 2;
        // llama3-scaled frequencies are just another inv_freq vector to the kernel; use a long position range.
        var inverse = Enumerable.Range(0, half).Select(i => 1f / MathF.Pow(500000f, 2f * i / headDim) / (i % 3 == 0 ? 8f : 1f)).ToArray();
        var x = OpBackend.Representable(dtype, Random(tokens * heads + headDim + start, tokens * heads * headDim, 2));
        var output = device.Rope(dtype, x, heads, headDim, start, inverse);
        var expected = ReferenceOps.Rope(x.Select(v => (double)v).ToArray(), tokens, heads, headDim, start, inverse.Select(v => (double)v).ToArray());
        AssertClose(output, expected, i =>
            {
                int position = start + i / (heads * headDim);
                return Tolerances.Rope(position, 2 * 2) + StorageRoundoff(dtype) * Math.Abs(expected[i]) + StorageFloor(dtype);
            },
            $"rope({dtype}, tokens={tokens}, heads={heads}, head_dim={headDim}, start={start})");
    }

    // ------------------------------------------------------------------ silu_mul, add

    public static IEnumerable<TestCaseData> ElementwiseCases(string op) => Cases(op, device =>
        from dtype in device.Activations
        from n in new[] { 1, 1001, 65537 }
        select new object[] { dtype, P("n", n) });

    public static IEnumerable<TestCaseData> SiluMulCases() => ElementwiseCases("silu_mul");

    public static IEnumerable<TestCaseData> AddCases() => ElementwiseCases("add");

    [TestCaseSource(nameof(SiluMulCases))]
    public void silu_mul(string deviceName, DType dtype, int n)
    {
        var device = ConformanceDevices.Get(deviceName);
        var gate = OpBackend.Representable(dtype, Random(n, n, 8));
        var up = OpBackend.Representable(dtype, Random(n + 1, n, 2));
        var output = device.SiluMultiply(dtype, gate, up);
        var expected = gate.Select((g, i) => ReferenceOps.Silu(g) * up[i]).ToArray();
        // exp, a division and two products in fp32: a few ulps of the result.
        AssertClose(output, expected, i => (8 * Tolerances.UnitRoundoff + StorageRoundoff(dtype)) * Math.Abs(expected[i]) + StorageFloor(dtype) + 1e-30,
            $"silu_mul({dtype}, n={n})");
    }

    [TestCaseSource(nameof(AddCases))]
    public void add(string deviceName, DType dtype, int n)
    {
        var device = ConformanceDevices.Get(deviceName);
        var y = OpBackend.Representable(dtype, Random(n + 2, n, 100));
        var x = OpBackend.Representable(dtype, Random(n + 3, n, 100));
        var output = device.Add(dtype, y, x);
        var expected = y.Select((v, i) => (double)v + x[i]).ToArray();
        AssertClose(output, expected, i => (Tolerances.UnitRoundoff + StorageRoundoff(dtype)) * Math.Abs(expected[i]) + StorageFloor(dtype),
            $"add({dtype}, n={n})");
    }

    // ------------------------------------------------------------------ convert

    private static readonly float[] EdgeValues =
    [
        0f, -0f, 1f, -1f, float.PositiveInfinity, float.NegativeInfinity, float.NaN, 65504f, 65520f, 1e6f, -1e6f,
        6.1e-5f, 5.96e-8f, 2.9e-8f, 3e-8f, 1e-9f, 1e-40f, 3.3895314e38f, 1f + 1f / 256, 1f + 3f / 256, 1f + 1f / 2048, 1f + 3f / 2048,
        0.1f, -2.5f, 1234.5678f,
    ];

    public static IEnumerable<TestCaseData> ConvertCases() => Cases("convert", device =>
        from pair in new[] { (DType.F32, DType.BF16), (DType.BF16, DType.F32), (DType.F32, DType.F16), (DType.F16, DType.F32) }
        select new object[] { pair.Item1, pair.Item2 });

    [TestCaseSource(nameof(ConvertCases))]
    public void convert(string deviceName, DType from, DType to)
    {
        var device = ConformanceDevices.Get(deviceName);
        var input = OpBackend.Representable(from, [.. EdgeValues, .. Random(5, 997, 1000)]);
        var output = device.Convert(from, to, input);
        // Narrowing must round to nearest even exactly like PyTorch / System.Half; widening is exact.
        var expected = OpBackend.Representable(to, input);
        for (int i = 0; i < input.Length; i++)
        {
            Assert.That(BitConverter.SingleToInt32Bits(output[i]), Is.EqualTo(BitConverter.SingleToInt32Bits(expected[i])).Or.Matches<int>(_ => float.IsNaN(output[i]) && float.IsNaN(expected[i])),
                $"convert({from} -> {to}) of {input[i]:R}: got {output[i]:R}, expected {expected[i]:R}");
        }
    }

    // ------------------------------------------------------------------ argmax

    public static IEnumerable<TestCaseData> ArgmaxCases() => Cases("argmax", device =>
        from dtype in device.Activations.Where(d => d != DType.F16)
        from rows in new[] { 1, 5 }
        from cols in new[] { 1, 2048, 128256 }
        select new object[] { dtype, P("rows", rows), P("cols", cols) });

    [TestCaseSource(nameof(ArgmaxCases))]
    public void argmax(string deviceName, DType dtype, int rows, int cols)
    {
        var device = ConformanceDevices.Get(deviceName);
        if (dtype != DType.F32)
        {
            }
        var x = OpBackend.Representable(dtype, Random(rows + cols, rows * cols, 10));
        var random = new Random(cols);
        for (int r = 0; r < rows; r++)
        {
            // A tie: the maximum twice; the lower index must win.
            int first = random.Next(cols);
            int second = random.Next(cols);
            x[r * cols + first] = 50;
            x[r * cols + second] = 50;
        }
        var output = device.Argmax(dtype, x, cols);
        var expected = Enumerable.Range(0, rows).Select(r => Array.IndexOf(x, x.Skip(r * cols).Take(cols).Max(), r * cols) - r * cols).ToArray();
        Assert.That(output, Is.EqualTo(expected), $"argmax({dtype}, rows={rows}, cols={cols})");
    }
}
