using BenchmarkDotNet.Attributes;
using KernelLM.Runtime;

namespace KernelLM.Bench;

/// <summary>
/// This machine's streaming read bandwidth: one op = TensorPrimitives.Sum over a 256 MiB fp32 buffer, on one
/// thread or in Threads contiguous slices (Parallel.For). Its GB/s is the roofline the other suites'
/// GB/s columns are compared with (the "Peak GB/s" and "% of peak" columns).
/// </summary>
public class MemoryBandwidthBenchmark : IDisposable
{
    private NativeBuffer<float>? _buffer;
    private float[] _partials = [];

    /// <summary>1, 2 (the thread counts of the other suites) and every core.</summary>
    public static IEnumerable<int> ThreadCounts => new[] { 1, 2, Environment.ProcessorCount }.Distinct().Order();

    [ParamsSource(nameof(ThreadCounts))]
    public int Threads { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        _buffer = StreamingRead.Allocate();
        _partials = new float[Threads];
    }

    [Benchmark(Description = "Sum 256 MiB fp32")]
    public float StreamingSum() => StreamingRead.Sum(_buffer!, Threads, _partials);

    [GlobalCleanup]
    public void Dispose()
    {
        _buffer?.Dispose();
        _buffer = null;
        GC.SuppressFinalize(this);
    }
}
