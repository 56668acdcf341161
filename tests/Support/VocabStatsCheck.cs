using KernelLM.Runtime.Signals;

namespace KernelLM.Tests.Support;

/// <summary>Checks one device's output of the vocabulary reduction against <see cref="ReferenceVocabStats"/>.</summary>
public static class VocabStatsCheck
{
    /// <summary>Rows of the kinds the suite uses: random logits, masked (-inf) entries, all-equal and ties.</summary>
    public static float[] Row(string kind, int vocabulary, int seed)
    {
        var random = new Random(seed);
        var row = new float[vocabulary];
        switch (kind)
        {
            case "random":
                // Logits spread like a language model's: a broad body and a few strong candidates.
                for (int i = 0; i < vocabulary; i++)
                {
                    row[i] = (float)(random.NextDouble() * 12 - 9);
                }
                for (int i = 0; i < 5; i++)
                {
                    row[random.Next(vocabulary)] = (float)(6 + random.NextDouble() * 4);
                }
                break;
            case "masked":
                for (int i = 0; i < vocabulary; i++)
                {
                    row[i] = random.Next(3) == 0 ? float.NegativeInfinity : (float)(random.NextDouble() * 8 - 4);
                }
                row[random.Next(vocabulary)] = 3.5f;
                break;
            case "equal":
                Array.Fill(row, 1.25f);
                break;
            case "ties":
                // Many exact ties at the top: the top list must order them by id.
                for (int i = 0; i < vocabulary; i++)
                {
                    row[i] = random.Next(4) == 0 ? 2.0f : (float)(random.NextDouble() * 2 - 1);
                }
                break;
            default:
                throw new ArgumentException(kind);
        }
        return row;
    }

    /// <summary>
    /// Asserts every field of one row. <paramref name="sumLength"/>: the most terms one fp32 partial sum of the
    /// device adds (a CPU chunk, a GPU thread's slice): it sizes the derived tolerances.
    /// </summary>
    public static void AssertRow(string label, ReadOnlySpan<float> logits, int token, ReadOnlySpan<float> reference, int topK,
        ReadOnlySpan<float> stats, ReadOnlySpan<int> topIds, ReadOnlySpan<float> topLogProbs, int sumLength)
    {
        var expected = ReferenceVocabStats.Compute(logits, token, reference, topK);
        double maxAbs = 0;
        foreach (float x in logits)
        {
            if (float.IsFinite(x))
            {
                maxAbs = Math.Max(maxAbs, Math.Abs(x));
            }
        }
        foreach (float y in reference)
        {
            if (float.IsFinite(y))
            {
                maxAbs = Math.Max(maxAbs, Math.Abs(y));
            }
        }
        double lseTolerance = Tolerances.VocabLogSumExp(sumLength, maxAbs);
        using (Assert.EnterMultipleScope())
        {
            Assert.That(stats[(int)VocabStatsField.MaxLogit], Is.EqualTo(expected.MaxLogit), $"{label}: max");
            Assert.That(stats[(int)VocabStatsField.LogSumExp], Is.EqualTo(expected.LogSumExp).Within(lseTolerance), $"{label}: log-sum-exp");
            Assert.That(stats[(int)VocabStatsField.Entropy],
                Is.EqualTo(expected.Entropy).Within(Tolerances.VocabEntropy(sumLength, expected.MaxShift)), $"{label}: entropy");
            if (token >= 0)
            {
                Assert.That(stats[(int)VocabStatsField.TokenLogProb], Is.EqualTo(expected.TokenLogProb).Within(lseTolerance), $"{label}: token log-prob");
            }
            else
            {
                Assert.That(stats[(int)VocabStatsField.TokenLogProb], Is.NaN, $"{label}: token log-prob without a token");
            }
            Assert.That(stats[(int)VocabStatsField.Margin], Is.EqualTo(expected.Margin).Within(2 * lseTolerance), $"{label}: margin");
            if (expected.Kurtosis == 0)
            {
                Assert.That(stats[(int)VocabStatsField.Kurtosis], Is.Zero, $"{label}: kurtosis of a uniform row");
            }
            else
            {
                double kurtosisTolerance = Tolerances.VocabKurtosis(sumLength, expected.PowerMomentMagnitude, expected.SecondCentralMoment);
                Assert.That(stats[(int)VocabStatsField.Kurtosis], Is.EqualTo(expected.Kurtosis).Within(kurtosisTolerance * Math.Max(1, Math.Abs(expected.Kurtosis + 3))),
                    $"{label}: kurtosis");
            }
            if (reference.IsEmpty)
            {
                Assert.That(stats[(int)VocabStatsField.KlPq], Is.NaN, $"{label}: KL(p||q) without a reference");
                Assert.That(stats[(int)VocabStatsField.KlQp], Is.NaN, $"{label}: KL(q||p) without a reference");
                Assert.That(stats[(int)VocabStatsField.TokenLogRatio], Is.NaN, $"{label}: log-ratio without a reference");
            }
            else
            {
                double klTolerance = Tolerances.VocabKl(sumLength, maxAbs, expected.MaxDifference);
                AssertKl(stats[(int)VocabStatsField.KlPq], expected.KlPq, klTolerance, $"{label}: KL(p||q)");
                AssertKl(stats[(int)VocabStatsField.KlQp], expected.KlQp, klTolerance, $"{label}: KL(q||p)");
                if (token >= 0)
                {
                    Assert.That(stats[(int)VocabStatsField.TokenLogRatio], Is.EqualTo(expected.TokenLogRatio).Within(2 * lseTolerance), $"{label}: log-ratio");
                }
            }
            Assert.That(topIds.ToArray(), Is.EqualTo(expected.TopIds), $"{label}: top-{topK} ids");
            for (int i = 0; i < topK; i++)
            {
                if (expected.TopIds[i] < 0)
                {
                    Assert.That(topLogProbs[i], Is.EqualTo(float.NegativeInfinity), $"{label}: empty top slot {i}");
                }
                else
                {
                    Assert.That(topLogProbs[i], Is.EqualTo(expected.TopLogProbs[i]).Within(lseTolerance), $"{label}: top log-prob {i}");
                }
            }
        }
    }

    private static void AssertKl(float actual, double expected, double tolerance, string label)
    {
        if (double.IsPositiveInfinity(expected))
        {
            Assert.That(actual, Is.EqualTo(float.PositiveInfinity), label);
        }
        else
        {
            Assert.That(actual, Is.EqualTo(expected).Within(tolerance), label);
        }
    }
}
