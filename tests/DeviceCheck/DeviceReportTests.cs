using System.Text.Json;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;
using KernelLM.Runtime.Cuda.Emulator;
using KernelLM.Tests.Cuda;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.DeviceCheck;

/// <summary>
/// The device report of tools/device-check.sh: per-kernel GB/s against the device's measured
/// device-to-device copy, as report.json. In CI it is produced on the emulated device at a tiny size, which
/// checks the report path end to end; on the GPU machine the script sets KERNELLM_REPORT_DIR and the real
/// device is measured at full size.
/// </summary>
[TestFixture]
public sealed class DeviceReportTests
{
    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    public static void Write(string directory, CudaDevice device, int elements, long copyBytes)
    {
        double copy = KernelBandwidth.CopyGigabytesPerSecond(device, copyBytes);
        var kernels = KernelBandwidth.Measure(device, elements);
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
        };
        Directory.CreateDirectory(directory);
        File.WriteAllText(Path.Combine(directory, "report.json"), JsonSerializer.Serialize(report, Indented));
        foreach (var kernel in kernels)
        {
            TestContext.Out.WriteLine($"{kernel.Kernel,-22} {kernel.Shape,-14} {kernel.GigabytesPerSecond,10:F2} GB/s ({kernel.GigabytesPerSecond / copy:P0} of copy {copy:F1} GB/s)");
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
            Assert.That(root.GetProperty("measured_copy_gbps").GetDouble(), Is.GreaterThan(0));
            var names = root.GetProperty("kernels").EnumerateArray().Select(k => k.GetProperty("kernel").GetString()).ToArray();
            Assert.That(names, Does.Contain("rms_norm_bf16").And.Contain("add_f32").And.Contain("argmax_bf16"));
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
