namespace KernelLM.Tests.Support;

/// <summary>
/// Straightforward fp64 references of every decoder op, written from the formulas (HF Llama) without
/// sharing code with the engine. Row-major arrays; weights passed already widened to double.
/// </summary>
public static class ReferenceOps
{
    /// <summary>y[t, r] = sum_c x[t, c] w[r, c] + b[r]</summary>
    public static double[] Linear(double[] x, int tokens, double[] w, int rows, int cols, double[]? bias = null)
    {
        var y = new double[tokens * rows];
        for (int t = 0; t < tokens; t++)
        {
            for (int r = 0; r < rows; r++)
            {
                double sum = bias?[r] ?? 0;
                for (int c = 0; c < cols; c++)
                {
                    sum += x[t * cols + c] * w[r * cols + c];
                }
                y[t * rows + r] = sum;
            }
        }
        return y;
    }

    /// <summary>Per row, sum_c |x[t, c] w[r, c]|: the scale of the accumulation error bound.</summary>
    public static double[] LinearMagnitude(double[] x, int tokens, double[] w, int rows, int cols)
    {
        var y = new double[tokens * rows];
        for (int t = 0; t < tokens; t++)
        {
            for (int r = 0; r < rows; r++)
            {
                double sum = 0;
                for (int c = 0; c < cols; c++)
                {
                    sum += Math.Abs(x[t * cols + c] * w[r * cols + c]);
                }
                y[t * rows + r] = sum;
            }
        }
        return y;
    }

    public static double[] RmsNorm(double[] x, int rows, double[] weight, double epsilon)
    {
        int cols = weight.Length;
        var y = new double[x.Length];
        for (int r = 0; r < rows; r++)
        {
            double meanSquare = 0;
            for (int c = 0; c < cols; c++)
            {
                meanSquare += x[r * cols + c] * x[r * cols + c];
            }
            meanSquare /= cols;
            double scale = 1 / Math.Sqrt(meanSquare + epsilon);
            for (int c = 0; c < cols; c++)
            {
                y[r * cols + c] = x[r * cols + c] * scale * weight[c];
            }
        }
        return y;
    }

    /// <summary>HF rotate_half RoPE: x * cos + rotate_half(x) * sin, cos/sin = [freqs, freqs].</summary>
    public static double[] Rope(double[] x, int tokens, int heads, int headDim, int start, double[] inverseFrequencies)
    {
        var y = (double[])x.Clone();
        int half = headDim / 2;
        for (int t = 0; t < tokens; t++)
        {
            for (int h = 0; h < heads; h++)
            {
                int offset = (t * heads + h) * headDim;
                for (int d = 0; d < headDim; d++)
                {
                    double angle = (start + t) * inverseFrequencies[d % half];
                    double rotated = d < half ? -x[offset + d + half] : x[offset + d - half];
                    y[offset + d] = x[offset + d] * Math.Cos(angle) + rotated * Math.Sin(angle);
                }
            }
        }
        return y;
    }

    /// <summary>
    /// Causal GQA attention. q: [tokens, heads, d] at positions start..; keys/values: [positions, kvHeads, d]
    /// for positions 0..start+tokens. Window 0 = full causal; else keys j with p - j &lt; window.
    /// The hook (docs/conventions.md): <paramref name="keyBias"/> [heads, biasStride] added to the scaled score of
    /// (head, j), -inf masking; <paramref name="selected"/>: of the positions below start only the listed ones are
    /// visible (the chunk's own always are). A query that sees no key gets zeros.
    /// </summary>
    public static double[] Attention(double[] q, int tokens, int heads, double[] keys, double[] values, int kvHeads, int headDim, int start, int window,
        double[]? keyBias = null, int biasStride = 0, int[]? selected = null)
    {
        var listed = selected is null ? null : new HashSet<int>(selected);
        var output = new double[tokens * heads * headDim];
        int group = heads / kvHeads;
        double scale = 1 / Math.Sqrt(headDim);
        for (int t = 0; t < tokens; t++)
        {
            int position = start + t;
            for (int h = 0; h < heads; h++)
            {
                int kvHead = h / group;
                var scores = new List<(int Position, double Score)>();
                for (int j = 0; j <= position; j++)
                {
                    if ((window > 0 && position - j >= window) || (listed is not null && j < start && !listed.Contains(j)))
                    {
                        continue;
                    }
                    double dot = 0;
                    for (int d = 0; d < headDim; d++)
                    {
                        dot += q[(t * heads + h) * headDim + d] * keys[(j * kvHeads + kvHead) * headDim + d];
                    }
                    scores.Add((j, dot * scale + (keyBias?[h * biasStride + j] ?? 0)));
                }
                double max = scores.Count == 0 ? double.NegativeInfinity : scores.Max(s => s.Score);
                if (double.IsNegativeInfinity(max))
                {
                    continue;
                }
                double total = scores.Sum(s => Math.Exp(s.Score - max));
                foreach (var (j, score) in scores)
                {
                    double p = Math.Exp(score - max) / total;
                    for (int d = 0; d < headDim; d++)
                    {
                        output[(t * heads + h) * headDim + d] += p * values[(j * kvHeads + kvHead) * headDim + d];
                    }
                }
            }
        }
        return output;
    }

    public static double Silu(double x) => x / (1 + Math.Exp(-x));

    public static double[] LogSoftmax(ReadOnlySpan<float> logits)
    {
        double max = double.NegativeInfinity;
        foreach (float l in logits)
        {
            max = Math.Max(max, l);
        }
        double sum = 0;
        foreach (float l in logits)
        {
            sum += Math.Exp(l - max);
        }
        var result = new double[logits.Length];
        for (int i = 0; i < logits.Length; i++)
        {
            result[i] = logits[i] - max - Math.Log(sum);
        }
        return result;
    }

    /// <summary>H = -sum p log p of softmax(logits), in nats (fp64; -inf entries contribute nothing).</summary>
    public static double Entropy(ReadOnlySpan<float> logits)
    {
        double entropy = 0;
        foreach (double logP in LogSoftmax(logits))
        {
            if (!double.IsNegativeInfinity(logP))
            {
                entropy -= Math.Exp(logP) * logP;
            }
        }
        return entropy;
    }
}
