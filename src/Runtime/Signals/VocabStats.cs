using System.Numerics.Tensors;
using System.Runtime.InteropServices;

namespace KernelLM.Runtime.Signals;

/// <summary>Columns of one row of the statistics output, <c>stats: [rows, VocabStats.FieldCount]</c> fp32 —
/// the same layout the CPU twin and <c>kernels/vocab_stats.cu</c> write. Definitions: docs/token-signals.md.</summary>
public enum VocabStatsField
{
    /// <summary>max_i x_i.</summary>
    MaxLogit = 0,

    /// <summary>L = log sum_i exp(x_i).</summary>
    LogSumExp = 1,

    /// <summary>H(p) = -sum_i p_i log p_i in nats, p = softmax(x).</summary>
    Entropy = 2,

    /// <summary>log p_t of the row's given token t (NaN when no token is given).</summary>
    TokenLogProb = 3,

    /// <summary>p(top-1) - p(top-2) (the top-1 probability when the row has one finite entry).</summary>
    Margin = 4,

    /// <summary>Fisher's excess kurtosis of the V probabilities of the row, population moments; 0 for a uniform row.</summary>
    Kurtosis = 5,

    /// <summary>KL(p || q) in nats against the reference row's q = softmax(y) (NaN without a reference).</summary>
    KlPq = 6,

    /// <summary>KL(q || p) in nats (NaN without a reference).</summary>
    KlQp = 7,

    /// <summary>log p_t - log q_t of the given token (NaN without a reference or a token).</summary>
    TokenLogRatio = 8,
}

/// <summary>
/// The fused reduction over a row of vocabulary logits, CPU twin of <c>kernels/vocab_stats.cu</c>. One pass
/// over the row in chunks of <see cref="ChunkLength"/> (each element is read from memory once; the chunk's
/// exponentials live in a stack scratch in L1): an online max with rescaled power sums
/// S_k = sum exp(k (x - m)) for k = 1..4, T = sum exp(x - m)(x - m) for the entropy, the top-k list and,
/// with a reference row, the cross sums for both KL directions. Formulas and their precision:
/// docs/token-signals.md. Allocates nothing.
/// </summary>
public static class VocabStats
{
    public const int FieldCount = 9;
    public const int MaxTopK = 16;
    public const int ChunkLength = 1024;

    /// <summary>
    /// Variance floor of the kurtosis: rows whose probabilities' relative variance m2 = V sum p^2 - 1 is at or
    /// below it are uniform to fp32 accumulation precision and get kurtosis 0 (docs/token-signals.md).
    /// </summary>
    public const double UniformVarianceFloor = 1e-6;

    /// <summary>
    /// Reduces each row of <paramref name="logits"/> ([rows, vocabulary]). <paramref name="tokens"/>: [rows] ids
    /// (or empty: no token); <paramref name="reference"/>: [rows, vocabulary] logits of a reference model (or
    /// empty); <paramref name="stats"/>: [rows, FieldCount]; <paramref name="topIds"/> / <paramref name="topLogProbs"/>:
    /// [rows, topK], sorted by decreasing probability, ties to the lower id; slots past the row's finite entries
    /// hold id -1 and log-prob -inf.
    /// </summary>
    public static void Reduce(ReadOnlySpan<float> logits, int vocabulary, ReadOnlySpan<int> tokens, ReadOnlySpan<float> reference,
        int topK, Span<float> stats, Span<int> topIds, Span<float> topLogProbs)
    {
        int rows = Validate(logits.Length, vocabulary, tokens, reference.Length, topK, stats.Length, topIds.Length, topLogProbs.Length);
        for (int r = 0; r < rows; r++)
        {
            ReduceRow(logits.Slice(r * vocabulary, vocabulary), tokens.IsEmpty ? -1 : tokens[r],
                reference.IsEmpty ? default : reference.Slice(r * vocabulary, vocabulary), topK,
                stats.Slice(r * FieldCount, FieldCount), topIds.Slice(r * topK, topK), topLogProbs.Slice(r * topK, topK));
        }
    }

    /// <summary>bf16 rows (raw bit patterns), widened a chunk at a time; otherwise as the fp32 overload.</summary>
    public static void Reduce(ReadOnlySpan<ushort> logits, int vocabulary, ReadOnlySpan<int> tokens, ReadOnlySpan<ushort> reference,
        int topK, Span<float> stats, Span<int> topIds, Span<float> topLogProbs)
    {
        int rows = Validate(logits.Length, vocabulary, tokens, reference.Length, topK, stats.Length, topIds.Length, topLogProbs.Length);
        for (int r = 0; r < rows; r++)
        {
            var row = new RowSource(default, logits.Slice(r * vocabulary, vocabulary));
            var referenceRow = new RowSource(default, reference.IsEmpty ? default : reference.Slice(r * vocabulary, vocabulary));
            Core(in row, in referenceRow, vocabulary, tokens.IsEmpty ? -1 : tokens[r], topK,
                stats.Slice(r * FieldCount, FieldCount), topIds.Slice(r * topK, topK), topLogProbs.Slice(r * topK, topK));
        }
    }

    /// <summary>One fp32 row; <paramref name="token"/> &lt; 0 for none, <paramref name="reference"/> empty for none.</summary>
    public static void ReduceRow(ReadOnlySpan<float> logits, int token, ReadOnlySpan<float> reference, int topK,
        Span<float> stats, Span<int> topIds, Span<float> topLogProbs)
    {
        Validate(logits.Length, logits.Length, token < 0 ? default : [token], reference.Length, topK, stats.Length, topIds.Length, topLogProbs.Length);
        var row = new RowSource(logits, default);
        var referenceRow = new RowSource(reference, default);
        Core(in row, in referenceRow, logits.Length, token, topK, stats, topIds, topLogProbs);
    }

    private static int Validate(int logitCount, int vocabulary, ReadOnlySpan<int> tokens, int referenceCount, int topK,
        int statsCount, int topIdCount, int topLogProbCount)
    {
        if (vocabulary < 1 || logitCount % vocabulary != 0)
        {
            throw new ArgumentException($"vocab_stats: logits hold {logitCount} values, not a whole number of rows of {vocabulary}");
        }
        int rows = logitCount / vocabulary;
        if ((uint)topK > MaxTopK)
        {
            throw new ArgumentOutOfRangeException(nameof(topK), topK, $"vocab_stats: top-k must be in 0..{MaxTopK}");
        }
        if (!tokens.IsEmpty && tokens.Length != rows)
        {
            throw new ArgumentException($"vocab_stats: {tokens.Length} token ids for {rows} rows");
        }
        foreach (int token in tokens)
        {
            if (token >= vocabulary)
            {
                throw new ArgumentOutOfRangeException(nameof(tokens), token, $"vocab_stats: token id {token} is outside the vocabulary of {vocabulary}");
            }
        }
        if (referenceCount != 0 && referenceCount != logitCount)
        {
            throw new ArgumentException($"vocab_stats: the reference logits hold {referenceCount} values; expected {logitCount} ([{rows}, {vocabulary}])");
        }
        if (statsCount != rows * FieldCount || topIdCount != rows * topK || topLogProbCount != rows * topK)
        {
            throw new ArgumentException($"vocab_stats: outputs must be stats [{rows}, {FieldCount}] and top ids / log-probs [{rows}, {topK}]");
        }
        return rows;
    }

    /// <summary>The row as fp32 or raw bf16 (one of the two is set); hands it out a chunk at a time as fp32.</summary>
    private readonly ref struct RowSource(ReadOnlySpan<float> f32, ReadOnlySpan<ushort> bf16)
    {
        private readonly ReadOnlySpan<float> _f32 = f32;
        private readonly ReadOnlySpan<ushort> _bf16 = bf16;

        public bool IsEmpty => _f32.IsEmpty && _bf16.IsEmpty;

        public ReadOnlySpan<float> Chunk(int start, int count, Span<float> scratch)
        {
            if (_bf16.IsEmpty)
            {
                return _f32.Slice(start, count);
            }
            // bf16 -> fp32 is a 16-bit shift: widen the raw patterns into the upper half of each word.
            var bits = MemoryMarshal.Cast<float, uint>(scratch[..count]);
            TensorPrimitives.ConvertTruncating<ushort, uint>(_bf16.Slice(start, count), bits);
            TensorPrimitives.ShiftLeft<uint>(bits, 16, bits);
            return scratch[..count];
        }

        public float At(int index) => _bf16.IsEmpty ? _f32[index] : BFloat16.ToSingle(_bf16[index]);
    }

    /// <summary>Running sums of one row, relative to its running max <c>M</c>.</summary>
    private struct Moments
    {
        public double M;      // running max (-inf until a finite entry)
        public double S1, S2, S3, S4; // sum exp(k (x - M))
        public double T;      // sum exp(x - M) (x - M)
        public double Cross;  // sum exp(x - M) (x - y) over entries with x finite: KL numerator

        public void Rescale(double newMax)
        {
            if (double.IsNegativeInfinity(M))
            {
                M = newMax;
                return;
            }
            double shift = M - newMax; // <= 0
            double r = Math.Exp(shift);
            T = r * (T + shift * S1);
            Cross *= r;
            S1 *= r;
            S2 *= r * r;
            S3 *= r * r * r;
            S4 *= r * r * r * r;
            M = newMax;
        }
    }

    private static void Core(in RowSource row, in RowSource reference, int vocabulary, int token, int topK,
        Span<float> stats, Span<int> topIds, Span<float> topLogProbs)
    {
        Span<float> xScratch = stackalloc float[ChunkLength];
        Span<float> yScratch = stackalloc float[ChunkLength];
        Span<float> shifted = stackalloc float[ChunkLength];
        Span<float> exps = stackalloc float[ChunkLength];
        Span<float> work = stackalloc float[ChunkLength];
        // The top list keeps at least two entries for the margin.
        int keep = Math.Max(topK, 2);
        Span<float> bestValues = stackalloc float[MaxTopK];
        Span<int> bestIds = stackalloc int[MaxTopK];
        bestValues.Fill(float.NegativeInfinity);
        bestIds.Fill(-1);

        bool hasReference = !reference.IsEmpty;
        var p = new Moments { M = double.NegativeInfinity };
        var q = new Moments { M = double.NegativeInfinity };
        bool klPqInfinite = false;
        bool klQpInfinite = false;
        bool invalid = false;

        for (int start = 0; start < vocabulary; start += ChunkLength)
        {
            int count = Math.Min(ChunkLength, vocabulary - start);
            var x = row.Chunk(start, count, xScratch);
            var y = hasReference ? reference.Chunk(start, count, yScratch) : default;
            float chunkMax = TensorPrimitives.Max(x);
            if (float.IsNaN(chunkMax) || float.IsPositiveInfinity(chunkMax))
            {
                invalid = true;
                break;
            }
            if (chunkMax > bestValues[keep - 1])
            {
                InsertTop(x, start, keep, bestValues, bestIds);
            }
            Accumulate(ref p, x, chunkMax, shifted[..count], exps[..count], work[..count]);
            if (hasReference)
            {
                float referenceMax = TensorPrimitives.Max(y);
                if (float.IsNaN(referenceMax) || float.IsPositiveInfinity(referenceMax))
                {
                    invalid = true;
                    break;
                }
                // Cross terms need both rows' exponentials: p's are in `exps` now, so take them before q's overwrite it.
                bool masked = float.IsNegativeInfinity(TensorPrimitives.Min(x)) || float.IsNegativeInfinity(TensorPrimitives.Min(y));
                CrossTerm(ref p, x, y, exps[..count], work[..count], masked, ref klPqInfinite);
                Accumulate(ref q, y, referenceMax, shifted[..count], exps[..count], work[..count]);
                CrossTerm(ref q, y, x, exps[..count], work[..count], masked, ref klQpInfinite);
            }
        }

        if (invalid || double.IsNegativeInfinity(p.M) || (hasReference && double.IsNegativeInfinity(q.M)))
        {
            // No finite entry, or a NaN / +inf logit: nothing is defined.
            stats.Fill(float.NaN);
            topIds.Fill(-1);
            topLogProbs.Fill(float.NaN);
            return;
        }

        double logS1 = Math.Log(p.S1);
        double logSumExp = p.M + logS1;
        stats[(int)VocabStatsField.MaxLogit] = (float)p.M;
        stats[(int)VocabStatsField.LogSumExp] = (float)logSumExp;
        stats[(int)VocabStatsField.Entropy] = (float)Math.Max(0, logS1 - p.T / p.S1);
        double tokenLogProb = token >= 0 ? row.At(token) - logSumExp : double.NaN;
        stats[(int)VocabStatsField.TokenLogProb] = (float)tokenLogProb;
        double p1 = Math.Exp(bestValues[0] - logSumExp);
        double p2 = float.IsNegativeInfinity(bestValues[1]) ? 0 : Math.Exp(bestValues[1] - logSumExp);
        stats[(int)VocabStatsField.Margin] = (float)(p1 - p2);
        stats[(int)VocabStatsField.Kurtosis] = (float)Kurtosis(p.S1, p.S2, p.S3, p.S4, vocabulary);
        if (hasReference)
        {
            double referenceLogSumExp = q.M + Math.Log(q.S1);
            stats[(int)VocabStatsField.KlPq] = klPqInfinite ? float.PositiveInfinity : (float)Math.Max(0, p.Cross / p.S1 - logSumExp + referenceLogSumExp);
            stats[(int)VocabStatsField.KlQp] = klQpInfinite ? float.PositiveInfinity : (float)Math.Max(0, q.Cross / q.S1 - referenceLogSumExp + logSumExp);
            stats[(int)VocabStatsField.TokenLogRatio] = (float)(tokenLogProb - (token >= 0 ? reference.At(token) - referenceLogSumExp : double.NaN));
        }
        else
        {
            stats[(int)VocabStatsField.KlPq] = float.NaN;
            stats[(int)VocabStatsField.KlQp] = float.NaN;
            stats[(int)VocabStatsField.TokenLogRatio] = float.NaN;
        }
        for (int i = 0; i < topK; i++)
        {
            topIds[i] = bestIds[i];
            topLogProbs[i] = bestIds[i] < 0 ? float.NegativeInfinity : (float)(bestValues[i] - logSumExp);
        }
    }

    /// <summary>
    /// Excess kurtosis of the V probabilities p_i = e_i / S1 from the power sums S_k = sum e_i^k. With q = V p
    /// (mean exactly 1) and M_k = mean(q^k) = V^(k-1) S_k / S1^k: m2 = M2 - 1, m4 = M4 - 4 M3 + 6 M2 - 3,
    /// kurtosis = m4 / m2^2 - 3; 0 when m2 is at or below the uniform floor.
    /// </summary>
    public static double Kurtosis(double s1, double s2, double s3, double s4, int vocabulary)
    {
        double v = vocabulary;
        double m2Raw = v * (s2 / (s1 * s1));
        double m3Raw = v * v * (s3 / (s1 * s1 * s1));
        double m4Raw = v * v * v * (s4 / (s1 * s1 * s1 * s1));
        double m2 = m2Raw - 1;
        if (!(m2 > UniformVarianceFloor))
        {
            return 0;
        }
        double m4 = m4Raw - 4 * m3Raw + 6 * m2Raw - 3;
        return m4 / (m2 * m2) - 3;
    }

    /// <summary>Adds one chunk to the running sums (vectorised: exp of the shifted chunk, then power sums).</summary>
    private static void Accumulate(ref Moments moments, ReadOnlySpan<float> x, float chunkMax, Span<float> shifted, Span<float> exps, Span<float> work)
    {
        if (float.IsNegativeInfinity(chunkMax))
        {
            exps.Clear();
            return; // all masked: contributes nothing (but the entries still count in V for the kurtosis)
        }
        if (chunkMax > moments.M)
        {
            moments.Rescale(chunkMax);
        }
        float max = (float)moments.M;
        TensorPrimitives.Subtract(x, max, shifted);
        TensorPrimitives.Exp(shifted, exps);
        // Masked entries: shifted = -inf, exp = 0; clamp the shift so 0 x shift stays 0, not NaN.
        TensorPrimitives.Max(shifted, -float.MaxValue, shifted);
        moments.S1 += TensorPrimitives.Sum(exps);
        moments.S2 += TensorPrimitives.SumOfSquares(exps);
        moments.T += TensorPrimitives.Dot(exps, shifted);
        TensorPrimitives.Multiply(exps, exps, work);
        moments.S3 += TensorPrimitives.Dot(work, exps);
        moments.S4 += TensorPrimitives.SumOfSquares(work);
    }

    /// <summary>Cross += sum exp(x - M)(x - y) over this chunk; an entry with x finite and y = -inf makes KL infinite.</summary>
    private static void CrossTerm(ref Moments moments, ReadOnlySpan<float> x, ReadOnlySpan<float> y, ReadOnlySpan<float> exps, Span<float> work,
        bool masked, ref bool infinite)
    {
        if (!masked)
        {
            TensorPrimitives.Subtract(x, y, work);
            moments.Cross += TensorPrimitives.Dot(exps, work);
            return;
        }
        double sum = 0;
        for (int i = 0; i < x.Length; i++)
        {
            if (float.IsNegativeInfinity(x[i]))
            {
                continue; // p_i = 0 contributes nothing
            }
            if (float.IsNegativeInfinity(y[i]))
            {
                infinite = true;
                continue;
            }
            sum += exps[i] * ((double)x[i] - y[i]);
        }
        moments.Cross += sum;
    }

    /// <summary>Inserts the chunk's entries that beat the current k-th into the sorted list (ties: lower id first).</summary>
    private static void InsertTop(ReadOnlySpan<float> x, int start, int keep, Span<float> values, Span<int> ids)
    {
        for (int i = 0; i < x.Length; i++)
        {
            float value = x[i];
            if (!(value > values[keep - 1]))
            {
                continue; // also skips -inf (masked) and equal values at a higher id
            }
            int slot = keep - 1;
            while (slot > 0 && value > values[slot - 1])
            {
                values[slot] = values[slot - 1];
                ids[slot] = ids[slot - 1];
                slot--;
            }
            values[slot] = value;
            ids[slot] = start + i;
        }
    }
}
