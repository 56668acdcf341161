using BenchmarkDotNet.Running;

namespace KernelLM.Bench;

/// <summary>
/// `--race` runs the CPU race against llama.cpp (<see cref="CpuRaceBenchmark"/>, a plain timed runner); anything
/// else goes to BenchmarkDotNet's switcher over this assembly's suites.
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
        var summaries = BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args).ToList();
        return summaries.Any(summary => summary.HasCriticalValidationErrors || summary.Reports.Any(report => !report.Success)) ? 1 : 0;
    }
}
