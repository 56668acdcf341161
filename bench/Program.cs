using System.Diagnostics;
using System.Globalization;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Diagnosers;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;

namespace KernelLM.Bench;

/// <summary>
/// KernelLM's benchmark suites (BenchmarkDotNet): decode and prefill on the embedded model, GEMV on
/// Llama-3.2-1B-shaped weights, the vocab_stats token signals on one row of logits (CPU twin; CUDA where there is a
/// GPU), and the machine's streaming read bandwidth (the roofline). Extra options on
/// top of BenchmarkDotNet's own (--filter, --job, --list, ...):
///   --quick            every selected suite with a tiny job (ShortRun, 1 warm-up + 3 iterations, 1 launch),
///                      all in one joined table (--join) so the GEMV/decode rows are set against the
///                      MemoryBandwidth rows of the same run: ~2 minutes for all suites on 2 cores.
///   --out-of-process   BenchmarkDotNet's default toolchain (generates and builds a child project per
///                      suite) instead of the in-process one used by default (see docs/benchmarks.md).
///   --race             the CPU race against llama.cpp (<see cref="CpuRaceBenchmark"/>, a plain timed runner
///                      in one process: both engines, same model, threads and prompt).
/// </summary>
public static class Program
{
    public static int Main(string[] args)
    {
        ArgumentNullException.ThrowIfNull(args);
        if (args.Contains("--race"))
        {
            return CpuRaceBenchmark.Run(args);
        }
        var arguments = new List<string>(args);
        bool quick = arguments.Remove("--quick");
        bool outOfProcess = arguments.Remove("--out-of-process");
        if (!outOfProcess && !arguments.Contains("--inProcess") && !arguments.Contains("-i"))
        {
            arguments.Add("--inProcess");
        }
        if (quick)
        {
            if (!arguments.Contains("--job") && !arguments.Contains("-j"))
            {
                arguments.AddRange(["--job", "short"]);
            }
            arguments.AddRange(["--warmupCount", "1", "--iterationCount", "3", "--launchCount", "1"]);
            if (!arguments.Contains("--join"))
            {
                arguments.Add("--join");
            }
        }

        var config = ManualConfig.Create(DefaultConfig.Instance)
            .AddColumn(Roofline.Columns)
            .AddDiagnoser(MemoryDiagnoser.Default);

        var clock = Stopwatch.StartNew();
        var summaries = BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run([.. arguments], config).ToList();
        clock.Stop();
        if (summaries.Count > 0)
        {
            PrintRoofline(summaries, clock.Elapsed);
        }
        return summaries.Any(summary => summary.HasCriticalValidationErrors || summary.Reports.Any(report => !report.Success)) ? 1 : 0;
    }

    /// <summary>One line per measured case with its throughput and its place under the measured peak: the
    /// MemoryBandwidthBenchmark result at the case's thread count from any summary of this run, else the probe.</summary>
    private static void PrintRoofline(IReadOnlyList<Summary> summaries, TimeSpan elapsed)
    {
        var peaks = new SortedDictionary<int, PeakBandwidth>();
        foreach (var summary in summaries)
        {
            foreach (var report in summary.Reports.Where(report => report.BenchmarkCase.Descriptor.Type == typeof(MemoryBandwidthBenchmark)))
            {
                int threads = Roofline.Threads(report.BenchmarkCase);
                if (Roofline.BestNanoseconds(summary, report.BenchmarkCase) is double best)
                {
                    peaks[threads] = new PeakBandwidth(threads, StreamingRead.BufferBytes / best, PeakSource.Benchmark);
                }
            }
        }
        var output = Console.Out;
        output.WriteLine();
        output.WriteLine("// * Roofline (KernelLM) *");
        foreach (var summary in summaries)
        {
            foreach (var report in summary.Reports)
            {
                var benchmark = report.BenchmarkCase;
                double? tokens = Roofline.TokensPerSecond(summary, benchmark);
                double? gigabytes = Roofline.GigabytesPerSecond(summary, benchmark);
                if (tokens is null && gigabytes is null)
                {
                    continue;
                }
                string line = $"{benchmark.Descriptor.Type.Name,-26} {benchmark.Parameters.DisplayInfo,-46}";
                if (tokens is double t)
                {
                    line += string.Create(CultureInfo.InvariantCulture, $" {t,9:N0} tokens/s");
                }
                if (gigabytes is double model && benchmark.Descriptor.Type == typeof(CudaModelBenchmark) && CudaModelBenchmark.CopyGigabytesPerSecond > 0)
                {
                    double copy = CudaModelBenchmark.CopyGigabytesPerSecond;
                    line += string.Create(CultureInfo.InvariantCulture,
                        $" {model,7:N2} GB/s of weights = {100 * model / copy,3:N0}% of the device's copy bandwidth ({copy:N1} GB/s, measured in the setup)");
                }
                else if (gigabytes is double gpu && Roofline.OnGpu(benchmark))
                {
                    line += string.Create(CultureInfo.InvariantCulture, $" {gpu,7:N2} GB/s on the GPU (its roofline: the device report of tools/device-check.sh)");
                }
                else if (gigabytes is double g)
                {
                    int threads = Roofline.Threads(benchmark);
                    if (!peaks.TryGetValue(threads, out var peak))
                    {
                        peak = peaks[threads] = Roofline.Peak(summary, threads);
                    }
                    line += string.Create(CultureInfo.InvariantCulture, $" {g,7:N2} GB/s = {100 * g / peak.GigabytesPerSecond,3:N0}% of the {threads}-thread peak");
                }
                if (Roofline.ShareOfDecodeStep(summary, benchmark) is double share)
                {
                    line += string.Create(CultureInfo.InvariantCulture, $", {100 * share:N2}% of an embedded-model decode step");
                }
                output.WriteLine(line);
            }
        }
        foreach (var peak in peaks.Values)
        {
            string source = peak.Source == PeakSource.Benchmark ? "MemoryBandwidthBenchmark, fastest iteration" : "in-process probe, best of 5 passes";
            output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"Measured peak streaming read bandwidth, {peak.Threads} thread(s): {peak.GigabytesPerSecond:N2} GB/s ({source}; 256 MiB fp32 TensorPrimitives.Sum)"));
        }
        output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"Benchmark run took {elapsed.TotalSeconds:N0} s (wall clock of BenchmarkSwitcher.Run)."));
    }
}
