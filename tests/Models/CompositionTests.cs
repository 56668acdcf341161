using System.Text.Json.Nodes;
using KernelLM.Models;
using KernelLM.Models.Composition;
using KernelLM.Models.Llama;
using KernelLM.Runtime;
using KernelLM.Runtime.Composition;
using KernelLM.Runtime.Generation;
using KernelLM.Runtime.Sampling;
using KernelLM.Runtime.Signals;
using KernelLM.Tests.Fixtures;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Models;

/// <summary>
/// Logit composition on the CPU device against its definitions, with each member's logits taken from a session of
/// its own (fp64 maths on the members' fp32 rows): composing a model with itself at weight w scales its logits by
/// (1 + w); softmax(a + b) is the normalised product softmax(a) softmax(b); guidance with scale 1 is the conditional
/// model, token for token; guidance feeds its unconditional member the negative prompt; contrastive decoding is
/// log p_expert - log p_amateur over the plausible set; the tokenizers must match; padding rows are left out; the
/// signals describe the composed distribution; a decode step allocates nothing.
/// </summary>
[TestFixture]
public sealed class CompositionTests
{
    private const string Prompt = "Once upon a time, there was a little dog";
    private string _directory = "";

    [SetUp]
    public void CreateDirectory() => _directory = TestPaths.NewTemporaryDirectory("composition");

    [TearDown]
    public void DeleteDirectory() => Directory.Delete(_directory, recursive: true);

    private static LanguageModel Load(string directory) =>
        LanguageModel.Load(directory, new ModelLoadOptions { Device = "cpu", Threads = 2, ContextLength = 128, PrefillChunk = 8 });

    private string Synthetic(string name, SyntheticModelSpec spec) =>
        SyntheticModel.Write(Path.Combine(_directory, name), spec with { MaxPositionEmbeddings = 256 });

    /// <summary>Every position's logits of <paramref name="ids"/> from a fresh session of <paramref name="model"/>.</summary>
    private static float[] Logits(LanguageModel model, int[] ids)
    {
        using var session = model.CreateSession();
        var logits = new float[ids.Length * model.Config.VocabularySize];
        session.Forward(ids, logits, allPositions: true);
        return logits;
    }

    private static double[] LogSoftmax(ReadOnlySpan<float> row)
    {
        double max = double.NegativeInfinity;
        foreach (float x in row)
        {
            max = Math.Max(max, x);
        }
        double sum = 0;
        foreach (float x in row)
        {
            sum += Math.Exp(x - max);
        }
        double log = max + Math.Log(sum);
        var result = new double[row.Length];
        for (int i = 0; i < row.Length; i++)
        {
            result[i] = row[i] - log;
        }
        return result;
    }

    [TestCase(0.5f)]
    [TestCase(-0.25f)]
    [TestCase(2f)]
    public void Composing_a_model_with_itself_at_weight_w_scales_its_logits_by_one_plus_w(float weight)
    {
        using var model = Load(Synthetic("a", new SyntheticModelSpec { DType = DType.F32 }));
        using var composition = LogitComposition.Sum(model, (model, weight));
        int[] ids = model.Encode(Prompt);
        var expected = Logits(model, ids);
        var actual = new float[expected.Length];
        composition.Session.Reset();
        composition.Session.Forward(ids, actual, allPositions: true);
        for (int i = 0; i < expected.Length; i++)
        {
            // fma(w, a, a) against (1 + w) a: one rounding each.
            double scaled = (1.0 + weight) * expected[i];
            Assert.That(actual[i], Is.EqualTo(scaled).Within(2 * Tolerances.UnitRoundoff * Math.Abs(scaled)), $"logit {i}");
        }
        // Decode steps: the composed session keeps both members' caches in lockstep.
        var row = new float[model.Config.VocabularySize];
        using var single = model.CreateSession();
        var singleRow = new float[row.Length];
        single.Forward(ids, singleRow);
        foreach (int token in new[] { 17, 300, 5 })
        {
            composition.Session.Forward([token], row);
            single.Forward([token], singleRow);
            for (int i = 0; i < row.Length; i++)
            {
                Assert.That(row[i], Is.EqualTo((1.0 + weight) * singleRow[i]).Within(2 * Tolerances.UnitRoundoff * Math.Abs((1.0 + weight) * singleRow[i])));
            }
        }
        Assert.That(composition.Session.Length, Is.EqualTo(ids.Length + 3));
    }

    [Test]
    public void Softmax_of_a_sum_is_the_normalised_product_of_the_softmaxes()
    {
        using var a = Load(TestPaths.TinyStories);
        using var b = Load(Synthetic("b", new SyntheticModelSpec { DType = DType.F32, Seed = 5 }));
        using var composition = LogitComposition.Sum(a, (b, 1f));
        int[] ids = a.Encode(Prompt);
        int vocabulary = composition.VocabularySize;
        var aLogits = Logits(a, ids);
        var bLogits = Logits(b, ids);
        var composed = new float[ids.Length * vocabulary];
        composition.Session.Forward(ids, composed, allPositions: true);
        for (int t = 0; t < ids.Length; t++)
        {
            var pa = LogSoftmax(aLogits.AsSpan(t * vocabulary, vocabulary));
            var pb = LogSoftmax(bLogits.AsSpan(t * vocabulary, vocabulary));
            // log(p_a p_b / sum_j p_a(j) p_b(j)), in fp64.
            var product = pa.Zip(pb, (x, y) => x + y).ToArray();
            double max = product.Max();
            double normaliser = max + Math.Log(product.Sum(x => Math.Exp(x - max)));
            var actual = LogSoftmax(composed.AsSpan(t * vocabulary, vocabulary));
            // The composed logit is a + b rounded once in fp32: u (|a| + |b|); log-softmax moves by at most twice the worst.
            double magnitude = 0;
            for (int i = 0; i < vocabulary; i++)
            {
                magnitude = Math.Max(magnitude, Math.Abs(aLogits[t * vocabulary + i]) + Math.Abs(bLogits[t * vocabulary + i]));
            }
            double tolerance = 3 * Tolerances.UnitRoundoff * magnitude;
            for (int i = 0; i < vocabulary; i++)
            {
                Assert.That(actual[i], Is.EqualTo(product[i] - normaliser).Within(tolerance), $"position {t}, token {i}");
            }
        }
    }

    [Test]
    public void Guidance_with_scale_one_is_the_conditional_model_token_for_token()
    {
        using var model = Load(TestPaths.TinyStories);
        using var guidance = LogitComposition.Guidance(model, "The sad end.", 1f);
        foreach (var sampling in new[] { new SamplingOptions { Temperature = 0 }, new SamplingOptions { Temperature = 0.9f, TopK = 20, Seed = 3 } })
        {
            var options = new GenerationOptions { MaxNewTokens = 24, Sampling = sampling, StopOnEos = false, Signals = new TokenSignalOptions { TopK = 3 } };
            var expected = model.Generate(Prompt, options).ToList();
            var actual = guidance.Generate(Prompt, options).ToList();
            Assert.That(actual.Select(t => t.Id), Is.EqualTo(expected.Select(t => t.Id)), $"tokens at {sampling.Temperature}");
            // s x cond + 0 x uncond is cond exactly: the same log-probs and signals.
            Assert.That(actual.Select(t => t.LogProbability), Is.EqualTo(expected.Select(t => t.LogProbability)));
            Assert.That(actual.Select(t => t.Signals?.Entropy), Is.EqualTo(expected.Select(t => t.Signals?.Entropy)));
        }
        using var stronger = LogitComposition.Guidance(model, "The sad end.", 3f);
        var greedy = new GenerationOptions { MaxNewTokens = 24, Sampling = new SamplingOptions { Temperature = 0 }, StopOnEos = false };
        Assert.That(stronger.Generate(Prompt, greedy).Select(t => t.Id), Is.Not.EqualTo(model.Generate(Prompt, greedy).Select(t => t.Id)),
            "scale 3 moves the text away from the conditional model's");
    }

    /// <summary>uncond + s (cond - uncond) with the unconditional sequence = the negative prompt, then the same generated tokens.</summary>
    [Test]
    public void Guidance_runs_the_unconditional_sequence_on_the_negative_prompt()
    {
        const float scale = 1.75f;
        using var model = Load(TestPaths.TinyStories);
        using var guidance = LogitComposition.Guidance(model, "The sad end.", scale);
        int[] conditional = model.Encode(Prompt);
        int[] unconditional = model.Encode("The sad end.");
        int vocabulary = model.Config.VocabularySize;
        using var cond = model.CreateSession();
        using var uncond = model.CreateSession();
        var c = new float[vocabulary];
        var u = new float[vocabulary];
        var actual = new float[vocabulary];
        var session = guidance.Session;
        session.Reset();
        cond.Forward(conditional, c);
        uncond.Forward(unconditional, u);
        session.Forward(conditional, actual);
        Assert.That(session.Length, Is.EqualTo(Math.Max(conditional.Length, unconditional.Length)));
        foreach (int next in new[] { -1, 42, 7, 300 })
        {
            if (next >= 0)
            {
                cond.Forward([next], c);
                uncond.Forward([next], u);
                session.Forward([next], actual);
            }
            for (int i = 0; i < vocabulary; i++)
            {
                double expected = u[i] + (double)scale * (c[i] - u[i]);
                double magnitude = Math.Abs(scale * c[i]) + Math.Abs((1 - scale) * u[i]);
                Assert.That(actual[i], Is.EqualTo(expected).Within(3 * Tolerances.UnitRoundoff * magnitude), $"after {next}: token {i}");
            }
        }
        session.Reset();
        Assert.That(() => session.Forward(conditional, new float[conditional.Length * vocabulary], allPositions: true),
            Throws.InvalidOperationException.With.Message.Contains("own prompt"));
    }

    [TestCase(0.1f)]
    [TestCase(0.5f)]
    public void Contrastive_decoding_is_the_log_ratio_over_the_experts_plausible_set(float alpha)
    {
        using var expert = Load(TestPaths.TinyStories);
        using var amateur = Load(Synthetic("amateur", new SyntheticModelSpec { DType = DType.F32, Seed = 9 }));
        using var contrastive = LogitComposition.Contrastive(expert, amateur, alpha);
        int[] ids = expert.Encode(Prompt);
        int vocabulary = contrastive.VocabularySize;
        var e = Logits(expert, ids);
        var a = Logits(amateur, ids);
        var composed = new float[ids.Length * vocabulary];
        contrastive.Session.Forward(ids, composed, allPositions: true);
        int kept = 0;
        for (int t = 0; t < ids.Length; t++)
        {
            var logE = LogSoftmax(e.AsSpan(t * vocabulary, vocabulary));
            var logA = LogSoftmax(a.AsSpan(t * vocabulary, vocabulary));
            var actual = LogSoftmax(composed.AsSpan(t * vocabulary, vocabulary));
            double best = logE.Max();
            // Li et al.: score_i = log p_e(i) - log p_a(i) on {p_e(i) >= alpha max p_e}; the sampled distribution is its softmax.
            var score = Enumerable.Range(0, vocabulary).Select(i => logE[i] >= best + Math.Log(alpha) ? logE[i] - logA[i] : double.NegativeInfinity).ToArray();
            double max = score.Max();
            double normaliser = max + Math.Log(score.Where(double.IsFinite).Sum(x => Math.Exp(x - max)));
            double magnitude = 0;
            for (int i = 0; i < vocabulary; i++)
            {
                magnitude = Math.Max(magnitude, Math.Abs(e[t * vocabulary + i]) + Math.Abs(a[t * vocabulary + i]));
            }
            for (int i = 0; i < vocabulary; i++)
            {
                // An entry within fp32 rounding of the cut may fall either side; every other one must match.
                double margin = logE[i] - (best + Math.Log(alpha));
                if (Math.Abs(margin) < 1e-5 * (1 + Math.Abs(best)))
                {
                    continue;
                }
                if (double.IsNegativeInfinity(score[i]))
                {
                    Assert.That(actual[i], Is.EqualTo(double.NegativeInfinity), $"position {t}, token {i}: outside the plausible set");
                }
                else
                {
                    kept++;
                    Assert.That(actual[i], Is.EqualTo(score[i] - normaliser).Within(4 * Tolerances.UnitRoundoff * magnitude), $"position {t}, token {i}");
                }
            }
        }
        Assert.That(kept, Is.GreaterThan(ids.Length), "the plausible sets are not empty");
        Assert.That(kept, Is.LessThan(ids.Length * vocabulary / 2), "the cut removes most of the vocabulary");
    }

    [Test]
    public void A_member_with_another_tokenizer_is_refused_naming_the_token_and_the_folders()
    {
        string other = Synthetic("other-tokenizer", new SyntheticModelSpec());
        string tokenizerPath = Path.Combine(other, "tokenizer.json");
        var tokenizer = JsonNode.Parse(File.ReadAllText(tokenizerPath))!;
        tokenizer["added_tokens"]![1]!["content"] = "<|end|>";
        File.WriteAllText(tokenizerPath, tokenizer.ToJsonString());
        using var backbone = Load(TestPaths.TinyStories);
        using var module = Load(other);
        Assert.That(() => LogitComposition.Sum(backbone, (module, 1f)), Throws.TypeOf<InvalidParameterException>()
            .With.Property(nameof(InvalidParameterException.Parameter)).EqualTo("compose")
            .And.Message.Contains("token id 1").And.Message.Contains(other).And.Message.Contains(TestPaths.TinyStories));
        string smallHead = Synthetic("small-head", new SyntheticModelSpec { VocabularySize = 2000 });
        using var small = Load(smallHead);
        Assert.That(() => LogitComposition.Contrastive(backbone, small), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("padding"));
    }

    /// <summary>A module whose LM head has 64 padding rows past the tokenizer's 2048 tokens: the composed row is the
    /// tokenizer's 2048 columns (the padding left out of both), and equals the sum of the members' first 2048 logits.</summary>
    [Test]
    public void Padding_rows_past_the_shared_vocabulary_are_left_out()
    {
        using var backbone = Load(TestPaths.TinyStories);
        using var padded = Load(Synthetic("padded", new SyntheticModelSpec { VocabularySize = 2112, DType = DType.F32, Seed = 4 }));
        using var composition = LogitComposition.Sum(backbone, (padded, -0.5f));
        Assert.That(composition.VocabularySize, Is.EqualTo(2048));
        int[] ids = backbone.Encode(Prompt);
        var a = Logits(backbone, ids);
        var b = Logits(padded, ids);
        var composed = new float[ids.Length * 2048];
        composition.Session.Forward(ids, composed, allPositions: true);
        for (int t = 0; t < ids.Length; t++)
        {
            for (int i = 0; i < 2048; i++)
            {
                double expected = a[t * 2048 + i] - 0.5 * b[t * 2112 + i];
                Assert.That(composed[t * 2048 + i], Is.EqualTo(expected).Within(2 * Tolerances.UnitRoundoff * (Math.Abs(a[t * 2048 + i]) + Math.Abs(0.5 * b[t * 2112 + i]))));
            }
        }
    }

    /// <summary>The streamed log-prob and signals are those of the composed distribution (log_softmax of the sum), not the backbone's.</summary>
    [Test]
    public void Token_signals_describe_the_composed_distribution()
    {
        using var backbone = Load(TestPaths.TinyStories);
        using var module = Load(Synthetic("module", new SyntheticModelSpec { DType = DType.F32, Seed = 6 }));
        using var composition = LogitComposition.Sum(backbone, (module, 0.8f));
        var options = new GenerationOptions { MaxNewTokens = 12, Sampling = new SamplingOptions { Temperature = 0.7f, Seed = 11 }, StopOnEos = false, Signals = new TokenSignalOptions { TopK = 2 } };
        var tokens = composition.Generate(Prompt, options).Where(t => t.Id >= 0).ToList();
        int[] ids = [.. backbone.Encode(Prompt), .. tokens.Select(t => t.Id)];
        // Replay: the composed row before each generated token.
        var composed = new float[ids.Length * 2048];
        composition.Session.Reset();
        composition.Session.Forward(ids, composed, allPositions: true);
        int promptLength = ids.Length - tokens.Count;
        for (int n = 0; n < tokens.Count; n++)
        {
            var row = composed.AsSpan((promptLength + n - 1) * 2048, 2048);
            var logProbs = LogSoftmax(row);
            double entropy = -logProbs.Sum(x => Math.Exp(x) * x);
            Assert.That(tokens[n].LogProbability, Is.EqualTo(logProbs[tokens[n].Id]).Within(1e-4), $"token {n}: log-prob");
            Assert.That(tokens[n].Signals!.Entropy, Is.EqualTo(entropy).Within(1e-4), $"token {n}: entropy");
        }
        var backboneOnly = LogSoftmax(Logits(backbone, ids).AsSpan((promptLength - 1) * 2048, 2048));
        var composedFirst = LogSoftmax(composed.AsSpan((promptLength - 1) * 2048, 2048));
        Assert.That(backboneOnly.Zip(composedFirst, (x, y) => Math.Abs(x - y)).Max(), Is.GreaterThan(0.1), "the backbone alone is another distribution");
    }

    [Test]
    public void A_composed_decode_step_allocates_nothing()
    {
        using var model = Load(TestPaths.TinyStories);
        using var module = Load(Synthetic("module", new SyntheticModelSpec { DType = DType.F32, Seed = 6 }));
        using var composition = LogitComposition.Sum(model, (module, 0.5f));
        var session = composition.Session;
        var logits = new float[session.VocabularySize];
        int[] token = [5];
        session.Reset();
        session.Forward(model.Encode(Prompt), logits);
        for (int i = 0; i < 10; i++)
        {
            session.Forward(token, logits);
        }
        Thread.Sleep(250);
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 20; i++)
        {
            session.Forward(token, logits);
        }
        Assert.That(GC.GetAllocatedBytesForCurrentThread() - before, Is.Zero, "bytes allocated by 20 composed decode steps");
    }

    [Test]
    public void Bad_parameters_are_typed_errors_naming_them()
    {
        using var model = Load(TestPaths.TinyStories);
        Assert.That(() => LogitComposition.Guidance(model, "x", float.NaN), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("guidance-scale"));
        Assert.That(() => LogitComposition.Contrastive(model, model, 0), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("contrastive-alpha"));
        Assert.That(() => LogitComposition.Contrastive(model, model, 1.5f), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("contrastive-alpha"));
        Assert.That(() => LogitComposition.Sum(model, (model, float.PositiveInfinity)), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("weight"));
        Assert.That(() => new LogitComposition([]), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("at least one member"));
        using var composition = LogitComposition.Sum(model, (model, 1f));
        Assert.That(() => composition.Session.Forward([2048], new float[2048]), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("2048"));
        Assert.That(composition.OnDevice, Is.False);
        Assert.That(((IDeviceSampler)composition.Session).CanSample, Is.False);
    }
}
