namespace KernelLM.Tests.Support;

/// <summary>
/// fp64 reference of TokenSelect's soft vote (kernels/kv_select.cu): for one sequence, the mean query of the rows,
/// per head the softmax over the candidates init .. context - local - 1 of (q_h . k) / sqrt(head_dim), summed over heads.
/// Also the bound of each score's fp32 error (for <see cref="Tolerances.KvSelectVote"/>).
/// </summary>
public static class ReferenceKvSelect
{
    /// <summary>q: [tokens, heads, head_dim]; keys: one sequence's cache [kv_heads, capacity, head_dim].</summary>
    public static (double[] Votes, double ScoreError) Votes(ReadOnlySpan<float> q, int tokens, int heads, ReadOnlySpan<float> keys, int kvHeads, int headDim,
        int capacity, int context, int initial, int local)
    {
        int candidates = context - initial - local;
        int group = heads / kvHeads;
        double scale = 1 / Math.Sqrt(headDim);
        var mean = new double[heads * headDim];
        var meanAbs = new double[heads * headDim];
        for (int t = 0; t < tokens; t++)
        {
            for (int i = 0; i < mean.Length; i++)
            {
                mean[i] += q[t * mean.Length + i] / (double)tokens;
                meanAbs[i] += Math.Abs(q[t * mean.Length + i]) / tokens;
            }
        }
        var votes = new double[candidates];
        double scoreError = 0;
        var scores = new double[candidates];
        for (int h = 0; h < heads; h++)
        {
            double max = double.NegativeInfinity;
            for (int c = 0; c < candidates; c++)
            {
                int keyOffset = ((h / group) * capacity + initial + c) * headDim;
                double dot = 0, magnitude = 0, meanMagnitude = 0;
                for (int d = 0; d < headDim; d++)
                {
                    double k = keys[keyOffset + d];
                    dot += mean[h * headDim + d] * k;
                    magnitude += Math.Abs(mean[h * headDim + d] * k);
                    meanMagnitude += meanAbs[h * headDim + d] * Math.Abs(k);
                }
                scores[c] = dot * scale;
                max = Math.Max(max, scores[c]);
                // fp32 dot of head_dim terms (and the scale), plus the fp32 mean of the rows (tokens + 1 roundings).
                scoreError = Math.Max(scoreError, scale * (Tolerances.DotProduct(headDim + 1, magnitude) + (tokens + 1) * Tolerances.UnitRoundoff * meanMagnitude));
            }
            double sum = 0;
            for (int c = 0; c < candidates; c++)
            {
                sum += Math.Exp(scores[c] - max);
            }
            for (int c = 0; c < candidates; c++)
            {
                votes[c] += Math.Exp(scores[c] - max) / sum;
            }
        }
        return (votes, scoreError);
    }
}
