namespace KernelLM.Tests.Support;

/// <summary>
/// Named, derived error bounds. The engine computes in fp32 (unit roundoff u = 2^-24) on weights whose
/// widening to fp32 is exact (bf16 and f16 are subsets of fp32), so the only error against an fp64
/// reference on the same rounded inputs is fp32 rounding in the arithmetic.
/// </summary>
public static class Tolerances
{
    public const double UnitRoundoff = 1.0 / (1 << 24);

    /// <summary>Worst-case bound of a length-n fp32 dot product (Higham: gamma_n = n u / (1 - n u))
    /// times sum |w_i x_i|; plus one rounding of the result.</summary>
    public static double DotProduct(int n, double magnitude) => (n * UnitRoundoff / (1 - n * UnitRoundoff) + UnitRoundoff) * magnitude;

    /// <summary>RMSNorm: a sum of n squares (gamma_n), a sqrt, a reciprocal and two products: about (n/2 + 5) u relative.</summary>
    public static double RmsNorm(int n, double magnitude) => (n / 2.0 + 5) * UnitRoundoff * magnitude;

    /// <summary>RoPE: two products and a sum per element, plus the fp32 angle (position x inv_freq rounded) and fp32 cos/sin:
    /// the angle's rounding error grows with the position, |position x inv_freq| x u.</summary>
    public static double Rope(int position, double magnitude) => (4 + 2.0 * (position + 1)) * UnitRoundoff * magnitude;

    /// <summary>Compacted RoPE inside attention (q and k rotated in fp32 before their dot product): each rotated element
    /// (x cos - y sin) carries the fp32 cos/sin (the device's sincosf: up to 2 ulp), two products and a sum, about 4u of
    /// |x| + |y|; with both operands rotated, the score moves by at most 2 x 4u x sum_i (|q_i| + |q_i'|)(|k_i| + |k_i'|)
    /// over the pairs, at most 2 x 4u x 2 |q| |k| = 16u |q| |k| (Cauchy-Schwarz). The angle itself is the same fp32 value
    /// in the reference.</summary>
    public static double CompactedRopeScore(double normProduct) => 16 * UnitRoundoff * normProduct;

    /// <summary>Attention: a head_dim dot product per score, exp and normalisation over the window, and a
    /// weighted sum of values: (head_dim + 2 x positions + 8) u times the largest |v| (softmax weights sum to 1)
    /// plus the score error propagated through exp: the same factor times max|score| x max|v|.</summary>
    public static double Attention(int headDim, int positions, double maxScore, double maxValue) =>
        (headDim + 2.0 * positions + 8) * UnitRoundoff * maxValue * (1 + maxScore);

    /// <summary>
    /// Relative error of the vocabulary reduction's sums: fp32 exponentials (a few ulp: the 16) summed in fp32 with at
    /// most n roundings in a row (gamma_n), then combined in fp64. On the CPU n is a chunk's length. On the GPU the fp32
    /// part is longer than a thread's terms: each rescale of its running sums and the block's fp32 merge (7 serial
    /// merges and a 5-level warp tree, with their rescales) round too, so the kernel's launch supplies n
    /// (CudaOps.VocabStatsLayout.SumLength: terms + 5 per rescale + 52) rather than this formula growing a GPU term.
    /// </summary>
    public static double VocabSum(int n) => (n + 16) * UnitRoundoff;

    /// <summary>log-sum-exp and log-probs: the relative error of S1 becomes an absolute one, plus one rounding of |x|.</summary>
    public static double VocabLogSumExp(int n, double maxAbsLogit) => VocabSum(n) + 2 * UnitRoundoff * maxAbsLogit;

    /// <summary>Entropy log S1 - T / S1: T / S1 is a p-weighted mean of shifts x - m bounded by the largest finite shift.</summary>
    public static double VocabEntropy(int n, double maxShift) => 3 * VocabSum(n) * (1 + maxShift);

    /// <summary>Kurtosis (m4 - ...)/m2^2 from raw power moments: each moment carries (k + 1) times the sum error, so the
    /// cancellation error is about 5 x that times the moments' magnitude over m2^2 (a relative error of the result).</summary>
    public static double VocabKurtosis(int n, double powerMagnitude, double relativeVariance) =>
        5 * VocabSum(n) * powerMagnitude / (relativeVariance * relativeVariance);

    /// <summary>KL = Cross / S1 - L_p + L_q: two log-sum-exps and a weighted mean of |x - y|.</summary>
    public static double VocabKl(int n, double maxAbsLogit, double maxDifference) =>
        2 * VocabLogSumExp(n, maxAbsLogit) + 2 * VocabSum(n) * maxDifference;

    /// <summary>
    /// Relative error of a TokenSelect soft vote v = sum_h exp(s_h - M_h) / S_h: each score is off by at most
    /// <paramref name="scoreError"/> (its fp32 dot product), which moves exp(s - M) and S by twice that each (4 in all);
    /// S sums <paramref name="candidates"/> exponentials of a few ulp each in fp32 (tiles, then a merge), and the vote adds
    /// <paramref name="heads"/> terms: (candidates + heads + 16) u.
    /// </summary>
    public static double KvSelectVote(int candidates, int heads, double scoreError) => 4 * scoreError + (candidates + heads + 16) * UnitRoundoff;
}
