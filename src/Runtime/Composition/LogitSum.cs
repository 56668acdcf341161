using System.Numerics.Tensors;

namespace KernelLM.Runtime.Composition;

/// <summary>
/// The CPU twin of kernels/logit_sum.cu (the reference the device is checked against, and the CPU path of a
/// composition): the weighted sum of several models' rows of next-token logits, in fp32 with one fused
/// multiply-add per member in member order, exactly the kernel's arithmetic, so the two agree bit for bit.
///
///   destination[r, i] = sum_m w_m x_m[r, i]                 i &lt; width; x_m: [rows, stride_m], stride_m &gt;= width
///   plausibility cut:  destination[r, i] = -inf  where x_0[r, i] &lt; max_j x_0[r, j] + log(alpha)
/// </summary>
public static class LogitSum
{
    /// <summary>Members one kernel launch sums (LOGIT_SUM_MAX_INPUTS).</summary>
    public const int MaxInputsPerLaunch = 4;

    /// <summary>
    /// destination[r, i] = weight x source[r, i] (<paramref name="first"/>) or destination[r, i] + weight x source[r, i] (one
    /// rounding: a fused multiply-add) for r &lt; rows, i &lt; width. source: [rows, sourceStride]; destination: [rows, width].
    /// </summary>
    public static void Accumulate(ReadOnlySpan<float> source, int sourceStride, float weight, Span<float> destination, int rows, int width, bool first)
    {
        if (width <= 0 || sourceStride < width)
        {
            throw new ArgumentException($"logit_sum: rows of {sourceStride} cannot give a width of {width}", nameof(sourceStride));
        }
        if (source.Length < (long)(rows - 1) * sourceStride + width || destination.Length < (long)rows * width)
        {
            throw new ArgumentException($"logit_sum: [{rows}, {sourceStride}] source and [{rows}, {width}] destination needed");
        }
        if (!float.IsFinite(weight))
        {
            throw new ArgumentOutOfRangeException(nameof(weight), weight, "logit_sum: weights must be finite");
        }
        for (int r = 0; r < rows; r++)
        {
            var x = source.Slice(r * sourceStride, width);
            var y = destination.Slice(r * width, width);
            if (first)
            {
                TensorPrimitives.Multiply(x, weight, y);
            }
            else
            {
                TensorPrimitives.FusedMultiplyAdd(x, weight, y, y);
            }
        }
    }

    /// <summary>max_{i &lt; width} of each row of <paramref name="source"/> [rows, stride] plus <paramref name="shift"/>: the cutoff of
    /// <see cref="Cut"/> (logit_row_max).</summary>
    public static float RowCutoff(ReadOnlySpan<float> row, float shift) => TensorPrimitives.Max(row) + shift;

    /// <summary>destination[i] = -inf where plausibility[i] &lt; cutoff (one row of width destination.Length).</summary>
    public static void Cut(ReadOnlySpan<float> plausibility, float cutoff, Span<float> destination)
    {
        for (int i = 0; i < destination.Length; i++)
        {
            if (plausibility[i] < cutoff)
            {
                destination[i] = float.NegativeInfinity;
            }
        }
    }
}
