using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Runtime;
using KernelLM.Runtime.Generation;
using KernelLM.Runtime.Sampling;
using KernelLM.Runtime.Signals;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Signals;

/// <summary>Per-token signals attached to streamed tokens, and the sequence-level uncertainty summary.</summary>
[TestFixture]
public sealed class GenerationSignalsTests
{
    private LanguageModel _model = null!;

    [OneTimeSetUp]
    public void SetUp() => _model = LanguageModel.Load(TestPaths.TinyStories, new ModelLoadOptions { Threads = 2, ContextLength = 256 });

    [OneTimeTearDown]
    public void TearDown() => _model.Dispose();

    private static GenerationOptions Options(TokenSignalOptions? signals, int seed = 5) => new()
    {
        MaxNewTokens = 24,
        Sampling = new SamplingOptions { Temperature = 0.9f, TopK = 40, TopP = 0.95f, Seed = seed },
        Signals = signals,
    };

    [Test]
    public void Signals_are_off_by_default_and_do_not_change_the_tokens()
    {
        var offStats = new GenerationStats();
        var off = _model.Generate("Once upon a time", Options(null), offStats).ToList();
        var onStats = new GenerationStats();
        var on = _model.Generate("Once upon a time", Options(new TokenSignalOptions { TopK = 3 }), onStats).ToList();
        Assert.That(off.Select(t => t.Signals), Has.All.Null);
        Assert.That(offStats.Uncertainty, Is.Null);
        Assert.That(on.Select(t => t.Id), Is.EqualTo(off.Select(t => t.Id)), "asking for signals must not change what is generated");
        Assert.That(on.Where(t => t.Id >= 0).Select(t => t.Signals), Has.All.Not.Null);
        Assert.That(onStats.Uncertainty, Is.Not.Null);
    }

    [Test]
    public void The_first_tokens_numbers_describe_the_distribution_after_the_whole_prompt()
    {
        const string prompt = "The little dog";
        var first = _model.Generate(prompt, Options(new TokenSignalOptions { TopK = 16 })).First();
        int[] ids = _model.Encode(prompt);
        using var session = _model.Model.CreateSession();
        var logits = new float[_model.Config.VocabularySize];
        session.Forward(ids, logits);
        var expected = ReferenceVocabStats.Compute(logits, first.Id, [], 16);
        var signals = first.Signals!;
        Assert.Multiple(() =>
        {
            Assert.That(signals.Token, Is.EqualTo(first.Id));
            Assert.That(signals.LogProbability, Is.EqualTo(expected.TokenLogProb).Within(1e-4));
            Assert.That(signals.LogProbability, Is.EqualTo(first.LogProbability).Within(1e-4), "the streamed log-prob and the signal agree");
            Assert.That(signals.Entropy, Is.EqualTo(expected.Entropy).Within(1e-4));
            Assert.That(signals.Kurtosis, Is.EqualTo(expected.Kurtosis).Within(1e-4 * Math.Abs(expected.Kurtosis)));
            Assert.That(signals.Margin, Is.EqualTo(expected.Margin).Within(1e-5));
            Assert.That(signals.Top.Select(t => t.Id), Is.EqualTo(expected.TopIds));
            Assert.That(signals.Top.Select(t => (double)t.LogProbability), Is.EqualTo(expected.TopLogProbs).Within(1e-4));
        });
    }

    [Test]
    public void The_summary_is_the_means_of_the_streamed_tokens()
    {
        var stats = new GenerationStats();
        var signals = _model.Generate("Lily wanted", Options(new TokenSignalOptions { TopK = 0 }, seed: 11), stats)
            .Where(t => t.Signals is not null).Select(t => t.Signals!).ToList();
        var summary = stats.Uncertainty!;
        Assert.Multiple(() =>
        {
            Assert.That(summary.TokenCount, Is.EqualTo(signals.Count).And.EqualTo(stats.GeneratedTokens - (stats.FinishReason == FinishReason.EndOfSequence ? 1 : 0)));
            Assert.That(summary.GeometricMeanProbability, Is.EqualTo(Math.Exp(signals.Average(s => (double)s.LogProbability))).Within(1e-12));
            Assert.That(summary.ArithmeticMeanProbability, Is.EqualTo(signals.Average(s => Math.Exp(s.LogProbability))).Within(1e-12));
            Assert.That(summary.MeanEntropy, Is.EqualTo(signals.Average(s => (double)s.Entropy)).Within(1e-12));
            Assert.That(summary.MeanKurtosis, Is.EqualTo(signals.Average(s => (double)s.Kurtosis)).Within(1e-9 * Math.Abs(summary.MeanKurtosis)));
            Assert.That(summary.GeometricMeanProbability, Is.LessThanOrEqualTo(summary.ArithmeticMeanProbability), "AM-GM");
            Assert.That(signals.Select(s => s.Top.Count), Has.All.Zero);
        });
    }

    [Test]
    public void Signal_options_are_validated()
    {
        var options = Options(new TokenSignalOptions { TopK = 17 });
        Assert.That(() => _model.Generate("x", options).ToList(),
            Throws.InstanceOf<InvalidParameterException>().With.Message.Contains("signals top-k"));
        Assert.That(UncertaintySummary.From([]).GeometricMeanProbability, Is.NaN);
    }

    [Test]
    public void The_reduction_allocates_nothing()
    {
        var logits = VocabStatsCheck.Row("masked", 32000, 1);
        var reference = VocabStatsCheck.Row("random", 32000, 2);
        var stats = new float[VocabStats.FieldCount];
        var ids = new int[16];
        var logProbs = new float[16];
        for (int i = 0; i < 50; i++)
        {
            VocabStats.ReduceRow(logits, 3, reference, 16, stats, ids, logProbs);
        }
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 20; i++)
        {
            VocabStats.ReduceRow(logits, 3, reference, 16, stats, ids, logProbs);
        }
        Assert.That(GC.GetAllocatedBytesForCurrentThread() - before, Is.Zero);
    }
}
