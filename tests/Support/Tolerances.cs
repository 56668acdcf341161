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

    /// <summary>Attention: a head_dim dot product per score, exp and normalisation over the window, and a
    /// weighted sum of values: (head_dim + 2 x positions + 8) u times the largest |v| (softmax weights sum to 1)
    /// plus the score error propagated through exp: the same factor times max|score| x max|v|.</summary>
    public static double Attention(int headDim, int positions, double maxScore, double maxValue) =>
        (headDim + 2.0 * positions + 8) * UnitRoundoff * maxValue * (1 + maxScore);
}
