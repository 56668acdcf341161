using System.Diagnostics;
using System.Numerics.Tensors;
using KernelLM.Runtime;

namespace KernelLM.Bench;

/// <summary>
/// Streaming read of a large fp32 buffer (TensorPrimitives.Sum, vectorised to the widest ISA), on one thread
/// or split in contiguous slices over several threads with Parallel.For: the measured peak the GB/s figures
/// are set against. Used by <see cref="MemoryBandwidthBenchmark"/> and, when that suite is not part of a run,
/// by the short probe in <see cref="Roofline"/>.
/// </summary>
public static class StreamingRead
{
    /// <summary>256 MiB: far beyond any last-level cache, so the sum streams from DRAM.</summary>
    public const long BufferBytes = 256L << 20;

    /// <summary>A buffer of <see cref="BufferBytes"/> with every page written (no first-touch faults while measuring).</summary>
    public static NativeBuffer<float> Allocate()
    {
        var buffer = new NativeBuffer<float>(BufferBytes / sizeof(float));
        buffer.Span.Fill(1f);
        return buffer;
    }

    /// <summary>Sums the whole buffer with <paramref name="threads"/> threads, one contiguous slice each.</summary>
    public static float Sum(NativeBuffer<float> buffer, int threads, float[] partials)
    {
        if (threads <= 1)
        {
            return TensorPrimitives.Sum<float>(buffer.Span);
        }
        long length = buffer.Length;
        long slice = (length + threads - 1) / threads;
        Parallel.For(0, threads, new ParallelOptions { MaxDegreeOfParallelism = threads }, i =>
        {
            long start = i * slice;
            int count = (int)Math.Min(slice, length - start);
            partials[i] = TensorPrimitives.Sum<float>(buffer.Slice(start, count));
        });
        return TensorPrimitives.Sum<float>(partials.AsSpan(0, threads));
    }

    /// <summary>Best-of-<paramref name="passes"/> read bandwidth in GB/s (1e9 bytes/s) after one warm-up pass.</summary>
    public static double Probe(int threads, int passes = 5)
    {
        using var buffer = Allocate();
        var partials = new float[threads];
        Sum(buffer, threads, partials);
        double best = double.MaxValue;
        for (int pass = 0; pass < passes; pass++)
        {
            long begin = Stopwatch.GetTimestamp();
            Sum(buffer, threads, partials);
            best = Math.Min(best, Stopwatch.GetElapsedTime(begin).TotalSeconds);
        }
        return BufferBytes / best / 1e9;
    }
}
