using KernelLM.Runtime.Signals;

namespace KernelLM.Tests.Support;

/// <summary>
/// The fp64 reference of the vocabulary reduction, written the direct (several-pass) way from the
/// definitions in docs/token-signals.md: p = softmax(x), central moments of the V probabilities, KL sums.
/// </summary>
public static class ReferenceVocabStats
{
    public sealed record Row(double MaxLogit, double LogSumExp, double Entropy, double TokenLogProb, double Margin, double Kurtosis,
        double KlPq, double KlQp, double TokenLogRatio, int[] TopIds, double[] TopLogProbs, double SecondCentralMoment,
        double PowerMomentMagnitude, double MaxShift, double MaxDifference);

    public static Row Compute(ReadOnlySpan<float> logits, int token, ReadOnlySpan<float> reference, int topK)
    {
        int v = logits.Length;
        double max = double.NegativeInfinity;
        foreach (float x in logits)
        {
            max = Math.Max(max, x);
        }
        double sum = 0;
        foreach (float x in logits)
        {
            sum += Math.Exp(x - max);
        }
        double lse = max + Math.Log(sum);
        var logP = new double[v];
        var p = new double[v];
        for (int i = 0; i < v; i++)
        {
            logP[i] = logits[i] - lse;
            p[i] = Math.Exp(logP[i]);
        }
        double entropy = 0;
        for (int i = 0; i < v; i++)
        {
            if (p[i] > 0)
            {
                entropy -= p[i] * logP[i];
            }
        }
        double mean = 1.0 / v;
        double m2 = 0, m4 = 0;
        for (int i = 0; i < v; i++)
        {
            double d = p[i] - mean;
            m2 += d * d;
            m4 += d * d * d * d;
        }
        m2 /= v;
        m4 /= v;
        // The floor is on the relative variance (of q = V p, mean 1): m2(q) = V^2 m2(p).
        double relativeVariance = m2 * v * (double)v;
        double kurtosis = relativeVariance <= VocabStats.UniformVarianceFloor ? 0 : m4 / (m2 * m2) - 3;
        // Scale of the kurtosis' raw power moments (of q = V p): M2 + 4 M3 + 6 M2... bounds its cancellation error.
        double m2Raw = 0, m3Raw = 0, m4Raw = 0;
        for (int i = 0; i < v; i++)
        {
            double q = p[i] * v;
            m2Raw += q * q / v;
            m3Raw += q * q * q / v;
            m4Raw += q * q * q * q / v;
        }
        double powerMagnitude = m4Raw + 4 * m3Raw + 6 * m2Raw + 3;
        double maxShift = 0;
        foreach (float x in logits)
        {
            if (!float.IsNegativeInfinity(x))
            {
                maxShift = Math.Max(maxShift, max - x);
            }
        }
        var values = logits.ToArray();
        var order = Enumerable.Range(0, v).Where(i => !double.IsNegativeInfinity(values[i]))
            .OrderByDescending(i => values[i]).ThenBy(i => i).ToArray();
        var topIds = Enumerable.Range(0, topK).Select(i => i < order.Length ? order[i] : -1).ToArray();
        var topLogProbs = topIds.Select(i => i < 0 ? double.NegativeInfinity : logP[i]).ToArray();
        double margin = p[order[0]] - (order.Length > 1 ? p[order[1]] : 0);
        double tokenLogProb = token >= 0 ? logP[token] : double.NaN;
        double klPq = double.NaN, klQp = double.NaN, ratio = double.NaN, maxDifference = 0;
        if (!reference.IsEmpty)
        {
            double referenceMax = double.NegativeInfinity;
            foreach (float y in reference)
            {
                referenceMax = Math.Max(referenceMax, y);
            }
            double referenceSum = 0;
            foreach (float y in reference)
            {
                referenceSum += Math.Exp(y - referenceMax);
            }
            double referenceLse = referenceMax + Math.Log(referenceSum);
            klPq = 0;
            klQp = 0;
            for (int i = 0; i < v; i++)
            {
                double logQ = reference[i] - referenceLse;
                double q = Math.Exp(logQ);
                if (p[i] > 0 && q > 0)
                {
                    maxDifference = Math.Max(maxDifference, Math.Abs((double)logits[i] - reference[i]));
                }
                if (p[i] > 0)
                {
                    klPq += q > 0 ? p[i] * (logP[i] - logQ) : double.PositiveInfinity;
                }
                if (q > 0)
                {
                    klQp += p[i] > 0 ? q * (logQ - logP[i]) : double.PositiveInfinity;
                }
            }
            ratio = token >= 0 ? logP[token] - (reference[token] - referenceLse) : double.NaN;
        }
        return new Row(max, lse, entropy, tokenLogProb, margin, kurtosis, klPq, klQp, ratio, topIds, topLogProbs, relativeVariance,
            powerMagnitude, maxShift, maxDifference);
    }
}
