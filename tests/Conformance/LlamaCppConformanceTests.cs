using System.Globalization;
using System.Text.Json;
using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Runtime;
using KernelLM.Tests.Fixtures;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Conformance;

/// <summary>A model to compare: a synthetic folder written from <see cref="Spec"/>, or the embedded model when it is null.</summary>
public sealed record LlamaCppVariant(string Name, SyntheticModelSpec? Spec, int[] Prompt, int[] Decoded)
{
    public override string ToString() => Name;
}

/// <summary>
/// KernelLM (CPU device) against llama.cpp (LLamaSharp's CPU backend) on the same weights: each model folder is
/// exported to GGUF as llama.cpp's converter would (<see cref="GgufExport"/>), both engines get the same token
/// ids, and every prompt position's logits (one batched forward) and four KV-cached decode steps are compared.
/// llama.cpp is an independent implementation of the architectures (interleaved RoPE on permuted q/k for
/// `llama`, NEOX RoPE for `qwen2`, rope_freqs for llama3 scaling, its own GQA, bias and tied-head handling),
/// so agreement checks our reading of the models, not only our kernels.
///
/// Tolerance, per dtype, derived from how the two engines' arithmetic differs on the same stored weights:
/// 1. Activation rounding. llama.cpp's CPU matmul converts the activation row to the weight's vec_dot type
///    (BF16 for BF16 weights, F16 for F16, F32 for F32) and accumulates in fp32; KernelLM keeps activations in
///    fp32. Rounding to a p-bit significand (bf16 p = 8, f16 p = 11) multiplies each element by (1 + δ), δ
///    uniform in ±2^-p, rms 2^-p/√3. For y = Σ w_c x_c with terms of random sign, Δy = Σ w_c x_c δ_c has rms
///    (2^-p/√3) · sqrt(Σ (w_c x_c)²) ≈ (2^-p/√3) |y|: ε_act = 2^-p/√3 relative per matmul input
///    (bf16 2.26e-3, f16 2.82e-4, f32 0).
/// 2. fp32 summation order (SIMD blocking, threads). Recursive fp32 summation of n random terms has a relative
///    rms error of about (2^-24/√3) sqrt(n/2); for two engines ε_sum = (2^-24/√3) sqrt(n), n the longest sum
///    (hidden, intermediate, heads x head_dim, or the attention span). ggml's vectorised exp (softmax, SiLU)
///    and its RoPE angles are within a few ulp, below this term. ε = sqrt(ε_act² + ε_sum²).
/// 3. Propagation. A layer has four rounded matmul inputs (attention norm output, shared by q/k/v; attention
///    output before o_proj; MLP norm output, shared by gate/up; the gated product before down_proj) and the LM
///    head input is one more: R = 4 layers + 1 independent injections. Residuals and RMSNorm keep each sublayer
///    at the scale of the stream, so each reaches the logits with a gain of about one: the predicted error is
///    σ = sqrt(R) ε times the spread of the logits (their standard deviation over the vocabulary).
/// 4. Bounds, at every position: rms(Δ) ≤ 2 σ spread, and max |Δ| ≤ 2 σ spread sqrt(2 ln(2V)) (the largest of
///    V Gaussian |errors|; 4.08 for V = 2048). The factor 2 covers the propagation gain and the variation
///    between positions. Measured on 10 seeds of six configurations, the worst position's rms reached
///    0.77-0.96 σ (Llama bf16), 0.68-1.45 σ (Qwen2 bf16: q/k biases sharpen the softmax, and attention then
///    amplifies input errors a little more), 0.68-1.19 σ (f16) and 0.29-0.46 σ (f32, whose summation term
///    assumes recursive summation while both engines sum in SIMD blocks). Every run prints its own figures.
/// For the two-layer synthetic models that is an rms of 1.4e-2 (bf16), 1.7e-3 (f16) and 2.6e-6 (f32) of the
/// spread. A wrong convention moves logits by 10-100% of the spread (the negative checks below show it), a
/// missing bias or a wrong epsilon by 1e-3 to 1e-2: f32 variants of each case keep those visible.
///
/// KV cache: F32 in llama.cpp (LlamaCppModel). Its default F16 cache rounds K, V, Q (for KQ) and the softmax
/// (for KQV) to f16: four more f16 injections per layer, sqrt(4 L) x 2.82e-4 = 8e-4 for L = 2 (measured
/// 4e-4 to 8e-4 on the f32 models), which would hide everything the f32 variants can see.
///
/// Known difference: llama.cpp's `llama` architecture (which Mistral checkpoints convert to) has no sliding
/// window, and the converter writes none; the Mistral variant is therefore compared on a sequence shorter than
/// its window, and <see cref="Mistral_sliding_window_is_absent_in_llama_cpp"/> pins the difference down.
/// </summary>
[TestFixture]
[NonParallelizable]
public sealed class LlamaCppConformanceTests
{
    private const int Threads = 2;
    private const int DecodeSteps = 4;
    private string _directory = "";

    [SetUp]
    public void CreateDirectory() => _directory = TestPaths.NewTemporaryDirectory("llamacpp");

    [TearDown]
    public void DeleteDirectory() => Directory.Delete(_directory, recursive: true);

    private static readonly int[] s_prompt = [0, 17, 300, 1999, 45, 45, 1024, 7, 88, 1500, 2047, 3, 640, 99, 12, 150, 151, 152, 5];
    private static readonly int[] s_decoded = [42, 1001, 77, 2000];

    private static IEnumerable<TestCaseData> Variants()
    {
        yield return Case("llama_gqa_bf16", new SyntheticModelSpec { Seed = 11 });
        yield return Case("llama_no_gqa_f32", new SyntheticModelSpec { KvHeads = 4, DType = DType.F32, Seed = 12 });
        yield return Case("llama_mqa_tied_f16", new SyntheticModelSpec { KvHeads = 1, TieWordEmbeddings = true, DType = DType.F16, Seed = 13 });
        yield return Case("llama_tied_f32", new SyntheticModelSpec { TieWordEmbeddings = true, DType = DType.F32, Seed = 14 });
        yield return Case("llama_attention_bias_f32", new SyntheticModelSpec { AttentionBias = true, DType = DType.F32, Seed = 15 });
        yield return Case("llama_head_dim_32_bf16", new SyntheticModelSpec { HeadDim = 32, Seed = 16 });
        // Original context 64, factor 8: a 300-token prompt runs far past the original range with every band of
        // the llama3 schedule (kept, blended, divided by 8) in use; f32 so that small RoPE errors stay visible.
        yield return Case("llama3_rope_scaling_long_f32", Llama3Spec, LongPrompt(300, seed: 17));
        // The window (64) is longer than the 23 compared positions: see Mistral_sliding_window_is_absent_in_llama_cpp.
        yield return Case("mistral_bf16", new SyntheticModelSpec { Architecture = Architecture.Mistral, SlidingWindow = 64, Seed = 18 });
        yield return Case("mistral_f32", new SyntheticModelSpec { Architecture = Architecture.Mistral, SlidingWindow = 64, DType = DType.F32, Seed = 22 });
        yield return Case("qwen2_biases_bf16", new SyntheticModelSpec { Architecture = Architecture.Qwen2, Seed = 19 });
        yield return Case("qwen2_biases_f32", new SyntheticModelSpec { Architecture = Architecture.Qwen2, DType = DType.F32, Seed = 20 });
        yield return Case("qwen2_tied_f16", new SyntheticModelSpec { Architecture = Architecture.Qwen2, TieWordEmbeddings = true, DType = DType.F16, Seed = 21 });
        var (prompt, decoded) = TinyStoriesTokens();
        yield return new TestCaseData(new LlamaCppVariant("tiny_stories_bf16", null, prompt, decoded)).SetName("llama_cpp(tiny_stories_bf16)");
    }

    private static SyntheticModelSpec Llama3Spec => new() { Llama3RopeScaling = true, DType = DType.F32, Seed = 17 };

    private static TestCaseData Case(string name, SyntheticModelSpec spec, int[]? prompt = null) =>
        new TestCaseData(new LlamaCppVariant(name, spec, prompt ?? s_prompt, s_decoded)).SetName($"llama_cpp({name})");

    private static int[] LongPrompt(int length, int seed)
    {
        var random = new Random(seed);
        return Enumerable.Range(0, length).Select(i => i == 0 ? 0 : random.Next(2, 2048)).ToArray();
    }

    /// <summary>The embedded model on its own text: golden prompt public_2 and 20 tokens of its greedy continuation.</summary>
    private static (int[] Prompt, int[] Decoded) TinyStoriesTokens()
    {
        using var golden = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(TestPaths.TinyStories, "golden.json")));
        var entry = golden.RootElement.GetProperty("prompts")[2];
        int[] ids = entry.GetProperty("token_ids").EnumerateArray().Select(id => id.GetInt32()).ToArray();
        int[] greedy = entry.GetProperty("greedy").GetProperty("ids").EnumerateArray().Select(id => id.GetInt32()).ToArray();
        return ([.. ids, .. greedy[..16]], greedy[16..(16 + DecodeSteps)]);
    }

    [TestCaseSource(nameof(Variants))]
    public void Logits_match_llama_cpp(LlamaCppVariant variant)
    {
        string model = variant.Spec is null ? TestPaths.TinyStories : SyntheticModel.Write(Path.Combine(_directory, "model"), variant.Spec);
        var agreement = CompareEngines(model, new GgufExportOptions(), variant.Prompt, variant.Decoded);
        TestContext.Out.WriteLine(agreement.Summary(variant.Name));
        Assert.That(agreement.Failure, Is.Null, agreement.Failure);
    }

    [TestCase(TestName = "llama_cpp_detects(unpermuted_qk)")]
    public void Unpermuted_query_key_export_fails_the_comparison()
    {
        // Without convert_hf_to_gguf's permutation llama.cpp rotates the wrong pairs of q/k components.
        string model = SyntheticModel.Write(Path.Combine(_directory, "model"), new SyntheticModelSpec { DType = DType.F32, Seed = 12 });
        var agreement = CompareEngines(model, new GgufExportOptions { PermuteQueryKey = false }, s_prompt, s_decoded);
        TestContext.Out.WriteLine(agreement.Summary("unpermuted_qk"));
        Assert.That(agreement.WorstRmsRatio, Is.GreaterThan(100), "an export without the q/k permutation must be far outside the tolerance");
    }

    [TestCase(TestName = "llama_cpp_detects(unscaled_llama3_rope)")]
    public void Llama3_export_without_rope_frequencies_fails_the_comparison()
    {
        // Without rope_freqs.weight llama.cpp runs plain RoPE: the long-range variant must notice.
        string model = SyntheticModel.Write(Path.Combine(_directory, "model"), Llama3Spec);
        var agreement = CompareEngines(model, new GgufExportOptions { Llama3RopeFrequencies = false }, LongPrompt(300, seed: 17), s_decoded);
        TestContext.Out.WriteLine(agreement.Summary("unscaled_llama3_rope"));
        Assert.That(agreement.WorstRmsRatio, Is.GreaterThan(100), "an export without the llama3 RoPE factors must be far outside the tolerance");
    }

    /// <summary>
    /// llama.cpp's `llama` architecture attends to the whole context, so a Mistral checkpoint with a window of 5
    /// agrees with KernelLM (which applies the window, checked against an fp64 HF decoder in
    /// ReferenceDecoderTests) up to position 4 and differs from position 5 on. If llama.cpp gains a window for
    /// this architecture, or KernelLM loses its own, this fails and the Mistral variants above should change.
    /// </summary>
    [TestCase(TestName = "llama_cpp_differs(mistral_sliding_window_5)")]
    public void Mistral_sliding_window_is_absent_in_llama_cpp()
    {
        const int Window = 5;
        string model = SyntheticModel.Write(Path.Combine(_directory, "model"),
            new SyntheticModelSpec { Architecture = Architecture.Mistral, SlidingWindow = Window, DType = DType.F32, Seed = 18 });
        var agreement = CompareEngines(model, new GgufExportOptions(), s_prompt, s_decoded);
        TestContext.Out.WriteLine(agreement.Summary("mistral_sliding_window_5"));
        var inside = agreement.Positions.Take(Window).ToList();
        var outside = agreement.Positions.Skip(Window).ToList();
        Assert.Multiple(() =>
        {
            Assert.That(inside.Max(p => p.RmsRatio), Is.LessThanOrEqualTo(1), "positions inside the window must agree");
            Assert.That(outside.Min(p => p.RmsRatio), Is.GreaterThan(100), "every position past the window must differ");
        });
    }

    [Test]
    public void Gguf_permutation_interleaves_the_halves_of_each_head()
    {
        // Two heads of four rows: per head, rows (0, 1 | 2, 3) = (first half | second half) become 0, 2, 1, 3.
        int[] rows = [0, 1, 2, 3, 4, 5, 6, 7];
        Assert.That(GgufExport.Permute(rows, heads: 2, rowWidth: 1), Is.EqualTo(new[] { 0, 2, 1, 3, 4, 6, 5, 7 }));
        // Rows of width 2 move as units.
        int[] wide = [10, 11, 20, 21, 30, 31, 40, 41];
        Assert.That(GgufExport.Permute(wide, heads: 1, rowWidth: 2), Is.EqualTo(new[] { 10, 11, 30, 31, 20, 21, 40, 41 }));
    }

    // ---------------------------------------------------------------- running both engines

    private Agreement CompareEngines(string model, GgufExportOptions exportOptions, int[] prompt, int[] decoded)
    {
        string gguf = Path.Combine(_directory, "model.gguf");
        GgufExport.Export(model, gguf, exportOptions);
        int context = prompt.Length + decoded.Length;

        float[][] kernel;
        double sigma;
        using (var engine = LlamaModel.Load(model, new ModelLoadOptions { Threads = Threads, ContextLength = context }))
        using (var session = engine.CreateSession())
        {
            var c = engine.Config;
            int longestSum = new[] { c.HiddenSize, c.IntermediateSize, c.Heads * c.HeadDim, context }.Max();
            sigma = PredictedRelativeError(engine.Layers[0].Query.DType, c.Layers, longestSum);
            kernel = Forward(c.VocabularySize, prompt, decoded, (tokens, _, all, logits) => session.Forward(tokens, logits, all));
        }
        float[][] reference;
        using (var llama = LlamaCppModel.Load(gguf, Threads, context, prompt.Length))
        {
            reference = Forward(llama.VocabularySize, prompt, decoded, llama.Decode);
        }
        return Agreement.Measure(reference, kernel, sigma, prompt.Length);
    }

    private delegate void Step(ReadOnlySpan<int> tokens, int start, bool allPositions, Span<float> logits);

    /// <summary>The prompt in one call with every position's logits, then one call per decoded token.</summary>
    private static float[][] Forward(int vocabulary, int[] prompt, int[] decoded, Step step)
    {
        var all = new float[prompt.Length * vocabulary];
        step(prompt, 0, true, all);
        var rows = Enumerable.Range(0, prompt.Length).Select(t => all.AsSpan(t * vocabulary, vocabulary).ToArray()).ToList();
        for (int i = 0; i < decoded.Length; i++)
        {
            var logits = new float[vocabulary];
            step([decoded[i]], prompt.Length + i, false, logits);
            rows.Add(logits);
        }
        return [.. rows];
    }

    // ---------------------------------------------------------------- the tolerance (derivation in the class comment)

    /// <summary>Relative rms error of one matmul input in llama.cpp against KernelLM: activation rounding to
    /// the weight's vec_dot type (2^-p/√3) combined with the fp32 summation-order term (2^-24/√3) sqrt(n).</summary>
    public static double MatmulInputError(DType weights, int longestSum)
    {
        double activation = weights switch
        {
            DType.BF16 => Math.Pow(2, -8) / Math.Sqrt(3),
            DType.F16 => Math.Pow(2, -11) / Math.Sqrt(3),
            DType.F32 => 0,
            _ => throw new ArgumentOutOfRangeException(nameof(weights), weights, "F32, F16 or BF16"),
        };
        double summation = Tolerances.UnitRoundoff / Math.Sqrt(3) * Math.Sqrt(longestSum);
        return Math.Sqrt(activation * activation + summation * summation);
    }

    /// <summary>σ: the predicted rms of the logit difference relative to the logits' spread, sqrt(4 L + 1) ε.</summary>
    public static double PredictedRelativeError(DType weights, int layers, int longestSum) =>
        Math.Sqrt(4 * layers + 1) * MatmulInputError(weights, longestSum);

    /// <summary>The factor on σ that the bounds allow (propagation gain and variation between positions).</summary>
    private const double Margin = 2;

    /// <summary>How KernelLM's logits compare with llama.cpp's, position by position.</summary>
    public sealed record PositionAgreement(int Position, double Spread, double RmsError, double MaxError, int MaxErrorToken, double RmsBound, double MaxBound)
    {
        public double RmsRatio => RmsError / RmsBound;
        public double MaxRatio => MaxError / MaxBound;
    }

    public sealed record Agreement(IReadOnlyList<PositionAgreement> Positions, double Sigma, int PromptLength)
    {
        public double WorstRmsRatio => Positions.Max(p => p.RmsRatio);

        public string? Failure
        {
            get
            {
                var worst = Positions.MaxBy(p => Math.Max(p.RmsRatio, p.MaxRatio))!;
                if (worst.RmsRatio <= 1 && worst.MaxRatio <= 1)
                {
                    return null;
                }
                string where = worst.Position < PromptLength ? $"prompt position {worst.Position}" : $"decode step {worst.Position - PromptLength}";
                return string.Create(CultureInfo.InvariantCulture,
                    $"{where}: rms |Δ| {worst.RmsError:E2} (bound {worst.RmsBound:E2}), max |Δ| {worst.MaxError:E2} at token {worst.MaxErrorToken} (bound {worst.MaxBound:E2}); logit spread {worst.Spread:F3}");
            }
        }

        public string Summary(string name)
        {
            var worstMax = Positions.MaxBy(p => p.MaxError)!;
            return string.Create(CultureInfo.InvariantCulture,
                $"{name}: {Positions.Count} positions ({PromptLength} prompt + {Positions.Count - PromptLength} decode); σ = {Sigma:E2}; " +
                $"max |Δ| {worstMax.MaxError:E2} (bound there {worstMax.MaxBound:E2}); worst rms |Δ| / spread {Positions.Max(p => p.RmsError / p.Spread):E2} " +
                $"(bound {Margin * Sigma:E2}); worst rms ratio {WorstRmsRatio:F2}, worst max ratio {Positions.Max(p => p.MaxRatio):F2}");
        }

        public static Agreement Measure(float[][] reference, float[][] actual, double sigma, int promptLength)
        {
            var positions = new List<PositionAgreement>();
            for (int t = 0; t < reference.Length; t++)
            {
                var expected = reference[t];
                int vocabulary = expected.Length;
                double mean = expected.Average(v => (double)v);
                double spread = Math.Sqrt(expected.Sum(v => (v - mean) * (v - mean)) / vocabulary);
                double squares = 0, max = 0;
                int maxToken = 0;
                for (int i = 0; i < vocabulary; i++)
                {
                    double error = Math.Abs((double)actual[t][i] - expected[i]);
                    squares += error * error;
                    if (!(error <= max))
                    {
                        max = error;
                        maxToken = i;
                    }
                }
                double rmsBound = Margin * sigma * spread;
                double maxBound = rmsBound * Math.Sqrt(2 * Math.Log(2.0 * vocabulary));
                positions.Add(new PositionAgreement(t, spread, Math.Sqrt(squares / vocabulary), max, maxToken, rmsBound, maxBound));
            }
            return new Agreement(positions, sigma, promptLength);
        }
    }
}
