using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace KernelLM.Runtime.Cpu;

/// <summary>How a kernel reads a weight row of one stored dtype: 16 elements widened to two fp32 vectors,
/// or one element. Implemented by structs so the JIT specialises each kernel per dtype (no indirection).</summary>
internal unsafe interface IWeightRow
{
    static abstract (Vector256<float> Lower, Vector256<float> Upper) Load16(byte* row, int column);

    static abstract float Load1(byte* row, int column);
}

/// <summary>bf16: the upper half of an fp32, widened by a 16-bit shift.</summary>
internal readonly unsafe struct Bf16Row : IWeightRow
{
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static (Vector256<float> Lower, Vector256<float> Upper) Load16(byte* row, int column)
    {
        var (lower, upper) = Vector256.Widen(Vector256.Load((ushort*)row + column));
        return (Vector256.ShiftLeft(lower, 16).AsSingle(), Vector256.ShiftLeft(upper, 16).AsSingle());
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Load1(byte* row, int column) => BFloat16.ToSingle(((ushort*)row)[column]);
}

/// <summary>fp32 rows (and f16 rows, after widening into a scratch row).</summary>
internal readonly unsafe struct F32Row : IWeightRow
{
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static (Vector256<float> Lower, Vector256<float> Upper) Load16(byte* row, int column) =>
        (Vector256.Load((float*)row + column), Vector256.Load((float*)row + column + 8));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Load1(byte* row, int column) => ((float*)row)[column];
}

/// <summary>
/// The CPU device's inner loops: dot products of one weight row (in its stored dtype, widened in registers)
/// with one or four fp32 activation rows, fp32 accumulation. f16 rows are widened into a per-thread scratch
/// row first (TensorPrimitives' F16C conversion) and take the f32 path.
/// </summary>
internal static unsafe class CpuKernels
{
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> Fma(Vector256<float> a, Vector256<float> b, Vector256<float> c) =>
        Vector256.FusedMultiplyAdd(a, b, c);

    /// <summary>w[0..n) . x[0..n): four independent accumulators over 32 columns per step (decode).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static float Dot<TRow>(byte* w, float* x, int n) where TRow : struct, IWeightRow
    {
        int c = 0;
        var a0 = Vector256<float>.Zero;
        var a1 = Vector256<float>.Zero;
        var a2 = Vector256<float>.Zero;
        var a3 = Vector256<float>.Zero;
        if (Vector256.IsHardwareAccelerated)
        {
            for (; c <= n - 32; c += 32)
            {
                var (w0, w1) = TRow.Load16(w, c);
                var (w2, w3) = TRow.Load16(w, c + 16);
                a0 = Fma(w0, Vector256.Load(x + c), a0);
                a1 = Fma(w1, Vector256.Load(x + c + 8), a1);
                a2 = Fma(w2, Vector256.Load(x + c + 16), a2);
                a3 = Fma(w3, Vector256.Load(x + c + 24), a3);
            }
            for (; c <= n - 16; c += 16)
            {
                var (w0, w1) = TRow.Load16(w, c);
                a0 = Fma(w0, Vector256.Load(x + c), a0);
                a1 = Fma(w1, Vector256.Load(x + c + 8), a1);
            }
        }
        float sum = Vector256.Sum((a0 + a1) + (a2 + a3));
        for (; c < n; c++)
        {
            sum += TRow.Load1(w, c) * x[c];
        }
        return sum;
    }

    /// <summary>Four dot products sharing one weight row: result[j] = w . x_j. Each weight vector is
    /// loaded and widened once and used four times (prefill).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Dot4<TRow>(byte* w, float* x0, float* x1, float* x2, float* x3, int n, float* result) where TRow : struct, IWeightRow
    {
        int c = 0;
        var a0 = Vector256<float>.Zero;
        var a1 = Vector256<float>.Zero;
        var a2 = Vector256<float>.Zero;
        var a3 = Vector256<float>.Zero;
        if (Vector256.IsHardwareAccelerated)
        {
            for (; c <= n - 16; c += 16)
            {
                var (wl, wu) = TRow.Load16(w, c);
                a0 = Fma(wu, Vector256.Load(x0 + c + 8), Fma(wl, Vector256.Load(x0 + c), a0));
                a1 = Fma(wu, Vector256.Load(x1 + c + 8), Fma(wl, Vector256.Load(x1 + c), a1));
                a2 = Fma(wu, Vector256.Load(x2 + c + 8), Fma(wl, Vector256.Load(x2 + c), a2));
                a3 = Fma(wu, Vector256.Load(x3 + c + 8), Fma(wl, Vector256.Load(x3 + c), a3));
            }
        }
        float s0 = Vector256.Sum(a0), s1 = Vector256.Sum(a1), s2 = Vector256.Sum(a2), s3 = Vector256.Sum(a3);
        for (; c < n; c++)
        {
            float wc = TRow.Load1(w, c);
            s0 += wc * x0[c];
            s1 += wc * x1[c];
            s2 += wc * x2[c];
            s3 += wc * x3[c];
        }
        result[0] = s0;
        result[1] = s1;
        result[2] = s2;
        result[3] = s3;
    }

    /// <summary>Four weight rows against one activation row: result[j] = w_j . x. The activation vector is
    /// loaded once for four rows, which halves the loads of a decode GEMV whose input no longer fits in L1
    /// (down_proj: 8192 fp32 = 32 KB).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Dot4Rows<TRow>(byte* w0, byte* w1, byte* w2, byte* w3, float* x, int n, float* result) where TRow : struct, IWeightRow
    {
        int c = 0;
        var a0 = Vector256<float>.Zero;
        var a1 = Vector256<float>.Zero;
        var a2 = Vector256<float>.Zero;
        var a3 = Vector256<float>.Zero;
        var b0 = Vector256<float>.Zero;
        var b1 = Vector256<float>.Zero;
        var b2 = Vector256<float>.Zero;
        var b3 = Vector256<float>.Zero;
        if (Vector256.IsHardwareAccelerated)
        {
            for (; c <= n - 16; c += 16)
            {
                var xl = Vector256.Load(x + c);
                var xu = Vector256.Load(x + c + 8);
                var (l0, u0) = TRow.Load16(w0, c);
                var (l1, u1) = TRow.Load16(w1, c);
                var (l2, u2) = TRow.Load16(w2, c);
                var (l3, u3) = TRow.Load16(w3, c);
                a0 = Fma(l0, xl, a0);
                b0 = Fma(u0, xu, b0);
                a1 = Fma(l1, xl, a1);
                b1 = Fma(u1, xu, b1);
                a2 = Fma(l2, xl, a2);
                b2 = Fma(u2, xu, b2);
                a3 = Fma(l3, xl, a3);
                b3 = Fma(u3, xu, b3);
            }
        }
        float s0 = Vector256.Sum(a0 + b0), s1 = Vector256.Sum(a1 + b1), s2 = Vector256.Sum(a2 + b2), s3 = Vector256.Sum(a3 + b3);
        for (; c < n; c++)
        {
            float xc = x[c];
            s0 += TRow.Load1(w0, c) * xc;
            s1 += TRow.Load1(w1, c) * xc;
            s2 += TRow.Load1(w2, c) * xc;
            s3 += TRow.Load1(w3, c) * xc;
        }
        result[0] = s0;
        result[1] = s1;
        result[2] = s2;
        result[3] = s3;
    }
}
