using KernelLM.Runtime;
using KernelLM.Runtime.Generation;
using KernelLM.Runtime.Sampling;
using KernelLM.Runtime.Signals;

namespace KernelLM.Tests.Generation;

/// <summary>
/// Adaptive decoding on synthetic logits (<see cref="ScriptedSession"/>): every choice against a full recomputation
/// (<see cref="AdaptiveDecodingOracle"/>), the lookahead's bookkeeping (nothing recomputed, every fork rolled back),
/// a hand-made case where the lookahead must overrule greedy, and the parameter checks.
/// </summary>
[TestFixture]
public sealed class AdaptiveDecodingTests
{
    private const int Vocabulary = 48;
    private const int Eos = 10;
    private static readonly int[] Prompt = [1, 2, 3];

    private static GenerationOptions Options(AdaptiveDecodingOptions adaptive, int tokens = 60) => new()
    {
        MaxNewTokens = tokens,
        Sampling = SamplingOptions.Greedy,
        Adaptive = adaptive,
    };

    /// <summary>The ids the generator chose, the EOS that ended it included.</summary>
    private static List<int> Generate(IDecoderSession session, GenerationOptions options, GenerationStats stats)
    {
        var ids = Generator.Run(session, new EosByteTokenizer(Eos), Prompt, options, stats).Where(t => t.Id >= 0).Select(t => t.Id).ToList();
        if (stats.FinishReason == FinishReason.EndOfSequence)
        {
            ids.Add(Eos);
        }
        return ids;
    }

    [TestCase(0f, 3, 5)]
    [TestCase(2.5f, 3, 5)]
    [TestCase(0f, 2, 1)]
    [TestCase(0f, 16, 3)]
    public void Lookahead_picks_the_candidate_with_the_best_mean_log_prob(float threshold, int beams, int lookahead)
    {
        var adaptive = new AdaptiveDecodingOptions { Threshold = threshold, Beams = beams, Lookahead = lookahead };
        using var session = new ScriptedSession(Vocabulary, 256);
        var stats = new GenerationStats();
        var ids = Generate(session, Options(adaptive), stats);

        int lookaheads = AdaptiveDecodingOracle.CheckChoices(session.Distribution, Prompt, ids, adaptive, [Eos], session.Capacity);
        Assert.That(stats.Adaptive!.Steps, Is.EqualTo(ids.Count));
        Assert.That(stats.Adaptive.LookaheadSteps, Is.EqualTo(lookaheads), "steps at or above the threshold");
        Assert.That(lookaheads, Is.GreaterThan(0));
        if (threshold == 0)
        {
            Assert.That(stats.Adaptive.ChangedTokens, Is.GreaterThan(0), "the lookahead overruled greedy somewhere (else this test could not tell)");
        }
    }

    [Test]
    public void The_lookahead_forks_and_rolls_back_without_recomputing_the_prefix()
    {
        var adaptive = new AdaptiveDecodingOptions { Threshold = 0, Beams = 3, Lookahead = 4 };
        using var session = new ScriptedSession(Vocabulary, 256);
        var stats = new GenerationStats();
        var ids = Generate(session, Options(adaptive, tokens: 30), stats);

        // The prompt once, each chosen token once (the last one is never fed), and one token per rollout step.
        Assert.That(session.ForwardedTokens, Is.EqualTo(Prompt.Length + (ids.Count - 1) + stats.Adaptive!.RolloutForwards));
        Assert.That(session.Length, Is.EqualTo(Prompt.Length + ids.Count - 1), "the cache holds exactly the prompt and the fed choices");
        Assert.That(session.Truncations, Is.EqualTo(stats.Adaptive.LookaheadSteps * adaptive.Beams), "every candidate's fork is rolled back");
        Assert.That(stats.Adaptive.RolloutForwards, Is.LessThanOrEqualTo(stats.Adaptive.LookaheadSteps * adaptive.Beams * adaptive.Lookahead));
    }

    [Test]
    public void A_threshold_above_every_entropy_is_plain_greedy()
    {
        using var plainSession = new ScriptedSession(Vocabulary, 256);
        var plain = Generate(plainSession, new GenerationOptions { MaxNewTokens = 40, Sampling = SamplingOptions.Greedy }, new GenerationStats());
        using var session = new ScriptedSession(Vocabulary, 256);
        var stats = new GenerationStats();
        var adaptive = Generate(session, Options(new AdaptiveDecodingOptions { Threshold = 100 }, tokens: 40), stats);
        Assert.That(adaptive, Is.EqualTo(plain));
        Assert.That(stats.Adaptive!.LookaheadSteps, Is.Zero);
        Assert.That(session.ForwardedTokens, Is.EqualTo(plainSession.ForwardedTokens));
    }

    /// <summary>
    /// After the prompt, token 0 is the more likely (p = 0.5) but leads into flat rows (log-prob ln 1/4 per token); token 1
    /// (p = 0.4) leads into peaked ones. The lookahead must take 1, and the streamed log-prob and signals must be token 1's
    /// under the first distribution.
    /// </summary>
    [Test]
    public void The_lookahead_overrules_greedy_when_the_greedy_path_is_worse()
    {
        static void Logits(IReadOnlyList<int> history, Span<float> row)
        {
            if (history.Count == Prompt.Length)
            {
                row[0] = MathF.Log(0.5f);
                row[1] = MathF.Log(0.4f);
                row[2] = MathF.Log(0.05f);
                row[3] = MathF.Log(0.05f);
                return;
            }
            bool flat = history[Prompt.Length] == 0;
            for (int v = 0; v < row.Length; v++)
            {
                row[v] = flat ? 0 : v == 2 ? 10 : 0;
            }
        }
        using var session = new ScriptedSession(4, 64, Logits);
        var options = Options(new AdaptiveDecodingOptions { Threshold = 0.5f, Beams = 2, Lookahead = 3 }, tokens: 3) with { Signals = new TokenSignalOptions { TopK = 2 } };
        var stats = new GenerationStats();
        var tokens = Generator.Run(session, new EosByteTokenizer(), Prompt, options, stats).ToList();

        Assert.That(tokens[0].Id, Is.EqualTo(1));
        Assert.That(tokens[0].LogProbability, Is.EqualTo(MathF.Log(0.4f)).Within(1e-6));
        Assert.That(tokens[0].Signals!.LogProbability, Is.EqualTo(MathF.Log(0.4f)).Within(1e-6), "the signals describe the chosen token");
        Assert.That(tokens[0].Signals!.Top.Select(t => t.Id), Is.EqualTo(new[] { 0, 1 }));
        // Afterwards the rows are peaked (entropy ~ 3e-4 nats, below the threshold): greedy, token 2.
        Assert.That(tokens.Skip(1).Where(t => t.Id >= 0).Select(t => t.Id), Is.EqualTo(new[] { 2, 2 }));
        Assert.That(stats.Adaptive!.LookaheadSteps, Is.EqualTo(1));
        Assert.That(stats.Adaptive.ChangedTokens, Is.EqualTo(1));
    }

    [Test]
    public void An_eos_candidate_is_scored_by_its_own_log_prob_and_ends_its_rollout()
    {
        // After the prompt: EOS p = 0.45, token 0 p = 0.55 followed by flat rows (ln 1/4 each): EOS's mean is ln 0.45 = -0.80,
        // token 0's is (ln 0.55 + 2 ln 0.25) / 3 = -1.12, so the generation ends at once.
        static void Logits(IReadOnlyList<int> history, Span<float> row)
        {
            row.Clear();
            if (history.Count == Prompt.Length)
            {
                row[0] = MathF.Log(0.55f);
                row[1] = MathF.Log(0.45f);
                row[2] = float.NegativeInfinity;
                row[3] = float.NegativeInfinity;
            }
        }
        using var session = new ScriptedSession(4, 64, Logits);
        var stats = new GenerationStats();
        var tokens = Generator.Run(session, new EosByteTokenizer(1), Prompt, Options(new AdaptiveDecodingOptions { Threshold = 0, Beams = 2, Lookahead = 2 }), stats).ToList();
        Assert.That(stats.FinishReason, Is.EqualTo(FinishReason.EndOfSequence));
        Assert.That(tokens.Where(t => t.Id >= 0), Is.Empty);
        Assert.That(stats.Adaptive!.RolloutForwards, Is.EqualTo(2), "token 0's rollout only");
    }

    [Test]
    public void Invalid_adaptive_options_are_rejected_naming_the_setting()
    {
        using var session = new ScriptedSession(Vocabulary, 64);
        int Run(GenerationOptions options) => Generator.Run(session, new EosByteTokenizer(Eos), Prompt, options, new GenerationStats()).Count();
        Assert.That(() => Run(Options(new AdaptiveDecodingOptions { Beams = 1 })), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("beams"));
        Assert.That(() => Run(Options(new AdaptiveDecodingOptions { Beams = 17 })), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("beams"));
        Assert.That(() => Run(Options(new AdaptiveDecodingOptions { Lookahead = 0 })), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("lookahead"));
        Assert.That(() => Run(Options(new AdaptiveDecodingOptions { Threshold = float.NaN })), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("threshold"));
        Assert.That(() => Run(Options(new AdaptiveDecodingOptions { Threshold = -1 })), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("threshold"));
        Assert.That(() => Run(Options(new AdaptiveDecodingOptions()) with { Sampling = new SamplingOptions { Temperature = 0.7f } }),
            Throws.TypeOf<InvalidParameterException>().With.Message.Contains("adaptive-decoding").And.Message.Contains("temperature"));
        Assert.That(() => Run(Options(new AdaptiveDecodingOptions()) with { Sampling = SamplingOptions.Greedy with { RepetitionPenalty = 1.2f } }),
            Throws.TypeOf<InvalidParameterException>().With.Message.Contains("repetition penalty"));
    }

    [Test]
    public void A_session_that_cannot_roll_back_is_refused()
    {
        using var inner = new ScriptedSession(Vocabulary, 64);
        using var session = new NoRollback(inner);
        Assert.That(() => Generator.Run(session, new EosByteTokenizer(Eos), Prompt, Options(new AdaptiveDecodingOptions()), new GenerationStats()).ToList(),
            Throws.TypeOf<InvalidParameterException>().With.Message.Contains("roll back"));
    }

    [Test]
    public void Truncate_outside_the_cached_length_is_refused()
    {
        using var session = new ScriptedSession(Vocabulary, 64);
        session.Forward(Prompt, new float[Vocabulary]);
        Assert.That(() => session.Truncate(4), Throws.TypeOf<ArgumentOutOfRangeException>().With.Message.Contains("0..3"));
        Assert.That(() => session.Truncate(-1), Throws.TypeOf<ArgumentOutOfRangeException>());
    }

    private sealed class NoRollback(IDecoderSession inner) : IDecoderSession
    {
        public int VocabularySize => inner.VocabularySize;
        public int Capacity => inner.Capacity;
        public int Length => inner.Length;
        public void Reset() => inner.Reset();
        public void Forward(ReadOnlySpan<int> tokens, Span<float> logits, bool allPositions = false) => inner.Forward(tokens, logits, allPositions);
        public void Dispose() => inner.Dispose();
    }
}
