using System.Collections.Concurrent;
using System.Globalization;
using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;
using KernelLM.Runtime;

namespace KernelLM.Bench;

/// <summary>Where a peak bandwidth figure came from.</summary>
public enum PeakSource
{
    /// <summary><see cref="MemoryBandwidthBenchmark"/>'s mean, from the same summary.</summary>
    Benchmark,

    /// <summary><see cref="StreamingRead.Probe"/> run in this process (the suite was not in the summary).</summary>
    Probe,
}

/// <summary>A measured streaming read bandwidth at a thread count.</summary>
public readonly record struct PeakBandwidth(int Threads, double GigabytesPerSecond, PeakSource Source);

/// <summary>
/// What one op of each suite does (tokens, bytes streamed) and the measured peak bandwidth it is set against.
/// Everything here is computed from a benchmark case's type and parameters, so it works whichever process
/// measured the case.
/// </summary>
public static class Roofline
{
    private static readonly ConcurrentDictionary<int, double> s_probes = new();

    /// <summary>Tokens processed by one op; 0 when the op is not token-based.</summary>
    public static double TokensPerOperation(BenchmarkCase benchmark)
    {
        var type = benchmark.Descriptor.Type;
        if (type == typeof(DecodeBenchmark) || type == typeof(AdaptiveDecodingBenchmark))
        {
            return 1;
        }
        if (type == typeof(PrefillBenchmark))
        {
            return PrefillBenchmark.PromptLength;
        }
        if (type == typeof(CudaModelBenchmark))
        {
            return benchmark.Descriptor.WorkloadMethod.Name == nameof(CudaModelBenchmark.Decode) ? 1
                : Parameter(benchmark, "Device") is "cuda" ? CudaModelBenchmark.PromptTokens : 16;
        }
        return 0;
    }

    /// <summary>Bytes one op must stream from memory (weights; the read buffer); 0 when not meaningful
    /// (prefill reuses each weight row for 128 tokens: compute-bound).</summary>
    public static double BytesPerOperation(BenchmarkCase benchmark)
    {
        var type = benchmark.Descriptor.Type;
        if (type == typeof(DecodeBenchmark))
        {
            return EmbeddedModel.BytesPerDecodedToken;
        }
        if (type == typeof(GemvBenchmark))
        {
            return GemvBenchmark.WeightBytes((GemvShape)Parameter(benchmark, nameof(GemvBenchmark.Shape))!, (DType)Parameter(benchmark, nameof(GemvBenchmark.DType))!);
        }
        if (type == typeof(MemoryBandwidthBenchmark))
        {
            return StreamingRead.BufferBytes;
        }
        if (type == typeof(CudaModelBenchmark) && benchmark.Descriptor.WorkloadMethod.Name == nameof(CudaModelBenchmark.Decode))
        {
            return CudaModelBenchmark.BytesPerDecodedToken((string)Parameter(benchmark, nameof(CudaModelBenchmark.Shape))!);
        }
        if (type == typeof(VocabStatsBenchmark))
        {
            return VocabStatsBenchmark.RowBytes((int)Parameter(benchmark, nameof(VocabStatsBenchmark.Vocabulary))!, (DType)Parameter(benchmark, nameof(VocabStatsBenchmark.DType))!);
        }
        return 0;
    }

    /// <summary>The case's Threads parameter; 1 for the vocab_stats twin (it runs on the calling thread); every core otherwise.</summary>
    public static int Threads(BenchmarkCase benchmark) =>
        Parameter(benchmark, "Threads") is int threads ? threads : benchmark.Descriptor.Type == typeof(VocabStatsBenchmark) ? 1 : Environment.ProcessorCount;

    /// <summary>A case measured on the GPU: the CPU's read bandwidth is not its roofline.</summary>
    public static bool OnGpu(BenchmarkCase benchmark) => Parameter(benchmark, "Device") is "cuda" or "cuda-emulated";

    /// <summary>Mean time of the case over the mean 1-thread decode step of the embedded model in the same summary, or null.</summary>
    public static double? ShareOfDecodeStep(Summary summary, BenchmarkCase benchmark)
    {
        if (benchmark.Descriptor.Type != typeof(VocabStatsBenchmark) || MeanNanoseconds(summary, benchmark) is not double ns)
        {
            return null;
        }
        foreach (var report in summary.Reports)
        {
            if (report.BenchmarkCase.Descriptor.Type == typeof(DecodeBenchmark) && Threads(report.BenchmarkCase) == 1
                && MeanNanoseconds(summary, report.BenchmarkCase) is double decode)
            {
                return ns / decode;
            }
        }
        return null;
    }

    public static object? Parameter(BenchmarkCase benchmark, string name) =>
        benchmark.Parameters.Items.FirstOrDefault(parameter => parameter.Name == name)?.Value;

    /// <summary>Fastest iteration's time per op in nanoseconds (STREAM's convention for a peak), or null.</summary>
    public static double? BestNanoseconds(Summary summary, BenchmarkCase benchmark) =>
        summary[benchmark] is { ResultStatistics: { } statistics } ? statistics.Min : null;

    /// <summary>Mean time of one op in nanoseconds, or null when the case has no result.</summary>
    public static double? MeanNanoseconds(Summary summary, BenchmarkCase benchmark) =>
        summary[benchmark] is { ResultStatistics: { } statistics } ? statistics.Mean : null;

    public static double? TokensPerSecond(Summary summary, BenchmarkCase benchmark)
    {
        double tokens = TokensPerOperation(benchmark);
        return tokens > 0 && MeanNanoseconds(summary, benchmark) is double ns ? tokens * 1e9 / ns : null;
    }

    /// <summary>Achieved bandwidth in GB/s (1e9 bytes/s): bytes per op / mean time.</summary>
    public static double? GigabytesPerSecond(Summary summary, BenchmarkCase benchmark)
    {
        double bytes = BytesPerOperation(benchmark);
        return bytes > 0 && MeanNanoseconds(summary, benchmark) is double ns ? bytes / ns : null;
    }

    /// <summary>
    /// The measured streaming read peak for <paramref name="threads"/> threads: MemoryBandwidthBenchmark's
    /// fastest iteration at that thread count when the summary holds one (a peak is a best case, as in
    /// STREAM; the table's GB/s for that row is its mean), else a one-off in-process probe (same code,
    /// best of 5 passes over 256 MiB), cached per thread count.
    /// </summary>
    public static PeakBandwidth Peak(Summary summary, int threads)
    {
        foreach (var report in summary.Reports)
        {
            var benchmark = report.BenchmarkCase;
            if (benchmark.Descriptor.Type == typeof(MemoryBandwidthBenchmark) && Threads(benchmark) == threads
                && BestNanoseconds(summary, benchmark) is double best)
            {
                return new PeakBandwidth(threads, StreamingRead.BufferBytes / best, PeakSource.Benchmark);
            }
        }
        return new PeakBandwidth(threads, s_probes.GetOrAdd(threads, count => StreamingRead.Probe(count)), PeakSource.Probe);
    }

    public static IColumn[] Columns { get; } =
    [
        new RooflineColumn("TokensPerSecond", "Tokens/s", "Tokens processed per second: tokens per op / mean time",
            (summary, benchmark) => TokensPerSecond(summary, benchmark) is double value ? value.ToString("N1", CultureInfo.InvariantCulture) : null),
        new RooflineColumn("GBps", "GB/s", "Achieved bandwidth, 1e9 bytes/s: bytes an op streams (weights for decode/GEMV, the buffer for MemoryBandwidth) / mean time",
            (summary, benchmark) => GigabytesPerSecond(summary, benchmark) is double value ? value.ToString("N2", CultureInfo.InvariantCulture) : null),
        new RooflineColumn("PeakGBps", "Peak GB/s", "Measured streaming read bandwidth at the row's thread count: MemoryBandwidthBenchmark's fastest iteration in the same summary, else '(probe)': best of 5 passes of the same code in-process",
            (summary, benchmark) => BytesPerOperation(benchmark) > 0 && !OnGpu(benchmark) && MeanNanoseconds(summary, benchmark) is not null
                ? Peak(summary, Threads(benchmark)) is var peak && peak.Source == PeakSource.Probe
                    ? peak.GigabytesPerSecond.ToString("N2", CultureInfo.InvariantCulture) + " (probe)"
                    : peak.GigabytesPerSecond.ToString("N2", CultureInfo.InvariantCulture)
                : null),
        new RooflineColumn("PercentOfPeak", "% of peak", "GB/s as a percentage of Peak GB/s (above 100%: the working set is served from cache, not DRAM: the 10 MB embedded model fits in L3)",
            (summary, benchmark) => GigabytesPerSecond(summary, benchmark) is double value && !OnGpu(benchmark)
                ? (100 * value / Peak(summary, Threads(benchmark)).GigabytesPerSecond).ToString("N0", CultureInfo.InvariantCulture) + "%"
                : null),
        new RooflineColumn("DecodeShare", "% of decode", "vocab_stats: mean time / the mean 1-thread decode step of the embedded model (DecodeBenchmark, same summary)",
            (summary, benchmark) => ShareOfDecodeStep(summary, benchmark) is double share ? (100 * share).ToString("N2", CultureInfo.InvariantCulture) + "%" : null),
    ];
}

/// <summary>A summary column computed from a case's result; "-" where it does not apply, hidden in tables
/// where it applies to no case.</summary>
public sealed class RooflineColumn(string id, string name, string legend, Func<Summary, BenchmarkCase, string?> value) : IColumn
{
    public string Id => id;
    public string ColumnName => name;
    public string Legend => legend;
    public bool AlwaysShow => false;
    public ColumnCategory Category => ColumnCategory.Custom;
    public int PriorityInCategory => 0;
    public bool IsNumeric => false;
    public UnitType UnitType => UnitType.Dimensionless;

    public string GetValue(Summary summary, BenchmarkCase benchmarkCase) => value(summary, benchmarkCase) ?? "-";

    public string GetValue(Summary summary, BenchmarkCase benchmarkCase, SummaryStyle style) => GetValue(summary, benchmarkCase);

    public bool IsDefault(Summary summary, BenchmarkCase benchmarkCase) => false;

    public bool IsAvailable(Summary summary) => summary.BenchmarksCases.Any(benchmark => value(summary, benchmark) is not null);

    public override string ToString() => ColumnName;
}
