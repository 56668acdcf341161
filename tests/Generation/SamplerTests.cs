using KernelLM.Runtime;
using KernelLM.Runtime.Sampling;

namespace KernelLM.Tests.Generation;

[TestFixture]
public sealed class SamplerTests
{
    private static readonly float[] Logits = [1.0f, 3.0f, 2.0f, -1.0f, 2.5f, 0.0f];

    private static double[] Softmax(IEnumerable<double> values)
    {
        var array = values.ToArray();
        double max = array.Max();
        var exp = array.Select(v => Math.Exp(v - max)).ToArray();
        double sum = exp.Sum();
        return exp.Select(e => e / sum).ToArray();
    }

    /// <summary>Empirical distribution from a fine grid of uniform draws: exact for an inverse-CDF sampler.</summary>
    private static double[] Distribution(SamplingOptions options, float[] logits, int[]? history = null)
    {
        var sampler = new Sampler(logits.Length);
        var counts = new double[logits.Length];
        const int draws = 20000;
        for (int i = 0; i < draws; i++)
        {
            counts[sampler.Sample(logits, options, history ?? [], (i + 0.5) / draws)]++;
        }
        return counts.Select(c => c / draws).ToArray();
    }

    /// <summary>The distribution that keeps ids 1, 4, 2 (logits 3.0, 2.5, 2.0) and renormalises.</summary>
    private static double[] TopThreeRenormalised()
    {
        var kept = Softmax([3.0, 2.5, 2.0]);
        var expected = new double[6];
        expected[1] = kept[0];
        expected[4] = kept[1];
        expected[2] = kept[2];
        return expected;
    }

    [Test]
    public void Greedy_takes_the_argmax_and_leaves_the_logits_unchanged()
    {
        var logits = (float[])Logits.Clone();
        Assert.That(new Sampler(6).Sample(logits, SamplingOptions.Greedy, [], 0.99), Is.EqualTo(1));
        Assert.That(logits, Is.EqualTo(Logits));
    }

    [Test]
    public void Plain_temperature_sampling_follows_the_softmax()
    {
        var options = new SamplingOptions { Temperature = 0.7f, TopK = 0, TopP = 1, MinP = 0 };
        var expected = Softmax(Logits.Select(l => l / 0.7));
        Assert.That(Distribution(options, Logits), Is.EqualTo(expected).Within(1e-3));
    }

    [Test]
    public void Top_k_keeps_the_k_most_likely_renormalised()
    {
        var options = new SamplingOptions { Temperature = 1, TopK = 3, TopP = 1, MinP = 0 };
        Assert.That(Distribution(options, Logits), Is.EqualTo(TopThreeRenormalised()).Within(1e-3));
    }

    [Test]
    public void Top_p_keeps_the_smallest_prefix_reaching_p()
    {
        var probabilities = Softmax(Logits.Select(l => (double)l));
        // Sorted: 3.0 (id 1), 2.5 (id 4), 2.0 (id 2), ... ; p = first two's mass + a little needs the third.
        double p = probabilities[1] + probabilities[4] + 0.01;
        var options = new SamplingOptions { Temperature = 1, TopK = 0, TopP = (float)p, MinP = 0 };
        Assert.That(Distribution(options, Logits), Is.EqualTo(TopThreeRenormalised()).Within(1e-3));
    }

    [Test]
    public void Min_p_drops_tokens_below_the_fraction_of_the_top()
    {
        // p(2.0) / p(3.0) = e^-1 = 0.37 survives min_p 0.3; p(1.0) / p(3.0) = e^-2 = 0.135 does not.
        var options = new SamplingOptions { Temperature = 1, TopK = 0, TopP = 1, MinP = 0.3f };
        Assert.That(Distribution(options, Logits), Is.EqualTo(TopThreeRenormalised()).Within(1e-3));
    }

    [Test]
    public void Repetition_penalty_divides_positive_and_multiplies_negative_logits()
    {
        // Penalise ids 1 (3.0 -> 1.5) and 3 (-1.0 -> -2.0), each once even when repeated in the history.
        var options = new SamplingOptions { Temperature = 1, TopK = 0, TopP = 1, MinP = 0, RepetitionPenalty = 2 };
        var penalised = Logits.Select(l => (double)l).ToArray();
        penalised[1] = 1.5;
        penalised[3] = -2.0;
        Assert.That(Distribution(options, Logits, [1, 3, 1, 1]), Is.EqualTo(Softmax(penalised)).Within(1e-3));
        Assert.That(new Sampler(6).Sample(Logits, SamplingOptions.Greedy with { RepetitionPenalty = 2 }, [1], 0), Is.EqualTo(4));
    }

    [Test]
    public void Top_k_selection_is_exact_on_large_vocabularies_with_ties()
    {
        var random = new Random(11);
        var logits = Enumerable.Range(0, 50_000).Select(_ => (float)Math.Round(random.NextDouble() * 20, 1)).ToArray();
        var sampler = new Sampler(logits.Length);
        var options = new SamplingOptions { Temperature = 1, TopK = 40, TopP = 1, MinP = 0 };
        float threshold = logits.OrderByDescending(l => l).ElementAt(39);
        for (int i = 0; i < 200; i++)
        {
            int token = sampler.Sample(logits, options, [], i / 200.0);
            Assert.That(logits[token], Is.GreaterThanOrEqualTo(threshold));
        }
    }

    [Test]
    public void Same_seed_same_tokens()
    {
        var options = new SamplingOptions { Temperature = 1.3f, TopK = 0, TopP = 1, MinP = 0, Seed = 42 };
        var sampler = new Sampler(6);
        int[] Draw(int seed)
        {
            var random = new Random(seed);
            return Enumerable.Range(0, 50).Select(_ => sampler.Sample(Logits, options, [], random.NextDouble())).ToArray();
        }
        int[] first = Draw(42);
        int[] again = Draw(42);
        int[] other = Draw(43);
        Assert.That(again, Is.EqualTo(first));
        Assert.That(other, Is.Not.EqualTo(first));
    }

    [TestCase(-0.1f, 40, 0.9f, 0f, 1f, "temperature")]
    [TestCase(float.NaN, 40, 0.9f, 0f, 1f, "temperature")]
    [TestCase(1f, -1, 0.9f, 0f, 1f, "top-k")]
    [TestCase(1f, 40, 0f, 0f, 1f, "top-p")]
    [TestCase(1f, 40, 1.5f, 0f, 1f, "top-p")]
    [TestCase(1f, 40, 0.9f, 1f, 1f, "min-p")]
    [TestCase(1f, 40, 0.9f, -0.2f, 1f, "min-p")]
    [TestCase(1f, 40, 0.9f, 0f, 0f, "repetition-penalty")]
    [TestCase(1f, 40, 0.9f, 0f, float.PositiveInfinity, "repetition-penalty")]
    public void Invalid_parameters_are_named(float temperature, int topK, float topP, float minP, float penalty, string parameter)
    {
        var options = new SamplingOptions { Temperature = temperature, TopK = topK, TopP = topP, MinP = minP, RepetitionPenalty = penalty };
        Assert.That(options.Validate, Throws.TypeOf<InvalidParameterException>()
            .With.Property(nameof(InvalidParameterException.Parameter)).EqualTo(parameter)
            .And.Message.Contains(parameter));
    }
}
