using System.Text.Json.Nodes;
using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Models.Scoring;
using KernelLM.Runtime;
using KernelLM.Runtime.Signals;
using KernelLM.Tests.Fixtures;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Models;

/// <summary>
/// Teacher-forced scoring through the fused reduction against the direct computation: fp64 log-softmax,
/// entropy, kurtosis and KL (<see cref="ReferenceVocabStats"/>) of the logits <see cref="LlamaSession.Forward"/>
/// writes for all positions. The scorer and the direct forward run on the same model with the same prefill
/// chunk, so their logits are identical and the tolerances are the reduction's own (derived in
/// <see cref="Tolerances"/>); a separate test checks that the chunk size changes nothing beyond fp32 rounding.
/// </summary>
[TestFixture]
public sealed class ScorerTests
{
    private const string Story = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog, Max. "
        + "One day, Lily saw a big red ball under a tree. She ran to get it, but Max got there first.";

    /// <summary>Logits of one forward pass over the same rows in another chunking differ by fp32 summation order
    /// only: ~1e-5 measured on this model (GoldenTests, incremental vs chunked), so 1e-4 as there.</summary>
    private const double ChunkingTolerance = 1e-4;

    private string _directory = "";

    [SetUp]
    public void CreateDirectory() => _directory = TestPaths.NewTemporaryDirectory("scorer");

    [TearDown]
    public void DeleteDirectory() => Directory.Delete(_directory, recursive: true);

    private static LanguageModel Load(string directory, int prefillChunk = 128) =>
        LanguageModel.Load(directory, new ModelLoadOptions { Threads = 2, ContextLength = 256, PrefillChunk = prefillChunk });

    /// <summary>[ids.Length - 1, vocabulary] logits of positions 0..n-2 in one all-positions forward.</summary>
    private static float[] ForwardAll(LanguageModel model, int[] ids)
    {
        using var session = model.Model.CreateSession();
        var logits = new float[(ids.Length - 1) * model.Config.VocabularySize];
        session.Forward(ids.AsSpan(0, ids.Length - 1), logits, allPositions: true);
        return logits;
    }

    private static double MaxAbs(ReadOnlySpan<float> row, ReadOnlySpan<float> other = default)
    {
        double max = 0;
        foreach (float x in row)
        {
            max = Math.Max(max, Math.Abs(x));
        }
        foreach (float y in other)
        {
            max = Math.Max(max, Math.Abs(y));
        }
        return max;
    }

    [TestCase(128, 0, TestName = "score_matches_fp64(tiny-stories, chunk=128, k=0)")]
    [TestCase(7, 5, TestName = "score_matches_fp64(tiny-stories, chunk=7, k=5)")]
    public void Scores_equal_the_direct_fp64_computation(int prefillChunk, int topK)
    {
        using var model = Load(TestPaths.TinyStories, prefillChunk);
        int[] ids = model.Encode(Story);
        Assert.That(ids, Has.Length.GreaterThan(40));
        using var scorer = new Scorer(model, topK: topK);
        var score = scorer.Score(ids);
        var logits = ForwardAll(model, ids);
        int vocabulary = model.Config.VocabularySize;
        int n = VocabStats.ChunkLength;

        Assert.That(score.Tokens, Is.EqualTo(ids));
        Assert.That(score.Positions, Has.Count.EqualTo(ids.Length - 1));
        double sum = 0;
        using (Assert.EnterMultipleScope())
        {
            for (int i = 1; i < ids.Length; i++)
            {
                var row = logits.AsSpan((i - 1) * vocabulary, vocabulary);
                var expected = ReferenceVocabStats.Compute(row, ids[i], [], topK);
                var actual = score.Positions[i - 1];
                string at = $"position {i}";
                Assert.That(actual.Position, Is.EqualTo(i), at);
                Assert.That(actual.Token, Is.EqualTo(ids[i]), at);
                Assert.That(actual.LogProbability, Is.EqualTo(ReferenceOps.LogSoftmax(row)[ids[i]]).Within(Tolerances.VocabLogSumExp(n, MaxAbs(row))), $"{at}: logprob");
                Assert.That(actual.Entropy, Is.EqualTo(ReferenceOps.Entropy(row)).Within(Tolerances.VocabEntropy(n, expected.MaxShift)), $"{at}: entropy");
                double kurtosisTolerance = Tolerances.VocabKurtosis(n, expected.PowerMomentMagnitude, expected.SecondCentralMoment)
                    * Math.Max(1, Math.Abs(expected.Kurtosis + 3));
                Assert.That(actual.Kurtosis, Is.EqualTo(expected.Kurtosis).Within(kurtosisTolerance), $"{at}: kurtosis");
                Assert.That(actual.Margin, Is.EqualTo(expected.Margin).Within(2 * Tolerances.VocabLogSumExp(n, MaxAbs(row))), $"{at}: margin");
                Assert.That(actual.KlPq, Is.NaN, $"{at}: no reference, no KL");
                Assert.That(actual.LogRatio, Is.NaN, $"{at}: no reference, no log-ratio");
                Assert.That(actual.Top.Select(a => a.Id), Is.EqualTo(expected.TopIds.Where(id => id >= 0)), $"{at}: top-{topK}");
                sum += expected.TokenLogProb;
            }
        }
        Assert.That(score.SumLogProbability, Is.EqualTo(sum).Within(1e-3));
        Assert.That(score.Perplexity, Is.EqualTo(Math.Exp(-sum / (ids.Length - 1))).Within(1e-3 * score.Perplexity));
        Assert.That(score.MeanKlPq, Is.NaN);

        // LanguageModel.Score is the same scorer.
        Assert.That(model.Score(ids).Select(p => p.LogProbability), Is.EqualTo(score.Positions.Select(p => p.LogProbability)));
    }

    [Test]
    public void Chunk_size_changes_nothing_beyond_fp32_rounding()
    {
        using var whole = Load(TestPaths.TinyStories, 128);
        using var chunked = Load(TestPaths.TinyStories, 5);
        using var wholeScorer = new Scorer(whole);
        using var chunkedScorer = new Scorer(chunked);
        Assert.That(chunkedScorer.ChunkLength, Is.EqualTo(5));
        var a = wholeScorer.Score(Story).Positions;
        var b = chunkedScorer.Score(Story).Positions;
        Assert.That(b.Select(p => (double)p.LogProbability), Is.EqualTo(a.Select(p => (double)p.LogProbability)).Within(ChunkingTolerance));
        Assert.That(b.Select(p => (double)p.Entropy), Is.EqualTo(a.Select(p => (double)p.Entropy)).Within(ChunkingTolerance));
    }

    [Test]
    public void Buffers_are_reused_across_texts_and_texts_do_not_leak_into_each_other()
    {
        using var model = Load(TestPaths.TinyStories, 7);
        using var scorer = new Scorer(model);
        var first = scorer.Score("The little cat sat on the mat.").Positions;
        scorer.Score(Story);
        var again = scorer.Score("The little cat sat on the mat.").Positions;
        Assert.That(again.Select(p => p.LogProbability), Is.EqualTo(first.Select(p => p.LogProbability)));
        Assert.That(scorer.ByteLength, Is.EqualTo(7L * 2048 * sizeof(float) + 7L * VocabStats.FieldCount * sizeof(float)));
    }

    [Test]
    public void Reference_equal_to_the_model_gives_zero_kl_and_zero_log_ratio()
    {
        using var model = Load(TestPaths.TinyStories, 7);
        using var same = Load(TestPaths.TinyStories, 7);
        using var scorer = new Scorer(model, same);
        var score = scorer.Score(Story);
        using var plain = new Scorer(model);
        var alone = plain.Score(Story);
        Assert.That(score.Positions.Select(p => p.KlPq), Is.All.Zero);
        Assert.That(score.Positions.Select(p => p.KlQp), Is.All.Zero);
        Assert.That(score.Positions.Select(p => p.LogRatio), Is.All.Zero);
        Assert.That(score.MeanKlPq, Is.Zero);
        Assert.That(score.SumLogRatio, Is.Zero);
        Assert.That(score.Positions.Select(p => p.LogProbability), Is.EqualTo(alone.Positions.Select(p => p.LogProbability)), "the reference changes nothing else");
        Assert.That(() => new Scorer(model, model), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("load the folder a second time"));
    }

    /// <summary>q: a seeded synthetic model with the tiny-stories tokenizer; its LM head padded past the tokenizer's
    /// 2048 tokens when <paramref name="padding"/> &gt; 0, on the reference or on the scored side.</summary>
    [TestCase(0, false, TestName = "score_kl_matches_fp64(reference=synthetic)")]
    [TestCase(64, false, TestName = "score_kl_matches_fp64(reference=synthetic with vocab 2112, tokenizer 2048)")]
    [TestCase(64, true, TestName = "score_kl_matches_fp64(scored=synthetic with vocab 2112, tokenizer 2048)")]
    public void Kl_against_a_synthetic_reference_matches_fp64(int padding, bool paddedIsScored)
    {
        string synthetic = SyntheticModel.Write(Path.Combine(_directory, "synthetic"),
            new SyntheticModelSpec { VocabularySize = 2048 + padding, MaxPositionEmbeddings = 256, Seed = 11 });
        using var tiny = Load(TestPaths.TinyStories, 7);
        using var other = Load(synthetic, 7);
        var (p, q) = paddedIsScored ? (other, tiny) : (tiny, other);
        using var scorer = new Scorer(p, q, topK: 3);
        Assert.That(scorer.ReductionWidth, Is.EqualTo(2048));
        int[] ids = p.Encode(Story);
        var score = scorer.Score(ids);
        var pLogits = ForwardAll(p, ids);
        var qLogits = ForwardAll(q, ids);
        int n = VocabStats.ChunkLength;
        double klSum = 0;
        using (Assert.EnterMultipleScope())
        {
            for (int i = 1; i < ids.Length; i++)
            {
                // The direct computation cuts padded rows to the tokenizer's vocabulary by hand.
                var pRow = pLogits.AsSpan((i - 1) * p.Config.VocabularySize, 2048);
                var qRow = qLogits.AsSpan((i - 1) * q.Config.VocabularySize, 2048);
                var expected = ReferenceVocabStats.Compute(pRow, ids[i], qRow, 3);
                var actual = score.Positions[i - 1];
                double maxAbs = MaxAbs(pRow, qRow);
                double klTolerance = Tolerances.VocabKl(n, maxAbs, expected.MaxDifference);
                Assert.That(expected.KlPq, Is.GreaterThan(0.1), "the two models really differ");
                Assert.That(actual.KlPq, Is.EqualTo(expected.KlPq).Within(klTolerance), $"position {i}: KL(p||q)");
                Assert.That(actual.KlQp, Is.EqualTo(expected.KlQp).Within(klTolerance), $"position {i}: KL(q||p)");
                Assert.That(actual.LogRatio, Is.EqualTo(expected.TokenLogRatio).Within(2 * Tolerances.VocabLogSumExp(n, maxAbs)), $"position {i}: log-ratio");
                Assert.That(actual.LogProbability, Is.EqualTo(expected.TokenLogProb).Within(Tolerances.VocabLogSumExp(n, maxAbs)), $"position {i}: logprob");
                klSum += expected.KlPq;
            }
        }
        Assert.That(score.MeanKlPq, Is.EqualTo(klSum / (ids.Length - 1)).Within(1e-3));
    }

    [Test]
    public void A_reference_with_another_tokenizer_is_refused_naming_both_folders_and_the_token()
    {
        string synthetic = SyntheticModel.Write(Path.Combine(_directory, "other-tokenizer"), new SyntheticModelSpec { MaxPositionEmbeddings = 256 });
        string tokenizerPath = Path.Combine(synthetic, "tokenizer.json");
        var tokenizer = JsonNode.Parse(File.ReadAllText(tokenizerPath))!;
        tokenizer["added_tokens"]![1]!["content"] = "<|end|>";
        File.WriteAllText(tokenizerPath, tokenizer.ToJsonString());
        using var model = Load(TestPaths.TinyStories);
        using var reference = Load(synthetic);
        Assert.That(() => new Scorer(model, reference), Throws.TypeOf<InvalidParameterException>()
            .With.Message.Contains(TestPaths.TinyStories).And.Message.Contains(synthetic)
            .And.Message.Contains("token id 1").And.Message.Contains("\"<|eos|>\"").And.Message.Contains("\"<|end|>\""));
    }

    [Test]
    public void A_reference_that_handles_bos_differently_is_refused()
    {
        string synthetic = SyntheticModel.Write(Path.Combine(_directory, "no-bos"), new SyntheticModelSpec { MaxPositionEmbeddings = 256 });
        File.WriteAllText(Path.Combine(synthetic, "tokenizer_config.json"), """{ "add_bos_token": false }""");
        using var model = Load(TestPaths.TinyStories);
        using var reference = Load(synthetic);
        Assert.That(() => new Scorer(model, reference), Throws.TypeOf<InvalidParameterException>()
            .With.Message.Contains("add_bos_token true").And.Message.Contains("add_bos_token false").And.Message.Contains(synthetic));
    }

    [Test]
    public void A_reference_whose_lm_head_is_smaller_than_the_tokenizer_is_refused()
    {
        string synthetic = SyntheticModel.Write(Path.Combine(_directory, "small-head"), new SyntheticModelSpec { VocabularySize = 2000, MaxPositionEmbeddings = 256 });
        using var model = Load(TestPaths.TinyStories);
        using var reference = Load(synthetic);
        Assert.That(() => new Scorer(model, reference), Throws.TypeOf<InvalidParameterException>()
            .With.Message.Contains("vocab_size 2048").And.Message.Contains("2000").And.Message.Contains("padding"));
    }

    [Test]
    public void Texts_that_are_too_short_or_too_long_are_typed_errors_with_the_counts()
    {
        using var model = LanguageModel.Load(TestPaths.TinyStories, new ModelLoadOptions { Threads = 2, ContextLength = 16 });
        using var scorer = new Scorer(model);
        Assert.That(() => scorer.Score(""), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("1 token(s)"));
        int tokens = model.Encode(Story).Length;
        Assert.That(() => scorer.Score(Story), Throws.TypeOf<ContextLengthException>()
            .With.Message.EqualTo($"the text is {tokens} tokens; the context holds 16"));
        Assert.That(() => new Scorer(model, topK: VocabStats.MaxTopK + 1), Throws.TypeOf<InvalidParameterException>());
    }
}
