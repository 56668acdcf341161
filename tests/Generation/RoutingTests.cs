using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Models.Routing;
using KernelLM.Runtime;
using KernelLM.Runtime.Generation;
using KernelLM.Runtime.Sampling;
using KernelLM.Tests.Fixtures;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Generation;

/// <summary>
/// Small/large routing on a device: every routed token is the greedy choice of the model the small model's entropy
/// picks, with that model's log-prob, against full recomputations of both models; with two copies of one model routing
/// changes nothing. On the CPU the small model is tiny-stories and the large one a synthetic model (its own seed); on
/// the CUDA path two synthetic f32 models.
/// </summary>
[TestFixture("cpu")]
[TestFixture("cuda-emulated")]
[TestFixture("cuda")]
public sealed class RoutingTests(string deviceName)
{
    private DeviceModel _small = null!;
    private DeviceModel _large = null!;

    [OneTimeSetUp]
    public void Load()
    {
        _small = new DeviceModel(deviceName, seed: 11);
        _large = new DeviceModel(deviceName, seed: 12, shareDevice: _small.Device, synthetic: true);
    }

    [OneTimeTearDown]
    public void Unload()
    {
        _large?.Dispose();
        _small?.Dispose();
    }

    private int Tokens => deviceName == "cuda-emulated" ? 8 : 30;

    private static double Entropy(double[] logProbs) => -logProbs.Where(double.IsFinite).Sum(l => Math.Exp(l) * l);

    /// <summary>The small model's entropies along its own greedy continuation: a threshold at their median gives both models turns.</summary>
    private double MedianEntropy(int[] prompt)
    {
        using var oracle = _small.NewSession();
        var sequence = new List<int>(prompt);
        var entropies = new List<double>();
        for (int i = 0; i < Tokens; i++)
        {
            var logProbs = _small.Distribution(oracle, sequence);
            entropies.Add(Entropy(logProbs));
            sequence.Add(AdaptiveDecodingOracle.ArgMax(logProbs));
        }
        entropies.Sort();
        return entropies[entropies.Count / 2];
    }

    [Test]
    public void Each_token_is_the_choice_of_the_model_the_entropy_picks()
    {
        int[] prompt = _small.Tokenizer.Encode("Once upon a time");
        float threshold = (float)MedianEntropy(prompt);
        using var small = _small.NewSession();
        using var large = _large.NewSession();
        var routingStats = new RoutingStats();
        using var routed = new RoutedSession(small, large, new RoutingOptions { EntropyThreshold = threshold }, routingStats);
        var stats = new GenerationStats();
        var options = new GenerationOptions { MaxNewTokens = Tokens, Sampling = SamplingOptions.Greedy, StopOnEos = false };
        var tokens = Generator.Run(routed, _small.Tokenizer, prompt, options, stats).Where(t => t.Id >= 0).ToList();

        using var smallOracle = _small.NewSession();
        using var largeOracle = _large.NewSession();
        var sequence = new List<int>(prompt);
        int smallTurns = 0, largeTurns = 0;
        foreach (var token in tokens)
        {
            var smallLogProbs = _small.Distribution(smallOracle, sequence);
            double entropy = Entropy(smallLogProbs);
            bool toLarge = entropy > threshold;
            smallTurns += toLarge ? 0 : 1;
            largeTurns += toLarge ? 1 : 0;
            if (Math.Abs(entropy - threshold) > AdaptiveDecodingOracle.NearTie)
            {
                var logProbs = toLarge ? _large.Distribution(largeOracle, sequence) : smallLogProbs;
                string where = $"position {sequence.Count} ({(toLarge ? "large" : "small")}, small entropy {entropy:F4}, threshold {threshold:F4})";
                Assert.That(logProbs[token.Id], Is.GreaterThanOrEqualTo(logProbs.Max() - AdaptiveDecodingOracle.NearTie), $"{where}: greedy token");
                Assert.That(token.LogProbability, Is.EqualTo(logProbs[token.Id]).Within(1e-4), $"{where}: the log-prob is that model's");
            }
            sequence.Add(token.Id);
        }
        Assert.That(routingStats.SmallTokens + routingStats.LargeTokens, Is.EqualTo(stats.GeneratedTokens));
        Assert.That(routingStats.LargeTokens, Is.EqualTo(largeTurns));
        Assert.That(routingStats.SmallTokens, Is.EqualTo(smallTurns));
        Assert.That(largeTurns, Is.GreaterThan(0));
        Assert.That(smallTurns, Is.GreaterThan(0));
        Assert.That(large.Length, Is.LessThanOrEqualTo(small.Length));
        TestContext.Out.WriteLine($"{deviceName}: small {smallTurns}, large {largeTurns} tokens, {routingStats.CatchUpTokens} caught up");
    }

    [Test]
    public void Sampled_routing_is_reproducible_with_a_seed()
    {
        int[] prompt = _small.Tokenizer.Encode("Once upon a time");
        float threshold = (float)MedianEntropy(prompt);
        var options = new GenerationOptions
        {
            MaxNewTokens = Tokens,
            StopOnEos = false,
            Sampling = new SamplingOptions { Temperature = 1.0f, TopK = 50, TopP = 0.95f, MinP = 0.02f, Seed = 7 },
        };
        (List<int> Ids, int Small, int Large) Run()
        {
            using var small = _small.NewSession();
            using var large = _large.NewSession();
            var routingStats = new RoutingStats();
            using var routed = new RoutedSession(small, large, new RoutingOptions { EntropyThreshold = threshold }, routingStats);
            var ids = Generator.Run(routed, _small.Tokenizer, prompt, options, new GenerationStats()).Where(t => t.Id >= 0).Select(t => t.Id).ToList();
            return (ids, routingStats.SmallTokens, routingStats.LargeTokens);
        }
        var first = Run();
        var again = Run();
        Assert.That(again.Ids, Is.EqualTo(first.Ids));
        Assert.That((again.Small, again.Large), Is.EqualTo((first.Small, first.Large)));
        Assert.That(first.Small + first.Large, Is.EqualTo(Tokens));
    }

    [Test]
    public void With_two_copies_of_one_model_routing_changes_nothing()
    {
        int[] prompt = _small.Tokenizer.Encode("The little cat");
        var options = new GenerationOptions { MaxNewTokens = Tokens, Sampling = SamplingOptions.Greedy };
        using var plainSession = _small.NewSession();
        var plain = Generator.Run(plainSession, _small.Tokenizer, prompt, options, new GenerationStats()).Select(t => t.Id).ToList();
        float threshold = (float)MedianEntropy(prompt);
        using var small = _small.NewSession();
        using var large = _small.NewSession();
        var routingStats = new RoutingStats();
        using var routed = new RoutedSession(small, large, new RoutingOptions { EntropyThreshold = threshold }, routingStats);
        var routedIds = Generator.Run(routed, _small.Tokenizer, prompt, options, new GenerationStats()).Select(t => t.Id).ToList();

        // The large copy catches up in prefill chunks where the plain run decoded one token at a time: a different summation
        // order, so only a near tie may go the other way.
        int same = 0;
        while (same < Math.Min(plain.Count, routedIds.Count) && plain[same] == routedIds[same])
        {
            same++;
        }
        if (same < Math.Min(plain.Count, routedIds.Count))
        {
            using var oracle = _small.NewSession();
            var logProbs = _small.Distribution(oracle, [.. prompt, .. plain.Take(same)]);
            Assert.That(Math.Abs(logProbs[plain[same]] - logProbs[routedIds[same]]), Is.LessThan(1e-3), $"token {same} differs without a near tie");
        }
        else
        {
            Assert.That(routedIds, Is.EqualTo(plain));
        }
        Assert.That(routingStats.LargeTokens, Is.GreaterThan(0));
    }
}

/// <summary>What routing refuses, on the CPU.</summary>
[TestFixture]
public sealed class RoutingCheckTests
{
    [Test]
    public void Routed_sessions_need_two_sessions_of_one_width_and_give_the_last_row_only()
    {
        using var a = new ScriptedSession(48, 64);
        using var b = new ScriptedSession(48, 64);
        using var c = new ScriptedSession(50, 64);
        Assert.That(() => new RoutedSession(a, a, new RoutingOptions()), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("two sessions"));
        Assert.That(() => new RoutedSession(a, c, new RoutingOptions()), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("48").And.Message.Contains("50"));
        Assert.That(() => new RoutedSession(a, b, new RoutingOptions { EntropyThreshold = -1 }), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("route-entropy"));
        using var routed = new RoutedSession(a, b, new RoutingOptions { EntropyThreshold = 1 });
        Assert.That(() => routed.Forward([1, 2], new float[96], allPositions: true), Throws.TypeOf<NotSupportedException>());
        Assert.That(routed.CanSample, Is.False);
    }

    [Test]
    public void The_large_model_catches_up_on_every_token_since_its_last_turn_in_one_prefill()
    {
        using var small = new ScriptedSession(48, 256);
        using var large = new ScriptedSession(48, 256);
        // The threshold: the median entropy of the scripted rows along a greedy path, so that both models get turns.
        var path = new List<int> { 1, 2, 3 };
        var entropies = new List<double>();
        for (int i = 0; i < 40; i++)
        {
            var logProbs = small.Distribution(path);
            entropies.Add(-logProbs.Sum(l => Math.Exp(l) * l));
            path.Add(AdaptiveDecodingOracle.ArgMax(logProbs));
        }
        entropies.Sort();
        var stats = new RoutingStats();
        using var routed = new RoutedSession(small, large, new RoutingOptions { EntropyThreshold = (float)entropies[20] }, stats);
        var generation = new GenerationStats();
        var ids = Generator.Run(routed, new EosByteTokenizer(), [1, 2, 3], new GenerationOptions { MaxNewTokens = 40, Sampling = SamplingOptions.Greedy }, generation)
            .Where(t => t.Id >= 0).Select(t => t.Id).ToList();
        Assert.That(stats.LargeTokens, Is.GreaterThan(0));
        Assert.That(stats.SmallTokens, Is.GreaterThan(0));
        Assert.That(small.ForwardedTokens, Is.EqualTo(3 + ids.Count - 1), "the small model sees every token once");
        Assert.That(large.ForwardedTokens, Is.EqualTo(stats.CatchUpTokens), "the large model sees each token at most once, when it catches up");
        Assert.That(large.ForwardedTokens, Is.LessThanOrEqualTo(small.ForwardedTokens));
    }

    [Test]
    public void After_the_delimiter_the_large_model_produces_the_next_tokens_whatever_the_entropy()
    {
        static void Negated(IReadOnlyList<int> history, Span<float> row)
        {
            ScriptedSession.HashedLogits(history, row);
            foreach (ref float value in row)
            {
                value = -value;
            }
        }
        using var small = new ScriptedSession(48, 64);
        using var large = new ScriptedSession(48, 64, Negated);
        var stats = new RoutingStats();
        var options = new RoutingOptions { EntropyThreshold = 1000, HandoverDelimiter = "\n\n", HandoverTokens = 2 };
        using var routed = new RoutedSession(small, large, options, stats, new EosByteTokenizer());
        var logits = new float[48];
        var history = new List<int>();
        var expected = new float[48];
        void Step(int[] tokens, bool toLarge)
        {
            history.AddRange(tokens);
            routed.Forward(tokens, logits);
            (toLarge ? (Action<IReadOnlyList<int>, Span<float>>)Negated : ScriptedSession.HashedLogits)(history, expected);
            Assert.That(logits, Is.EqualTo(expected), $"after [{string.Join(", ", history)}]: the {(toLarge ? "large" : "small")} model's row");
        }
        Step([1, 2, 3], toLarge: false);
        Step([10], toLarge: false);   // "\n": half the delimiter
        Step([10], toLarge: true);    // "\n\n": the large model takes this token and the next
        Step([5], toLarge: true);
        Step([6], toLarge: false);
        Step([10, 10], toLarge: true); // the delimiter inside one feed
        Assert.That((stats.SmallTokens, stats.LargeTokens, stats.HandoverTokens), Is.EqualTo((3, 3, 3)));
        Assert.That(stats.CatchUpTokens, Is.EqualTo(large.ForwardedTokens));
        Assert.That(large.ForwardedTokens, Is.EqualTo(history.Count), "each token once");

        Assert.That(() => new RoutedSession(small, large, options), Throws.TypeOf<ArgumentNullException>().With.Message.Contains("tokenizer"));
        Assert.That(() => new RoutedSession(small, large, options with { HandoverTokens = 0 }), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("route-after"));
        Assert.That(() => new RoutedSession(small, large, new RoutingOptions { HandoverTokens = 3 }), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("route-tokens"));
    }

    [Test]
    public void A_draft_model_must_share_the_tokenizer_and_the_head_width()
    {
        string directory = TestPaths.NewTemporaryDirectory("routing-pair");
        try
        {
            using var large = LanguageModel.Load(TestPaths.TinyStories, new ModelLoadOptions { Device = "cpu", Threads = 1, ContextLength = 64 });
            Assert.That(() => RoutedGeneration.CheckPair(large, large), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("draft-model"));
            // Same tokenizer, LM head padded to 2112 rows: the widths differ.
            SyntheticModel.Write(directory, new SyntheticModelSpec { VocabularySize = 2112 });
            using var padded = LanguageModel.Load(directory, new ModelLoadOptions { Device = "cpu", Threads = 1, ContextLength = 64 });
            Assert.That(() => RoutedGeneration.CheckPair(large, padded), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("same width").And.Message.Contains("2112"));
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }
}
