using KernelLM.Runtime;
using KernelLM.Runtime.Signals;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Signals;

/// <summary>The CPU twin of the fused vocabulary reduction against the fp64 reference; argument checks.</summary>
[TestFixture]
public sealed class VocabStatsTests
{
    public static IEnumerable<TestCaseData> Rows() =>
        from vocabulary in new[] { 1, 2, 1000, 2048, 128256, 151936 }
        from kind in new[] { "random", "masked", "equal", "ties" }
        where vocabulary >= 2 || kind == "equal"
        from topK in new[] { 0, 1, 16 }
        where vocabulary < 100_000 || topK == 16
        select new TestCaseData(kind, vocabulary, topK).SetName($"vocab_stats(cpu, f32, {kind}, vocab={vocabulary}, k={topK})");

    [TestCaseSource(nameof(Rows))]
    public void Matches_the_fp64_reference(string kind, int vocabulary, int topK)
    {
        var logits = VocabStatsCheck.Row(kind, vocabulary, seed: vocabulary + topK);
        var reference = VocabStatsCheck.Row("random", vocabulary, seed: vocabulary + 7);
        int token = vocabulary / 3;
        if (float.IsNegativeInfinity(logits[token]))
        {
            logits[token] = -2.5f;
        }
        foreach (bool withReference in new[] { false, true })
        {
            var stats = new float[VocabStats.FieldCount];
            var ids = new int[topK];
            var logProbs = new float[topK];
            var referenceRow = withReference ? reference : [];
            VocabStats.ReduceRow(logits, token, referenceRow, topK, stats, ids, logProbs);
            VocabStatsCheck.AssertRow($"{kind}, reference={withReference}", logits, token, referenceRow, topK, stats, ids, logProbs, VocabStats.ChunkLength);
        }
    }

    [Test]
    public void Bf16_rows_match_the_reference_on_their_rounded_values()
    {
        const int vocabulary = 32000;
        const int rows = 3;
        var logits = Enumerable.Range(0, rows).SelectMany(r => VocabStatsCheck.Row(r == 1 ? "masked" : "random", vocabulary, r)).ToArray();
        var bits = logits.Select(BFloat16.FromSingle).ToArray();
        var rounded = bits.Select(BFloat16.ToSingle).ToArray();
        var referenceBits = VocabStatsCheck.Row("random", vocabulary * rows, 99).Select(BFloat16.FromSingle).ToArray();
        var referenceRounded = referenceBits.Select(BFloat16.ToSingle).ToArray();
        int[] tokens = [5, 17, vocabulary - 1];
        rounded[vocabulary + 17] = -1;
        bits[vocabulary + 17] = BFloat16.FromSingle(-1);
        var stats = new float[rows * VocabStats.FieldCount];
        var ids = new int[rows * 4];
        var logProbs = new float[rows * 4];
        VocabStats.Reduce(bits, vocabulary, tokens, referenceBits, 4, stats, ids, logProbs);
        for (int r = 0; r < rows; r++)
        {
            VocabStatsCheck.AssertRow($"bf16 row {r}", rounded.AsSpan(r * vocabulary, vocabulary), tokens[r], referenceRounded.AsSpan(r * vocabulary, vocabulary), 4,
                stats.AsSpan(r * VocabStats.FieldCount, VocabStats.FieldCount), ids.AsSpan(r * 4, 4), logProbs.AsSpan(r * 4, 4), VocabStats.ChunkLength);
        }
    }

    [Test]
    public void A_uniform_row_has_zero_kurtosis_and_log_v_entropy()
    {
        var stats = new float[VocabStats.FieldCount];
        VocabStats.ReduceRow(new float[151936], -1, [], 0, stats, [], []);
        Assert.That(stats[(int)VocabStatsField.Kurtosis], Is.Zero);
        Assert.That(stats[(int)VocabStatsField.Entropy], Is.EqualTo(Math.Log(151936)).Within(1e-5));
        Assert.That(stats[(int)VocabStatsField.Margin], Is.Zero);
    }

    [Test]
    public void Rows_without_a_finite_entry_give_NaN_not_garbage()
    {
        var stats = new float[VocabStats.FieldCount];
        var ids = new int[2];
        var logProbs = new float[2];
        var row = new float[100];
        Array.Fill(row, float.NegativeInfinity);
        VocabStats.ReduceRow(row, 3, [], 2, stats, ids, logProbs);
        Assert.That(stats, Has.All.NaN);
        Assert.That(ids, Has.All.EqualTo(-1));
        row[7] = float.NaN;
        VocabStats.ReduceRow(row, 3, [], 2, stats, ids, logProbs);
        Assert.That(stats, Has.All.NaN);
    }

    [Test]
    public void Masked_reference_entries_make_the_kl_infinite_one_way()
    {
        float[] logits = [1, 2, 3, float.NegativeInfinity];
        float[] reference = [1, float.NegativeInfinity, 3, 0];
        var stats = new float[VocabStats.FieldCount];
        VocabStats.ReduceRow(logits, 0, reference, 0, stats, [], []);
        Assert.That(stats[(int)VocabStatsField.KlPq], Is.EqualTo(float.PositiveInfinity), "p > 0 where q = 0");
        Assert.That(stats[(int)VocabStatsField.KlQp], Is.EqualTo(float.PositiveInfinity), "q > 0 where p = 0");
        VocabStats.ReduceRow(logits, 0, logits, 0, stats, [], []);
        Assert.That(stats[(int)VocabStatsField.KlPq], Is.Zero.Within(1e-6), "KL of a row with itself");
        Assert.That(stats[(int)VocabStatsField.TokenLogRatio], Is.Zero.Within(1e-6));
    }

    [Test]
    public void Bad_arguments_name_what_is_wrong()
    {
        var stats = new float[VocabStats.FieldCount];
        Assert.That(() => VocabStats.ReduceRow(new float[10], 10, [], 0, stats, [], []),
            Throws.InstanceOf<ArgumentOutOfRangeException>().With.Message.Contains("token id 10"));
        Assert.That(() => VocabStats.ReduceRow(new float[10], 1, [], 17, stats, new int[17], new float[17]),
            Throws.InstanceOf<ArgumentOutOfRangeException>().With.Message.Contains("top-k"));
        Assert.That(() => VocabStats.ReduceRow(new float[10], 1, new float[9], 0, stats, [], []),
            Throws.ArgumentException.With.Message.Contains("reference logits hold 9"));
        Assert.That(() => VocabStats.Reduce(new float[10], 3, [], [], 0, stats, [], []),
            Throws.ArgumentException.With.Message.Contains("not a whole number of rows"));
    }
}
