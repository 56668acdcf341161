using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace KernelLM.Runtime.Cpu;

/// <summary>
/// The CPU device's inner loops: dot products of one weight row (in its stored dtype, widened in registers)
/// with one or four fp32 activation rows, fp32 accumulation. bf16 widens by a 16-bit shift; f16 rows are
/// widened into a per-thread scratch row first (TensorPrimitives' F16C conversion) and take the f32 path.
/// </summary>
internal static unsafe class CpuKernels
{
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static (Vector256<float> Lower, Vector256<float> Upper) WidenBf16(ushort* source)
    {
        var (lower, upper) = Vector256.Widen(Vector256.Load(source));
        return (Vector256.ShiftLeft(lower, 16).AsSingle(), Vector256.ShiftLeft(upper, 16).AsSingle());
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> Fma(Vector256<float> a, Vector256<float> b, Vector256<float> c) =>
        Vector256.FusedMultiplyAdd(a, b, c);

    /// <summary>w[0..n) (bf16) . x[0..n) (fp32)</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static float DotBf16(ushort* w, float* x, int n)
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
                var (w0, w1) = WidenBf16(w + c);
                var (w2, w3) = WidenBf16(w + c + 16);
                a0 = Fma(w0, Vector256.Load(x + c), a0);
                a1 = Fma(w1, Vector256.Load(x + c + 8), a1);
                a2 = Fma(w2, Vector256.Load(x + c + 16), a2);
                a3 = Fma(w3, Vector256.Load(x + c + 24), a3);
            }
            for (; c <= n - 16; c += 16)
            {
                var (w0, w1) = WidenBf16(w + c);
                a0 = Fma(w0, Vector256.Load(x + c), a0);
                a1 = Fma(w1, Vector256.Load(x + c + 8), a1);
            }
        }
        float sum = Vector256.Sum((a0 + a1) + (a2 + a3));
        for (; c < n; c++)
        {
            sum += BFloat16.ToSingle(w[c]) * x[c];
        }
        return sum;
    }

    /// <summary>Four dot products sharing one bf16 weight row: result[j] = w . x_j. Each weight vector is
    /// widened once and used four times (prefill).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void DotBf16x4(ushort* w, float* x0, float* x1, float* x2, float* x3, int n, float* result)
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
                var (wl, wu) = WidenBf16(w + c);
                a0 = Fma(wu, Vector256.Load(x0 + c + 8), Fma(wl, Vector256.Load(x0 + c), a0));
                a1 = Fma(wu, Vector256.Load(x1 + c + 8), Fma(wl, Vector256.Load(x1 + c), a1));
                a2 = Fma(wu, Vector256.Load(x2 + c + 8), Fma(wl, Vector256.Load(x2 + c), a2));
                a3 = Fma(wu, Vector256.Load(x3 + c + 8), Fma(wl, Vector256.Load(x3 + c), a3));
            }
        }
        float s0 = Vector256.Sum(a0), s1 = Vector256.Sum(a1), s2 = Vector256.Sum(a2), s3 = Vector256.Sum(a3);
        for (; c < n; c++)
        {
            float wc = BFloat16.ToSingle(w[c]);
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

    /// <summary>w[0..n) (fp32) . x[0..n) (fp32)</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static float DotF32(float* w, float* x, int n)
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
                a0 = Fma(Vector256.Load(w + c), Vector256.Load(x + c), a0);
                a1 = Fma(Vector256.Load(w + c + 8), Vector256.Load(x + c + 8), a1);
                a2 = Fma(Vector256.Load(w + c + 16), Vector256.Load(x + c + 16), a2);
                a3 = Fma(Vector256.Load(w + c + 24), Vector256.Load(x + c + 24), a3);
            }
            for (; c <= n - 8; c += 8)
            {
                a0 = Fma(Vector256.Load(w + c), Vector256.Load(x + c), a0);
            }
        }
        float sum = Vector256.Sum((a0 + a1) + (a2 + a3));
        for (; c < n; c++)
        {
            sum += w[c] * x[c];
        }
        return sum;
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void DotF32x4(float* w, float* x0, float* x1, float* x2, float* x3, int n, float* result)
    {
        int c = 0;
        var a0 = Vector256<float>.Zero;
        var a1 = Vector256<float>.Zero;
        var a2 = Vector256<float>.Zero;
        var a3 = Vector256<float>.Zero;
        if (Vector256.IsHardwareAccelerated)
        {
            for (; c <= n - 8; c += 8)
            {
                var wv = Vector256.Load(w + c);
                a0 = Fma(wv, Vector256.Load(x0 + c), a0);
                a1 = Fma(wv, Vector256.Load(x1 + c), a1);
                a2 = Fma(wv, Vector256.Load(x2 + c), a2);
                a3 = Fma(wv, Vector256.Load(x3 + c), a3);
            }
        }
        float s0 = Vector256.Sum(a0), s1 = Vector256.Sum(a1), s2 = Vector256.Sum(a2), s3 = Vector256.Sum(a3);
        for (; c < n; c++)
        {
            float wc = w[c];
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
}
