using System.Diagnostics;
using KernelLM.Runtime.Cuda.Ops;

namespace KernelLM.Runtime.Cuda;

/// <summary>One kernel's measured throughput: bytes it must move per launch over the time per launch.</summary>
public sealed record KernelThroughput(string Kernel, string Shape, long BytesPerLaunch, double SecondsPerLaunch)
{
    public double GigabytesPerSecond => BytesPerLaunch / SecondsPerLaunch / 1e9;
}

/// <summary>
/// Bandwidth of the memory-bound kernels against the device's measured device-to-device copy (the roofline of
/// an element-wise kernel: a copy reads and writes every byte once). Each figure is the best of
/// <c>repeats</c> timed batches of <c>launches</c> launches, synchronised at the batch ends, so launch overhead
/// is amortised. Bytes are what the kernel must read plus write (e.g. add: 2 reads + 1 write per element).
/// </summary>
public static class KernelBandwidth
{
    public static double CopyGigabytesPerSecond(CudaDevice device, long bytes, int launches = 20, int repeats = 3)
    {
        using var source = device.Allocate("copy_source", DType.F32, checked((int)(bytes / 4)));
        using var destination = device.Allocate("copy_destination", DType.F32, checked((int)(bytes / 4)));
        double seconds = Best(device, launches, repeats, () => device.Backend.CopyDeviceToDevice(destination.Address, source.Address, source.ByteLength, 0));
        // A copy reads and writes every byte.
        return 2.0 * source.ByteLength / seconds / 1e9;
    }

    /// <summary>Runs every op once per dtype on tensors of about <paramref name="elements"/> elements.</summary>
    public static IReadOnlyList<KernelThroughput> Measure(CudaDevice device, int elements, int launches = 20, int repeats = 3)
    {
        var results = new List<KernelThroughput>();
        int cols = 4096;
        int rows = Math.Max(1, elements / cols);
        int n = rows * cols;
        foreach (var dtype in new[] { DType.F32, DType.BF16 })
        {
            int size = dtype.SizeOf();
            string suffix = dtype == DType.F32 ? "f32" : "bf16";
            using var x = device.Allocate("x", dtype, rows, cols);
            using var y = device.Allocate("y", dtype, rows, cols);
            using var weight = device.Allocate("weight", DType.F32, cols);
            using var wide = device.Allocate("wide", DType.F32, rows, cols);
            device.Backend.Memset(x.Address, 0, x.ByteLength, 0);
            device.Backend.Memset(y.Address, 0, y.ByteLength, 0);
            device.Backend.Memset(weight.Address, 0, weight.ByteLength, 0);
            string shape = $"[{rows}, {cols}]";
            results.Add(new($"rms_norm_{suffix}", shape, 2L * n * size + cols * 4L,
                Best(device, launches, repeats, () => CudaOps.RmsNorm(device, x, weight, 1e-5f, y))));
            results.Add(new($"add_{suffix}", shape, 3L * n * size, Best(device, launches, repeats, () => CudaOps.Add(device, y, x))));
            results.Add(new($"silu_mul_{suffix}", shape, 3L * n * size, Best(device, launches, repeats, () => CudaOps.SiluMultiply(device, y, x))));
            if (dtype != DType.F32)
            {
                results.Add(new($"convert_{suffix}_f32", shape, (long)n * (size + 4), Best(device, launches, repeats, () => CudaOps.Convert(device, x, wide))));
            }
            using var indices = device.Allocate("argmax", DType.I32, rows);
            results.Add(new($"argmax_{suffix}", shape, (long)n * size + rows * 4L, Best(device, launches, repeats, () => CudaOps.Argmax(device, x, cols, indices))));
        }
        return results;
    }

    private static double Best(CudaDevice device, int launches, int repeats, Action launch)
    {
        launch();
        device.Synchronize();
        double best = double.MaxValue;
        for (int repeat = 0; repeat < repeats; repeat++)
        {
            var clock = Stopwatch.StartNew();
            for (int i = 0; i < launches; i++)
            {
                launch();
            }
            device.Synchronize();
            best = Math.Min(best, clock.Elapsed.TotalSeconds / launches);
        }
        return best;
    }
}
