using System.CommandLine;
using System.Globalization;
using KernelLM.Native;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;

namespace KernelLM.Cli;

/// <summary>
/// `kernellm doctor`: which CUDA libraries this process finds (paths, versions), what the driver says (each
/// GPU, or why there is none), what NVRTC compiles for, and where compiled kernels are cached. Every
/// section reports its own failure and the next one still runs; the exit code is 0 whenever the report
/// could be printed, with or without a GPU.
/// </summary>
public static class DoctorCommand
{
    // The smallest kernel that exercises NVRTC end to end, including its builtins library and common.cuh.
    private const string ProbeKernel = """
        #include "common.cuh"
        extern "C" __global__ void doctor_probe_f32(const float* x, float* y) {
            __shared__ float scratch[32];
            float sum = block_reduce_sum(x[threadIdx.x], scratch);
            if (threadIdx.x == 0) { y[0] = sum; }
        }
        """;

    public static Command Create(TextWriter output)
    {
        var command = new Command("doctor", "Report the CUDA libraries, driver, GPUs and NVRTC this machine offers (exit code 0 with or without a GPU).");
        command.SetAction(_ =>
        {
            Report(output);
            return 0;
        });
        return command;
    }

    public static void Report(TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(output);
        Section(output, "libraries", () =>
        {
            foreach (string library in new[] { NativeLibraries.Cuda, NativeLibraries.Nvrtc, NativeLibraries.CublasLt, NativeLibraries.Cublas })
            {
                output.WriteLine($"  {NativeLibraries.Load(library).Describe()}");
                if (library == NativeLibraries.Nvrtc && NativeLibraries.NvrtcBuiltinsProbe is { } builtins)
                {
                    output.WriteLine($"  {builtins.Describe()}");
                }
            }
        });

        var driver = CudaDriverStatus.Current;
        Section(output, "driver", () =>
        {
            if (!driver.Library.Found)
            {
                output.WriteLine("  libcuda not found");
            }
            else
            {
                output.WriteLine($"  CUDA driver API {driver.DriverVersionText} (cuDriverGetVersion {driver.DriverVersion})");
                output.WriteLine($"  cuInit(0): {(driver.InitResult is { } init ? Check.Name(init) : "not called")}");
            }
        });

        Section(output, "devices", () =>
        {
            if (driver.Problem is not null)
            {
                output.WriteLine($"  {driver.Problem}");
                return;
            }
            foreach (var device in driver.Devices)
            {
                output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"  GPU {device.Ordinal}: {device.Name}, compute capability {device.ComputeCapability / 10}.{device.ComputeCapability % 10} ({device.Arch}), " +
                    $"{device.TotalMemoryBytes / (double)(1L << 30):F1} GiB, {device.Multiprocessors} SMs, L2 {device.L2CacheBytes >> 20} MiB, " +
                    $"{device.MaxSharedMemoryPerBlockOptIn >> 10} KiB shared memory per block (opt-in)"));
            }
        });

        Section(output, "nvrtc", () =>
        {
            if (!NvrtcCompiler.IsAvailable)
            {
                output.WriteLine($"  NVRTC not found: {NvrtcCompiler.InstallHint}");
                return;
            }
            var nvrtc = NvrtcCompiler.Info;
            output.WriteLine($"  NVRTC {nvrtc.Version} ({nvrtc.Identity}), compiles for: {string.Join(", ", nvrtc.SupportedArchs.Select(arch => $"sm_{arch}"))}");
            foreach (var device in driver.Devices)
            {
                output.WriteLine($"  GPU {device.Ordinal} ({device.Arch}): kernels compile as {Target(device.ComputeCapability)}");
            }
            string arch = driver.Devices.Count > 0 ? NvrtcCompiler.TargetFor(driver.Devices[0].ComputeCapability)
                : nvrtc.SupportedArchs.Contains(80) ? "sm_80" : $"compute_{nvrtc.SupportedArchs.Max()}";
            var compiled = NvrtcCompiler.Compile(new KernelSource("doctor_probe.cu", ProbeKernel, KernelSources.Headers), arch);
            output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  compile check: ok ({arch}, {compiled.Image.Length} B {compiled.Kind}, {compiled.CompileTime.TotalSeconds:F2} s)"));
        });

        Section(output, "cublas", () =>
        {
            var cublas = CublasInfo.Query();
            output.WriteLine(cublas.Version is null ? "  cuBLAS: not found" : $"  cuBLAS {cublas.Version}");
            output.WriteLine(cublas.LtVersion is null ? "  cuBLASLt: not found" : $"  cuBLASLt {cublas.LtVersion}");
        });

        Section(output, "kernel cache", () =>
        {
            output.WriteLine($"  {Path.Combine(KernelCache.DefaultRoot, "nvrtc")} (KERNELLM_CACHE_DIR, else XDG_CACHE_HOME/kernellm, else ~/.cache/kernellm)");
            output.WriteLine($"  embedded kernel files: {(KernelSources.All.Count == 0 ? "none yet" : string.Join(", ", KernelSources.All.Select(source => source.FileName)))}");
        });
    }

    private static string Target(int computeCapability)
    {
        string target = NvrtcCompiler.TargetFor(computeCapability);
        return target.StartsWith("sm_", StringComparison.Ordinal) ? $"{target} (CUBIN)" : $"{target} (PTX, JIT-compiled by the driver)";
    }


    // A doctor that crashes is no doctor: each section prints its own failure and the report goes on.
    private static void Section(TextWriter output, string title, Action body)
    {
        output.WriteLine(title);
        try
        {
            body();
        }
#pragma warning disable CA1031 // any failure of a probe is part of the report, never a crash
        catch (Exception error)
#pragma warning restore CA1031
        {
            output.WriteLine($"  error: {error.GetType().Name}: {error.Message}");
        }
    }
}
