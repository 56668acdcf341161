using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Runtime;
using KernelLM.Runtime.SafeTensors;
using KernelLM.Tests.Fixtures;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Models;

/// <summary>
/// Whole-model conformance on every architecture variant the loader supports: the engine's logits for
/// every prompt position (prefill in chunks) and for several KV-cached decode steps, against a
/// straightforward fp64 decoder written here from the HF modeling code, full recomputation, no cache.
/// </summary>
[TestFixture]
public sealed class ReferenceDecoderTests
{
    /// <summary>
    /// Both sides use the same stored (rounded) weights; the engine computes in fp32. Per dot product of length
    /// n the relative error is at most ~n u of sum |w x| (u = 2^-24), typically sqrt(n) u; the synthetic
    /// models have n &lt;= 160, two layers and logits of magnitude ~10, which predicts ~1e-5 absolute typical and
    /// ~1e-4 worst case (measured: at most 3.4e-6 over the ten variants). 2e-5 x (1 + max |logit|), about 2e-4,
    /// is the bound; a real error (RoPE convention, GQA mapping, a missing bias, a wrong window) moves logits
    /// by 1e-2 or more.
    /// </summary>
    private static double Tolerance(double maxLogit) => 2e-5 * (1 + maxLogit);

    private string _directory = "";

    [SetUp]
    public void CreateDirectory() => _directory = TestPaths.NewTemporaryDirectory("reference");

    [TearDown]
    public void DeleteDirectory() => Directory.Delete(_directory, recursive: true);

    private static IEnumerable<TestCaseData> Models()
    {
        yield return Case("llama_gqa_bf16", new SyntheticModelSpec());
        yield return Case("llama_no_gqa_f32", new SyntheticModelSpec { KvHeads = 4, DType = DType.F32, Seed = 2 });
        yield return Case("llama_mqa_tied_f16", new SyntheticModelSpec { KvHeads = 1, TieWordEmbeddings = true, DType = DType.F16, Seed = 3 });
        yield return Case("llama_attention_bias_f32", new SyntheticModelSpec { AttentionBias = true, DType = DType.F32, Seed = 4 });
        yield return Case("llama_llama3_rope_scaling", new SyntheticModelSpec { Llama3RopeScaling = true, Seed = 5 });
        yield return Case("llama_head_dim_32", new SyntheticModelSpec { HeadDim = 32, Seed = 6 });
        yield return Case("mistral_sliding_window_5", new SyntheticModelSpec { Architecture = Architecture.Mistral, SlidingWindow = 5, Seed = 7 });
        yield return Case("qwen2_biases_bf16", new SyntheticModelSpec { Architecture = Architecture.Qwen2, Seed = 8 });
        yield return Case("qwen2_tied_f16", new SyntheticModelSpec { Architecture = Architecture.Qwen2, TieWordEmbeddings = true, DType = DType.F16, Seed = 9 });
        yield return Case("llama_sharded", new SyntheticModelSpec { Sharded = true, Seed = 10 });
    }

    private static TestCaseData Case(string name, SyntheticModelSpec spec) => new TestCaseData(spec).SetName($"reference_decoder({name})");

    [TestCaseSource(nameof(Models))]
    public void Engine_matches_fp64_reference_decoder(SyntheticModelSpec spec)
    {
        SyntheticModel.Write(_directory, spec);
        int[] prompt = [0, 17, 300, 1999, 45, 45, 1024, 7, 88, 1500, 2047, 3, 640, 99, 12, 150, 151, 152, 5];
        int[] decoded = [42, 1001, 77, 2000];
        int vocabulary = spec.VocabularySize;

        double[][] expected;
        using (var reference = new ReferenceDecoder(_directory, spec))
        {
            expected = reference.Logits([.. prompt, .. decoded]);
        }

        using var model = LlamaModel.Load(_directory, new ModelLoadOptions { PrefillChunk = 7, Threads = 2, ContextLength = 64 });
        using var session = model.CreateSession();
        var all = new float[prompt.Length * vocabulary];
        session.Forward(prompt, all, allPositions: true);
        double worst = 0;
        for (int t = 0; t < prompt.Length; t++)
        {
            worst = Math.Max(worst, Compare(all.AsSpan(t * vocabulary, vocabulary), expected[t], $"prompt position {t}"));
        }
        var logits = new float[vocabulary];
        for (int step = 0; step < decoded.Length; step++)
        {
            session.Forward([decoded[step]], logits);
            worst = Math.Max(worst, Compare(logits, expected[prompt.Length + step], $"decode step {step}"));
        }
        TestContext.Out.WriteLine($"max |engine - reference| = {worst:E2}");
    }

    private static double Compare(ReadOnlySpan<float> actual, double[] expected, string where)
    {
        double maxLogit = expected.Max(Math.Abs);
        double tolerance = Tolerance(maxLogit);
        double worst = 0;
        for (int i = 0; i < expected.Length; i++)
        {
            double error = Math.Abs(actual[i] - expected[i]);
            worst = Math.Max(worst, error);
            if (!(error <= tolerance))
            {
                Assert.Fail($"{where}: logit {i} = {actual[i]}, reference {expected[i]} (|error| {error:E2} > {tolerance:E2})");
            }
        }
        return worst;
    }

    /// <summary>The HF Llama/Mistral/Qwen2 decoder in fp64, recomputed from scratch for the whole sequence.</summary>
    private sealed class ReferenceDecoder : IDisposable
    {
        private readonly SafeTensorsArchive _weights;
        private readonly SyntheticModelSpec _spec;

        public ReferenceDecoder(string directory, SyntheticModelSpec spec)
        {
            _weights = SafeTensorsArchive.Open(directory);
            _spec = spec;
        }

        private double[] Weight(string name) => _weights.Tensors[name].ToFloatArray().Select(v => (double)v).ToArray();

        private double[]? Optional(string name) => _weights.Tensors.ContainsKey(name) ? Weight(name) : null;

        private double[] InverseFrequencies(int headDim)
        {
            var frequencies = Enumerable.Range(0, headDim / 2).Select(i => 1.0 / Math.Pow(_spec.RopeTheta, 2.0 * i / headDim)).ToArray();
            if (!_spec.Llama3RopeScaling)
            {
                return frequencies;
            }
            // transformers' _compute_llama3_parameters with the synthetic models' factor 8, low 1, high 4, original 64.
            const double factor = 8, low = 1, high = 4, original = 64;
            return frequencies.Select(f =>
            {
                double wavelength = 2 * Math.PI / f;
                if (wavelength < original / high)
                {
                    return f;
                }
                if (wavelength > original / low)
                {
                    return f / factor;
                }
                double smooth = (original / wavelength - low) / (high - low);
                return (1 - smooth) * f / factor + smooth * f;
            }).ToArray();
        }

        public double[][] Logits(int[] tokens)
        {
            var s = _spec;
            int n = tokens.Length, hidden = s.HiddenSize, headDim = s.ResolvedHeadDim;
            bool qkvBias = s.Architecture == Architecture.Qwen2 || s.AttentionBias;
            bool outputBias = s.Architecture == Architecture.Llama && s.AttentionBias;
            int window = s.Architecture == Architecture.Mistral ? s.SlidingWindow ?? 0 : 0;
            var embedding = Weight("model.embed_tokens.weight");
            var x = new double[n * hidden];
            for (int t = 0; t < n; t++)
            {
                Array.Copy(embedding, tokens[t] * hidden, x, t * hidden, hidden);
            }
            var inverse = InverseFrequencies(headDim);
            for (int layer = 0; layer < s.Layers; layer++)
            {
                string p = $"model.layers.{layer}.";
                var norm = ReferenceOps.RmsNorm(x, n, Weight(p + "input_layernorm.weight"), 1e-5);
                var q = ReferenceOps.Linear(norm, n, Weight(p + "self_attn.q_proj.weight"), s.Heads * headDim, hidden, qkvBias ? Weight(p + "self_attn.q_proj.bias") : null);
                var k = ReferenceOps.Linear(norm, n, Weight(p + "self_attn.k_proj.weight"), s.KvHeads * headDim, hidden, qkvBias ? Weight(p + "self_attn.k_proj.bias") : null);
                var v = ReferenceOps.Linear(norm, n, Weight(p + "self_attn.v_proj.weight"), s.KvHeads * headDim, hidden, qkvBias ? Weight(p + "self_attn.v_proj.bias") : null);
                q = ReferenceOps.Rope(q, n, s.Heads, headDim, 0, inverse);
                k = ReferenceOps.Rope(k, n, s.KvHeads, headDim, 0, inverse);
                var attention = ReferenceOps.Attention(q, n, s.Heads, k, v, s.KvHeads, headDim, 0, window);
                var projected = ReferenceOps.Linear(attention, n, Weight(p + "self_attn.o_proj.weight"), hidden, s.Heads * headDim, outputBias ? Weight(p + "self_attn.o_proj.bias") : null);
                for (int i = 0; i < x.Length; i++)
                {
                    x[i] += projected[i];
                }
                norm = ReferenceOps.RmsNorm(x, n, Weight(p + "post_attention_layernorm.weight"), 1e-5);
                var gate = ReferenceOps.Linear(norm, n, Weight(p + "mlp.gate_proj.weight"), s.IntermediateSize, hidden);
                var up = ReferenceOps.Linear(norm, n, Weight(p + "mlp.up_proj.weight"), s.IntermediateSize, hidden);
                var product = gate.Select((g, i) => ReferenceOps.Silu(g) * up[i]).ToArray();
                var down = ReferenceOps.Linear(product, n, Weight(p + "mlp.down_proj.weight"), hidden, s.IntermediateSize);
                for (int i = 0; i < x.Length; i++)
                {
                    x[i] += down[i];
                }
            }
            var final = ReferenceOps.RmsNorm(x, n, Weight("model.norm.weight"), 1e-5);
            var head = Optional("lm_head.weight") ?? embedding;
            var logits = ReferenceOps.Linear(final, n, head, s.VocabularySize, hidden);
            return Enumerable.Range(0, n).Select(t => logits.AsSpan(t * s.VocabularySize, s.VocabularySize).ToArray()).ToArray();
        }

        public void Dispose() => _weights.Dispose();
    }
}
