using KernelLM.Runtime.Generation;

namespace KernelLM.Tests.Generation;

/// <summary>
/// The adaptive-decoding choice recomputed the slow, obvious way: every distribution comes from a full pass over the
/// whole sequence (no KV cache, no rollback), log-probs in fp64. Tests replay a generation through it step by step.
/// </summary>
public static class AdaptiveDecodingOracle
{
    /// <summary>Scores tied within this (nats, mean log-prob) are near ties: fp32 reductions and fp64 here may order them
    /// either way. The same margin keeps entropies this close to the threshold out of the greedy/lookahead check.</summary>
    public const double NearTie = 1e-4;

    public sealed record Step(double Entropy, int Greedy, int[] Candidates, double[] Scores, double[] LogProbs)
    {
        public double Best => Scores.Max();
    }

    /// <summary>log_softmax of a row in fp64.</summary>
    public static double[] LogSoftmax(ReadOnlySpan<float> logits)
    {
        double max = double.NegativeInfinity;
        foreach (float value in logits)
        {
            max = Math.Max(max, value);
        }
        double sum = 0;
        foreach (float value in logits)
        {
            sum += Math.Exp(value - max);
        }
        double logSum = max + Math.Log(sum);
        var result = new double[logits.Length];
        for (int i = 0; i < logits.Length; i++)
        {
            result[i] = logits[i] - logSum;
        }
        return result;
    }

    /// <summary>What adaptive decoding should consider after <paramref name="sequence"/>: the entropy, the greedy token,
    /// the top candidates and each one's mean log-prob over itself and its greedy rollout.</summary>
    public static Step Reference(Func<IReadOnlyList<int>, double[]> distribution, IReadOnlyList<int> sequence, AdaptiveDecodingOptions options,
        IReadOnlyList<int> eos, int capacity)
    {
        double[] logProbs = distribution(sequence);
        double entropy = 0;
        foreach (double logProb in logProbs)
        {
            entropy -= double.IsNegativeInfinity(logProb) ? 0 : Math.Exp(logProb) * logProb;
        }
        // Sorted by decreasing probability, ties to the lower id (the reduction's order).
        int[] order = [.. Enumerable.Range(0, logProbs.Length).OrderByDescending(i => logProbs[i]).ThenBy(i => i)];
        int[] candidates = order[..Math.Min(options.Beams, order.Length)];
        var scores = new double[candidates.Length];
        for (int b = 0; b < candidates.Length; b++)
        {
            var extended = new List<int>(sequence) { candidates[b] };
            double sum = logProbs[candidates[b]];
            int count = 1;
            int token = candidates[b];
            for (int i = 0; i < options.Lookahead && !eos.Contains(token) && extended.Count < capacity; i++)
            {
                double[] next = distribution(extended);
                token = ArgMax(next);
                sum += next[token];
                count++;
                extended.Add(token);
            }
            scores[b] = sum / count;
        }
        return new Step(entropy, order[0], candidates, scores, logProbs);
    }

    public static int ArgMax(double[] values)
    {
        int best = 0;
        for (int i = 1; i < values.Length; i++)
        {
            if (values[i] > values[best])
            {
                best = i;
            }
        }
        return best;
    }

    /// <summary>
    /// Replays <paramref name="generated"/> (the ids the generator chose, EOS included when it ended there) after
    /// <paramref name="prompt"/> through the oracle and asserts each choice: greedy below the threshold; at or above it,
    /// the candidate with the best mean log-prob (any candidate within <see cref="NearTie"/> of the best is accepted).
    /// With <paramref name="logProbabilities"/> (the streamed ones, EOS left out), each must be the chosen token's under
    /// the step's distribution. Returns the number of lookahead steps the oracle saw.
    /// </summary>
    public static int CheckChoices(Func<IReadOnlyList<int>, double[]> distribution, IReadOnlyList<int> prompt, IReadOnlyList<int> generated,
        AdaptiveDecodingOptions options, IReadOnlyList<int> eos, int capacity, IReadOnlyList<float>? logProbabilities = null)
    {
        var sequence = new List<int>(prompt);
        int lookaheads = 0;
        for (int step = 0; step < generated.Count; step++)
        {
            var reference = Reference(distribution, sequence, options, eos, capacity);
            int chosen = generated[step];
            if (reference.Entropy < options.Threshold - NearTie)
            {
                Assert.That(chosen, Is.EqualTo(reference.Greedy), $"step {step}: entropy {reference.Entropy:F5} below the threshold: greedy");
            }
            else if (reference.Entropy >= options.Threshold + NearTie || options.Threshold == 0)
            {
                lookaheads++;
                int index = Array.IndexOf(reference.Candidates, chosen);
                Assert.That(index, Is.GreaterThanOrEqualTo(0), $"step {step}: {chosen} is not among the top {options.Beams} [{string.Join(", ", reference.Candidates)}]");
                Assert.That(reference.Scores[index], Is.GreaterThanOrEqualTo(reference.Best - NearTie),
                    $"step {step}: chose {chosen} (mean log-prob {reference.Scores[index]:F6}); candidates [{string.Join(", ", reference.Candidates)}] "
                    + $"score [{string.Join(", ", reference.Scores.Select(s => s.ToString("F6")))}]");
            }
            if (logProbabilities is not null && step < logProbabilities.Count)
            {
                Assert.That(logProbabilities[step], Is.EqualTo(reference.LogProbs[chosen]).Within(1e-4), $"step {step}: the streamed log-prob is the chosen token's");
            }
            sequence.Add(chosen);
        }
        return lookaheads;
    }
}
