using KernelLM.Runtime;
using KernelLM.Runtime.Signals;
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

    public static IEnumerable<TestCaseData> GemvCases() => Cases("gemv", device =>
        from dtype in device.Activations
        from shape in new[] { (1, 8), (7, 100), (37, 256), (64, 2048), (300, 264) }
        from tokens in new[] { 1, 3, 8 }
        where tokens == 1 || shape.Item1 <= 64
        from extras in new[] { 0, 1, 2 }
        where extras == 0 || (shape.Item1 == 37 && tokens == 3)
        select new object[] { dtype, P("rows", shape.Item1), P("cols", shape.Item2), P("tokens", tokens), P("bias", extras & 1), P("residual", extras >> 1) });

    /// <summary>The decode GEMV: a dot product per output (fp32 accumulation) plus bias, residual and the
    /// storage rounding of the output dtype. cols 100 and 264 are not multiples of the 16-byte vector (the
    /// scalar path); 300 rows leave a partial block.</summary>
    [TestCaseSource(nameof(GemvCases))]
    public void gemv(string deviceName, DType dtype, int rows, int cols, int tokens, int bias, int residual) =>
        CheckLinear("gemv", deviceName, dtype, rows, cols, tokens, bias, residual);

    public static IEnumerable<TestCaseData> GemmCases() => Cases("gemm", device =>
        from dtype in device.Activations
        from shape in new[] { (1, 1, 1), (7, 100, 9), (64, 64, 64), (130, 33, 77), (96, 512, 128) }
        from extras in new[] { 0, 3 }
        where extras == 0 || shape.Item1 == 130
        select new object[] { dtype, P("rows", shape.Item1), P("cols", shape.Item2), P("tokens", shape.Item3), P("bias", extras & 1), P("residual", extras >> 1) });

    /// <summary>The prefill GEMM: the same bound as the GEMV; shapes straddle the 64 x 64 tile and the 16-wide K step.</summary>
    [TestCaseSource(nameof(GemmCases))]
    public void gemm(string deviceName, DType dtype, int rows, int cols, int tokens, int bias, int residual) =>
        CheckLinear("gemm", deviceName, dtype, rows, cols, tokens, bias, residual);

    public static IEnumerable<TestCaseData> LinearCases() => Cases("linear", device =>
        from dtype in device.Activations
        from shape in new[] { (96, 256, 9), (130, 33, 77), (256, 512, 128) }
        from extras in new[] { 0, 1, 2, 3 }
        where extras == 0 || shape.Item1 == 130
        select new object[] { dtype, P("rows", shape.Item1), P("cols", shape.Item2), P("tokens", shape.Item3), P("bias", extras & 1), P("residual", extras >> 1) });

    /// <summary>The product model code runs for a prefill chunk (CudaOps.Linear beyond the GEMV's 8 tokens): cuBLAS
    /// (cublasGemmEx, fp32 compute, then add_bias) on a GPU with libcublas, the built-in GEMM elsewhere; the GEMM's bound.</summary>
    [TestCaseSource(nameof(LinearCases))]
    public void linear(string deviceName, DType dtype, int rows, int cols, int tokens, int bias, int residual) =>
        CheckLinear("linear", deviceName, dtype, rows, cols, tokens, bias, residual);

    private static void CheckLinear(string op, string deviceName, DType dtype, int rows, int cols, int tokens, int bias, int residual)
    {
        var device = ConformanceDevices.Get(deviceName);
        var weight = OpBackend.Representable(dtype, Random(rows * 31 + cols, rows * cols));
        var x = OpBackend.Representable(dtype, Random(tokens + cols, tokens * cols, 2));
        var biasValues = bias == 1 ? Random(rows, rows, 0.5) : null;
        var residualValues = residual == 1 ? OpBackend.Representable(dtype, Random(rows + 5, tokens * rows, 3)) : null;
        var output = op switch
        {
            "gemm" => device.Gemm(dtype, weight, rows, cols, x, biasValues, residualValues),
            "linear" => device.Linear(dtype, weight, rows, cols, x, biasValues, residualValues),
            _ => device.Gemv(dtype, weight, rows, cols, x, biasValues, residualValues),
        };
        var xs = x.Select(v => (double)v).ToArray();
        var ws = weight.Select(v => (double)v).ToArray();
        var expected = ReferenceOps.Linear(xs, tokens, ws, rows, cols, biasValues?.Select(v => (double)v).ToArray());
        var magnitude = ReferenceOps.LinearMagnitude(xs, tokens, ws, rows, cols);
        if (residualValues is not null)
        {
            for (int i = 0; i < expected.Length; i++)
            {
                expected[i] += residualValues[i];
                magnitude[i] += Math.Abs(residualValues[i]);
            }
        }
        AssertClose(output, expected, i => Tolerances.DotProduct(cols + 2, magnitude[i]) + StorageRoundoff(dtype) * Math.Abs(expected[i]) + StorageFloor(dtype),
            $"{op}({deviceName}, {dtype}, rows={rows}, cols={cols}, tokens={tokens})");
    }

    public static IEnumerable<TestCaseData> GemvSiluCases() => Cases("gemv_silu", device =>
        from dtype in device.Activations
        from shape in new[] { (5, 24), (33, 200), (64, 1024) }
        from tokens in new[] { 1, 4 }
        select new object[] { dtype, P("rows", shape.Item1), P("cols", shape.Item2), P("tokens", tokens) });

    /// <summary>Gate and up GEMVs fused with SwiGLU: the gate's error passes through silu' (at most 1.1) times |up|,
    /// the up's error times |silu(gate)|; then the output's storage rounding.</summary>
    [TestCaseSource(nameof(GemvSiluCases))]
    public void gemv_silu(string deviceName, DType dtype, int rows, int cols, int tokens)
    {
        var device = ConformanceDevices.Get(deviceName);
        var gate = OpBackend.Representable(dtype, Random(rows + 3 * cols, rows * cols));
        var up = OpBackend.Representable(dtype, Random(rows + 5 * cols, rows * cols));
        var x = OpBackend.Representable(dtype, Random(tokens * 7 + cols, tokens * cols, 2));
        var output = device.GemvSilu(dtype, gate, up, rows, cols, x);
        var xs = x.Select(v => (double)v).ToArray();
        var gs = gate.Select(v => (double)v).ToArray();
        var us = up.Select(v => (double)v).ToArray();
        var g = ReferenceOps.Linear(xs, tokens, gs, rows, cols);
        var u = ReferenceOps.Linear(xs, tokens, us, rows, cols);
        var gMagnitude = ReferenceOps.LinearMagnitude(xs, tokens, gs, rows, cols);
        var uMagnitude = ReferenceOps.LinearMagnitude(xs, tokens, us, rows, cols);
        var expected = g.Select((v, i) => ReferenceOps.Silu(v) * u[i]).ToArray();
        AssertClose(output, expected,
            i => 1.1 * Tolerances.DotProduct(cols, gMagnitude[i]) * (Math.Abs(u[i]) + Tolerances.DotProduct(cols, uMagnitude[i]))
                + Math.Abs(ReferenceOps.Silu(g[i])) * Tolerances.DotProduct(cols, uMagnitude[i])
                + (StorageRoundoff(dtype) + 8 * Tolerances.UnitRoundoff) * Math.Abs(expected[i]) + StorageFloor(dtype),
            $"gemv_silu({deviceName}, {dtype}, rows={rows}, cols={cols}, tokens={tokens})");
    }

    // ------------------------------------------------------------------ vocab_stats

    private static readonly string[] VocabKinds = ["random", "masked", "equal", "ties"];

    /// <summary>
    /// The shapes of the fused vocabulary reduction: every row kind at every length (1, 2, 1000, and the 128256 / 151936
    /// vocabularies of Llama 3 and Qwen2) in f32 and bf16 with k = 16, a token and a reference row; the options (k = 0 / 1 /
    /// 16, with or without a token and a reference) at 1000 and 151936; several rows at once (mixed kinds, a row without a
    /// token, odd lengths so that rows after the first start unaligned). The emulated device runs them all: about 25 s,
    /// most of it the fp64 reference (the same on every device).
    /// </summary>
    public static IEnumerable<TestCaseData> VocabStatsCases() => Cases("vocab_stats", device =>
    {
        var cases = new List<object[]>();
        foreach (int vocabulary in new[] { 1, 2, 1000, 128256, 151936 })
        {
            foreach (var dtype in new[] { DType.F32, DType.BF16 })
            {
                foreach (string kind in VocabKinds.Where(kind => vocabulary >= 2 || kind == "equal"))
                {
                    cases.Add([dtype, kind, P("rows", 1), P("vocab", vocabulary), P("k", 16), "token+reference"]);
                }
            }
        }
        foreach (int vocabulary in new[] { 1000, 151936 })
        {
            foreach (var dtype in new[] { DType.F32, DType.BF16 })
            {
                foreach (int topK in new[] { 0, 1, 16 })
                {
                    foreach (string with in new[] { "none", "token", "reference", "token+reference" })
                    {
                        if (topK != 16 || with != "token+reference")   // already in the sweep above
                        {
                            cases.Add([dtype, "random", P("rows", 1), P("vocab", vocabulary), P("k", topK), with]);
                        }
                    }
                }
            }
        }
        foreach (var dtype in new[] { DType.F32, DType.BF16 })
        {
            cases.Add([dtype, "mixed", P("rows", 5), P("vocab", 1001), P("k", 5), "token+reference"]);
            cases.Add([dtype, "mixed", P("rows", 3), P("vocab", 32003), P("k", 16), "token"]);
        }
        cases.Add([DType.BF16, "mixed", P("rows", 3), P("vocab", 128256), P("k", 2), "token+reference"]);
        return cases;
    });

    [TestCaseSource(nameof(VocabStatsCases))]
    public void vocab_stats(string deviceName, DType dtype, string kind, int rows, int vocabulary, int topK, string with)
    {
        var device = ConformanceDevices.Get(deviceName);
        bool withToken = with.Contains("token", StringComparison.Ordinal);
        bool withReference = with.Contains("reference", StringComparison.Ordinal);
        var logits = new float[rows * vocabulary];
        var reference = withReference ? new float[rows * vocabulary] : null;
        var tokens = withToken ? new int[rows] : null;
        for (int r = 0; r < rows; r++)
        {
            // Mixed: every kind in turn; the references of masked rows are masked too (KL infinite both ways).
            string rowKind = kind == "mixed" ? VocabKinds[r % VocabKinds.Length] : kind;
            int seed = vocabulary + 31 * r + topK;
            VocabStatsCheck.Row(rowKind, vocabulary, seed).CopyTo(logits, r * vocabulary);
            if (reference is not null)
            {
                VocabStatsCheck.Row(rowKind == "masked" ? "masked" : "random", vocabulary, seed + 7).CopyTo(reference, r * vocabulary);
            }
            if (tokens is not null)
            {
                // A token at a finite logit (a -inf one has log-prob -inf); in mixed rows, row 1 has none.
                int token = (vocabulary / 3 + 17 * r) % vocabulary;
                if (float.IsNegativeInfinity(logits[r * vocabulary + token]))
                {
                    logits[r * vocabulary + token] = -2.5f;
                }
                tokens[r] = kind == "mixed" && r == 1 ? -1 : token;
            }
        }
        logits = OpBackend.Representable(dtype, logits);
        reference = reference is null ? null : OpBackend.Representable(dtype, reference);
        var output = device.VocabStats(dtype, logits, vocabulary, tokens, reference, topK);
        int sumLength = device.VocabStatsSumLength(dtype, rows, vocabulary);
        int fields = Runtime.Signals.VocabStats.FieldCount;
        for (int r = 0; r < rows; r++)
        {
            VocabStatsCheck.AssertRow($"vocab_stats({dtype}, {kind}, row {r} of {rows}, vocab={vocabulary}, k={topK}, {with})",
                logits.AsSpan(r * vocabulary, vocabulary), tokens?[r] ?? -1, reference is null ? default : reference.AsSpan(r * vocabulary, vocabulary), topK,
                output.Stats.AsSpan(r * fields, fields), output.TopIds.AsSpan(r * topK, topK), output.TopLogProbs.AsSpan(r * topK, topK), sumLength);
        }
    }

    public static IEnumerable<TestCaseData> VocabStatsSpecialRowCases() => Cases("vocab_stats_special_rows", device =>
        from dtype in new[] { DType.F32, DType.BF16 }
        select new object[] { dtype, P("rows", 11), P("vocab", SpecialVocabulary) });

    /// <summary>4099 entries: three slices on the GPU, with the special entries in the middle one.</summary>
    private const int SpecialVocabulary = 4099;

    /// <summary>
    /// Rows whose fields are NaN or infinite, in one launch with ordinary rows: each device gives NaN and +-inf exactly
    /// where the CPU twin (which defines them) does, the same top ids, and the finite fields close to it (their accuracy
    /// is the main suite's business). A few of the twin's values are pinned down as well.
    /// </summary>
    [TestCaseSource(nameof(VocabStatsSpecialRowCases))]
    public void vocab_stats_special_rows(string deviceName, DType dtype, int rows, int vocabulary)
    {
        var device = ConformanceDevices.Get(deviceName);
        const int topK = 3;
        var logits = new float[rows * vocabulary];
        var reference = new float[rows * vocabulary];
        var tokens = new int[rows];
        for (int r = 0; r < rows; r++)
        {
            VocabStatsCheck.Row("random", vocabulary, 100 + r).CopyTo(logits, r * vocabulary);
            VocabStatsCheck.Row("random", vocabulary, 200 + r).CopyTo(reference, r * vocabulary);
            tokens[r] = 1234 + r;
        }
        Span<float> Row(float[] values, int r) => values.AsSpan(r * vocabulary, vocabulary);
        Row(logits, 0).Fill(float.NegativeInfinity);                   // 0: no finite entry
        Row(logits, 1)[2500] = float.NaN;                               // 1: a NaN logit
        Row(logits, 2)[2100] = float.PositiveInfinity;                  // 2: a +inf logit
        Row(reference, 3)[3000] = float.NaN;                            // 3: a NaN in the reference
        Row(reference, 4).Fill(float.NegativeInfinity);                 // 4: no finite reference entry
        for (int i = 2048; i < 2300; i += 7)                            // 5: masked one way and the other: KL +inf both ways
        {
            Row(logits, 5)[i] = float.NegativeInfinity;
            Row(reference, 5)[i + 3] = float.NegativeInfinity;
        }
        Row(logits, 6).CopyTo(Row(reference, 6));                       // 6: the reference is the row itself: KL 0
        Row(logits, 7).Fill(0.5f);                                      // 7: uniform: kurtosis 0, margin 0
        Row(logits, 8).Fill(float.NegativeInfinity);                    // 8: one finite entry: margin 1, one listed id
        Row(logits, 8)[4000] = -3;
        tokens[8] = 4000;
        tokens[9] = -1;                                                 // 9: no token
        Row(logits, 10)[tokens[10]] = float.NegativeInfinity;           // 10: the token is masked: log-prob -inf
        logits = OpBackend.Representable(dtype, logits);
        reference = OpBackend.Representable(dtype, reference);

        var output = device.VocabStats(dtype, logits, vocabulary, tokens, reference, topK);
        using var cpu = new CpuOpBackend();
        var twin = cpu.VocabStats(dtype, logits, vocabulary, tokens, reference, topK);

        int fields = Runtime.Signals.VocabStats.FieldCount;
        using (Assert.EnterMultipleScope())
        {
            Assert.That(twin.Stats.AsSpan(0, fields * 5).ToArray(), Has.All.NaN, "rows 0-4 are undefined");
            Assert.That(twin.TopIds.AsSpan(0, topK * 5).ToArray(), Has.All.EqualTo(-1));
            Assert.That(twin.Stats[5 * fields + (int)VocabStatsField.KlPq], Is.EqualTo(float.PositiveInfinity));
            Assert.That(twin.Stats[5 * fields + (int)VocabStatsField.KlQp], Is.EqualTo(float.PositiveInfinity));
            Assert.That(twin.Stats[6 * fields + (int)VocabStatsField.KlPq], Is.Zero.Within(1e-5));
            Assert.That(twin.Stats[7 * fields + (int)VocabStatsField.Kurtosis], Is.Zero);
            Assert.That(twin.Stats[8 * fields + (int)VocabStatsField.Margin], Is.EqualTo(1).Within(1e-6));
            Assert.That(twin.TopIds.AsSpan(8 * topK, topK).ToArray(), Is.EqualTo(new[] { 4000, -1, -1 }));
            Assert.That(twin.Stats[9 * fields + (int)VocabStatsField.TokenLogProb], Is.NaN);
            Assert.That(twin.Stats[10 * fields + (int)VocabStatsField.TokenLogProb], Is.EqualTo(float.NegativeInfinity));

            Assert.That(output.TopIds, Is.EqualTo(twin.TopIds), "top ids");
            for (int i = 0; i < twin.Stats.Length; i++)
            {
                AssertSameKind(output.Stats[i], twin.Stats[i], $"row {i / fields}, {(VocabStatsField)(i % fields)}");
            }
            for (int i = 0; i < twin.TopLogProbs.Length; i++)
            {
                AssertSameKind(output.TopLogProbs[i], twin.TopLogProbs[i], $"row {i / topK}, top log-prob {i % topK}");
            }
        }
    }

    /// <summary>NaN where the twin has NaN, the same infinity, else within 1e-4 (absolute and relative).</summary>
    private static void AssertSameKind(float actual, float expected, string what)
    {
        if (float.IsNaN(expected) || float.IsInfinity(expected))
        {
            Assert.That(actual, Is.EqualTo(expected), what);
        }
        else
        {
            Assert.That(actual, Is.EqualTo(expected).Within(1e-4 * (1 + Math.Abs(expected))), what);
        }
    }
}
