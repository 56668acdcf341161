using System.Diagnostics;
using KernelLM.Cli;
using KernelLM.Runtime.Cuda.Driver;

namespace KernelLM.Tests.Cuda;

/// <summary>`kernellm doctor` reports what it finds and exits 0, with or without a GPU or NVRTC.</summary>
[TestFixture]
public sealed class DoctorTests
{
    [Test]
    public void Doctor_reports_libraries_driver_devices_and_nvrtc_and_exits_0()
    {
        using var output = new StringWriter();
        using var errors = new StringWriter();
        int exitCode = Program.BuildCommand(output, errors).Parse(["doctor"]).Invoke();
        string report = output.ToString();
        TestContext.Out.WriteLine(report);
        Assert.That(exitCode, Is.Zero, errors.ToString());
        Assert.That(report, Does.Contain("libraries\n").And.Contain("driver\n").And.Contain("devices\n").And.Contain("nvrtc\n").And.Contain("cublas\n"));
        Assert.That(report, Does.Not.Contain("error:"), "no section failed");
        var status = CudaDriverStatus.Current;
        if (status.Devices.Count == 0)
        {
            Assert.That(report, Does.Contain($"  {status.Problem}\n"));
            Assert.That(report, Does.Contain("no CUDA device"));
        }
        else
        {
            Assert.That(report, Does.Contain($"GPU 0: {status.Devices[0].Name}"));
        }
        if (NvrtcCompiler.IsAvailable)
        {
            Assert.That(report, Does.Contain($"NVRTC {NvrtcCompiler.Info.Version}").And.Contain("sm_80").And.Contain("compile check: ok"));
        }
    }

    [Test]
    public void Doctor_without_libcuda_or_nvrtc_still_reports_and_exits_0()
    {
        // Library probes are once per process: run doctor in a child process with both libraries pointed nowhere.
        string cli = Path.Combine(AppContext.BaseDirectory, "kernellm.dll");
        Assert.That(File.Exists(cli), Is.True, cli);
        var start = new ProcessStartInfo("dotnet", [cli, "doctor"]) { RedirectStandardOutput = true, RedirectStandardError = true };
        start.Environment["KERNELLM_LIBCUDA"] = "/nonexistent/libcuda.so.1";
        start.Environment["KERNELLM_LIBNVRTC"] = "/nonexistent/libnvrtc.so";
        using var process = Process.Start(start)!;
        var output = process.StandardOutput.ReadToEndAsync();
        var errors = process.StandardError.ReadToEndAsync();
        Assert.That(process.WaitForExit(TimeSpan.FromMinutes(1)), Is.True);
        TestContext.Out.WriteLine(output.Result);
        Assert.That(process.ExitCode, Is.Zero, errors.Result);
        Assert.That(errors.Result, Is.Empty);
        Assert.That(output.Result, Does.Contain("no CUDA device: the CUDA driver library is not installed (libcuda not found: tried /nonexistent/libcuda.so.1"));
        Assert.That(output.Result, Does.Contain("NVRTC not found: install it"));
    }
}
