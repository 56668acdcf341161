using System.Diagnostics;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Emulator;

namespace KernelLM.Tests.Cuda.Emulator;

/// <summary>
/// The numbers quoted in docs/emulator.md ("Speed"): run by hand with
/// <c>dotnet test tests/KernelLM.Tests.csproj --filter "FullyQualifiedName~EmulatorSpeed"</c>.
/// </summary>
[TestFixture]
[Explicit("measurement for docs/emulator.md, not a check")]
public sealed class EmulatorSpeed
{
    private const string Kernels = """
        #include "common.cuh"

        extern "C" __global__ void nothing() {}

        extern "C" __global__ void vector_add(const float* a, const float* b, float* c, int n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) {
                c[i] = a[i] + b[i];
            }
        }

        extern "C" __global__ void row_sum(const float* x, float* sums, int cols) {
            __shared__ float scratch[32];
            float sum = 0.0f;
            for (int c = threadIdx.x; c < cols; c += blockDim.x) {
                sum += x[(size_t)blockIdx.x * cols + c];
            }
            sum = block_reduce_sum(sum, scratch);
            if (threadIdx.x == 0) {
                sums[blockIdx.x] = sum;
            }
        }

        extern "C" __global__ void warp_sums(const float* x, float* sums) {
            float v = warp_reduce_sum(x[blockIdx.x * blockDim.x + threadIdx.x]);
            if (threadIdx.x % 32 == 0) {
                sums[(blockIdx.x * blockDim.x + threadIdx.x) / 32] = v;
            }
        }
        """;

    [Test]
    public void Measure()
    {
        var watch = Stopwatch.StartNew();
        using var device = new EmulatorBackend(EmulatorTestSupport.Options);
        TestContext.Out.WriteLine($"backend (runtime from cache or compiled): {watch.ElapsedMilliseconds} ms");
        watch.Restart();
        string unique = $"// {Guid.NewGuid()}\n";
        using var module = (EmulatorModule)device.LoadModule(EmulatorTestSupport.Source("speed.cu", unique + Kernels));
        TestContext.Out.WriteLine($"compile a 4-kernel file: {watch.ElapsedMilliseconds} ms");
        watch.Restart();
        using (device.LoadModule(EmulatorTestSupport.Source("speed.cu", unique + Kernels)))
        {
            TestContext.Out.WriteLine($"load it again from the cache: {watch.Elapsed.TotalMilliseconds:F1} ms");
        }
        File.Delete(module.LibraryPath);

        Rate(device, module, "nothing", new Dim3(1), new Dim3(1), 2000);
        Rate(device, module, "nothing", new Dim3(1), new Dim3(256), 500);

        const int n = 1 << 20;
        using var a = DeviceBuffer.Of<float>(device, n);
        using var b = DeviceBuffer.Of<float>(device, n);
        using var c = DeviceBuffer.Of<float>(device, n);
        device.Memset(a.Address, 0, n * 4L, 0);
        device.Memset(b.Address, 0, n * 4L, 0);
        for (int round = 0; round < 3; round++)
        {
            watch.Restart();
            device.Run(module, "vector_add", new Dim3(n / 256), new Dim3(256), 0, a, b, c, n);
            TestContext.Out.WriteLine($"vector_add of 1M floats (4096 blocks of 256): {watch.ElapsedMilliseconds} ms");
        }

        const int rows = 16, cols = 4096;
        using var sums = DeviceBuffer.Of<float>(device, rows * 8);
        watch.Restart();
        device.Run(module, "row_sum", new Dim3(rows), new Dim3(256), 0, a, sums, cols);
        TestContext.Out.WriteLine($"row_sum (block_reduce_sum) of {rows} x {cols}, 256 threads: " +
                                  $"{watch.Elapsed.TotalMilliseconds / rows:F1} ms per block");
        watch.Restart();
        device.Run(module, "warp_sums", new Dim3(4), new Dim3(256), 0, a, sums);
        TestContext.Out.WriteLine($"warp_reduce_sum, 4 blocks of 256: {watch.Elapsed.TotalMilliseconds / 32:F2} ms per warp reduction (5 shuffles)");
        TestContext.Out.WriteLine($"runtime threads created: {device.RuntimeThreads}");
    }

    private static void Rate(EmulatorBackend device, IKernelModule module, string kernel, Dim3 grid, Dim3 block, int launches)
    {
        device.Run(module, kernel, grid, block, 0);
        var watch = Stopwatch.StartNew();
        for (int i = 0; i < launches; i++)
        {
            device.Run(module, kernel, grid, block, 0);
        }
        double seconds = watch.Elapsed.TotalSeconds;
        TestContext.Out.WriteLine($"{kernel} {grid} x {block}: {launches / seconds:F0} launches/s ({seconds * 1e6 / launches:F1} us each)");
    }
}
