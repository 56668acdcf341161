using System.Text.Json;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;
using KernelLM.Runtime.Cuda.Emulator;
using KernelLM.Tests.Cuda;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.DeviceCheck;

/// <summary>
/// The device report of tools/device-check.sh: per-kernel GB/s against the device's measured
/// device-to-device copy, as report.json (and report.txt); for vocab_stats also its share of a batch-1 decode step
/// of the Llama-3.2-1B / Llama-3.1-8B shapes, each step taken at the measured copy bandwidth. In CI it is produced on the emulated device at a tiny size, which
/// checks the report path end to end; on the GPU machine the script sets KERNELLM_REPORT_DIR and the real
/// device is measured at full size.
/// </summary>
[TestFixture]
public sealed class DeviceReportTests
{
    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    /// <summary>Bytes a bf16 decode step must read at batch 1: Llama-3.2-1B, 1,235,814,400 parameters, all of them (the
    /// LM head is the tied embedding); Llama-3.1-8B, 8,030,261,248 parameters less the 525,336,576 of the untied
    /// embedding, of which a step reads one row.</summary>
    private const long Llama1BDecodeBytes = 1_235_814_400L * 2;
    private const long Llama8BDecodeBytes = (8_030_261_248L - 525_336_576L) * 2;

    public static void Write(string directory, CudaDevice device, int elements, long copyBytes)
    {
        double copy = KernelBandwidth.CopyGigabytesPerSecond(device, copyBytes);
        var kernels = KernelBandwidth.Measure(device, elements);
        // vocab_stats against a whole decode step, each step taken at the copy's bandwidth (its roofline): the L2 rows
        // are the decode case (the LM head has just written the logits).
        double step1B = Llama1BDecodeBytes / (copy * 1e3);
        double step8B = Llama8BDecodeBytes / (copy * 1e3);
        var vocabShares = kernels.Where(k => k.Kernel.StartsWith("vocab_stats_", StringComparison.Ordinal) && k.Kernel.EndsWith(" L2", StringComparison.Ordinal))
            .Select(k => new
            {
                kernel = k.Kernel,
                shape = k.Shape,
                microseconds = k.SecondsPerLaunch * 1e6,
                decode_step_1b_microseconds = step1B,
                share_of_1b_step = k.SecondsPerLaunch * 1e6 / step1B,
                decode_step_8b_microseconds = step8B,
                share_of_8b_step = k.SecondsPerLaunch * 1e6 / step8B,
            }).ToArray();
        var report = new
        {
            device = device.Name,
            emulated = device.Backend.IsEmulated,
            compute_capability = device.Backend.ComputeCapability,
            total_memory_bytes = device.Backend.TotalMemoryBytes,
            driver = CudaDriverStatus.Current.Problem ?? $"CUDA driver {CudaDriverStatus.Current.DriverVersion}",
            measured_copy_gbps = copy,
            kernels = kernels.Select(k => new
            {
                kernel = k.Kernel,
                shape = k.Shape,
                bytes_per_launch = k.BytesPerLaunch,
                microseconds = k.SecondsPerLaunch * 1e6,
                gbps = k.GigabytesPerSecond,
                fraction_of_copy = k.GigabytesPerSecond / copy,
            }),
            vocab_stats_share_of_decode_step = vocabShares,
        };
        Directory.CreateDirectory(directory);
        File.WriteAllText(Path.Combine(directory, "report.json"), JsonSerializer.Serialize(report, Indented));
        // The same figures as text: tools/device-check.sh appends report.txt to its summary.
        var lines = new List<string>();
        foreach (var kernel in kernels)
        {
            lines.Add($"{kernel.Kernel,-22} {kernel.Shape,-14} {kernel.GigabytesPerSecond,10:F2} GB/s ({kernel.GigabytesPerSecond / copy:P0} of copy {copy:F1} GB/s)");
        }
        foreach (var share in vocabShares)
        {
            lines.Add($"{share.kernel,-22} {share.shape,-14} {share.microseconds,8:F1} us = {share.share_of_1b_step:P2} of a 1B bf16 decode step "
                + $"({step1B:F0} us at copy speed), {share.share_of_8b_step:P2} of an 8B one ({step8B:F0} us)");
        }
        File.WriteAllLines(Path.Combine(directory, "report.txt"), lines);
        foreach (string line in lines)
        {
            TestContext.Out.WriteLine(line);
        }
    }

    [Test]
    public void Report_on_the_emulated_device_is_complete_json()
    {
        string directory = TestPaths.NewTemporaryDirectory("report");
        try
        {
            using (var device = new CudaDevice(new EmulatorBackend()))
            {
                Write(directory, device, elements: 8192, copyBytes: 1 << 16);
            }
            using var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(directory, "report.json")));
            var root = json.RootElement;
            Assert.That(root.GetProperty("emulated").GetBoolean(), Is.True);
            Assert.That(File.ReadAllText(Path.Combine(directory, "report.txt")), Does.Contain("of a 1B bf16 decode step"));
            Assert.That(root.GetProperty("measured_copy_gbps").GetDouble(), Is.GreaterThan(0));
            var names = root.GetProperty("kernels").EnumerateArray().Select(k => k.GetProperty("kernel").GetString()).ToArray();
            Assert.That(names, Does.Contain("rms_norm_bf16").And.Contain("add_f32").And.Contain("argmax_bf16"));
            var vocab = root.GetProperty("kernels").EnumerateArray().Where(k => k.GetProperty("kernel").GetString()!.StartsWith("vocab_stats_", StringComparison.Ordinal))
                .Select(k => $"{k.GetProperty("kernel").GetString()} {k.GetProperty("shape").GetString()}").ToArray();
            Assert.That(vocab, Is.EquivalentTo(new[] { "f32 L2", "f32 HBM", "bf16 L2", "bf16 HBM" }
                .SelectMany(kind => new[] { $"vocab_stats_{kind} [1, 1024]", $"vocab_stats_{kind} [8, 1024]" })), "batch 1 and 8, both dtypes, both kinds");
            Assert.That(root.GetProperty("vocab_stats_share_of_decode_step").GetArrayLength(), Is.EqualTo(4));
            Assert.That(root.GetProperty("vocab_stats_share_of_decode_step").EnumerateArray().All(k => k.GetProperty("share_of_8b_step").GetDouble() > 0), Is.True);
            Assert.That(root.GetProperty("kernels").EnumerateArray().All(k => k.GetProperty("gbps").GetDouble() > 0), Is.True);
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    [Test]
    public void Report_on_the_gpu()
    {
        string? directory = Environment.GetEnvironmentVariable("KERNELLM_REPORT_DIR");
        if (string.IsNullOrEmpty(directory))
        {
            Assert.Ignore("runs only in tools/device-check.sh (KERNELLM_REPORT_DIR names the output folder)");
        }
        CudaTestSupport.RequireDevice();
        using var device = new CudaDevice(new DriverBackend());
        // 64M elements: 256 MB per f32 tensor, far beyond the L2, so the figures are HBM figures.
        Write(directory, device, elements: 64 << 20, copyBytes: 1L << 30);
    }
}
