using System.Runtime.InteropServices;
using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Cuda;

/// <summary>
/// The driver backend on a real GPU: memory, copies, launches, dynamic shared memory, modules through the
/// cache, streams, and ownership (counted allocations, leaks freed at Dispose). Ignored, never passed, where
/// there is no GPU: these are part of the GPU machine's device check.
/// </summary>
[TestFixture]
public sealed unsafe class DriverBackendDeviceTests
{
    private string _cacheDirectory = "";
    private DriverBackend _backend = null!;
    private int _liveBefore;

    [OneTimeSetUp]
    public void OpenDevice()
    {
        CudaTestSupport.RequireDevice();
        CudaTestSupport.RequireNvrtc();
        _cacheDirectory = TestPaths.NewTemporaryDirectory("driver-cache");
        _backend = new DriverBackend(0, new KernelCache(_cacheDirectory));
        TestContext.Out.WriteLine($"{_backend} (kernels compile as {_backend.Target})");
    }

    [OneTimeTearDown]
    public void CloseDevice()
    {
        _backend?.Dispose();
        if (_cacheDirectory.Length > 0)
        {
            Directory.Delete(_cacheDirectory, recursive: true);
        }
    }

    [SetUp]
    public void CountAllocations() => _liveBefore = DeviceMemoryCounters.LiveCount;

    [TearDown]
    public void NothingLeaked() => Assert.That(DeviceMemoryCounters.LiveCount, Is.EqualTo(_liveBefore), "device allocations freed");

    [Test]
    public void Copies_round_trip_through_device_memory_with_odd_sizes()
    {
        const int bytes = 1_000_003;
        byte[] source = new byte[bytes];
        new Random(7).NextBytes(source);
        ulong first = _backend.Allocate(bytes);
        ulong second = _backend.Allocate(bytes);
        try
        {
            Assert.That(DeviceMemoryCounters.LiveCount, Is.EqualTo(_liveBefore + 2));
            _backend.CopyHostToDevice(first, source, 0);
            _backend.CopyDeviceToDevice(second, first, bytes, 0);
            _backend.Memset(second + 11, 0xAB, 1001, 0);
            byte[] back = new byte[bytes];
            _backend.CopyDeviceToHost(back, second, 0);
            byte[] expected = (byte[])source.Clone();
            expected.AsSpan(11, 1001).Fill(0xAB);
            Assert.That(back, Is.EqualTo(expected));
        }
        finally
        {
            _backend.Free(first);
            _backend.Free(second);
        }
        Assert.That(() => _backend.Free(first), Throws.TypeOf<CudaException>().With.Message.Contains("not a live allocation"));
    }

    [Test]
    public void Kernels_launch_on_a_stream_and_match_the_cpu()
    {
        using var module = _backend.LoadModule(CudaTestSupport.TestKernels);
        nint stream = _backend.CreateStream();
        const int rows = 19, cols = 1111;
        float[] x = new float[rows * cols];
        var random = new Random(3);
        for (int i = 0; i < x.Length; i++)
        {
            x[i] = (float)(random.NextDouble() * 2 - 1);
        }
        ulong input = _backend.Allocate(x.Length * sizeof(float));
        ulong sums = _backend.Allocate(rows * sizeof(float));
        ulong rounded = _backend.Allocate(x.Length * sizeof(ushort));
        ulong scaled = _backend.Allocate(x.Length * sizeof(float));
        try
        {
            _backend.CopyHostToDevice(input, MemoryMarshal.AsBytes(x.AsSpan()), stream);

            int columns = cols;
            nint* rowSumArguments = stackalloc nint[] { (nint)(&input), (nint)(&sums), (nint)(&columns) };
            _backend.Launch(module.GetFunction("row_sum_f32"), new Dim3(rows), new Dim3(256), 0, stream, new ReadOnlySpan<nint>(rowSumArguments, 3));

            int count = x.Length;
            float scale = -3f;
            nint* roundArguments = stackalloc nint[] { (nint)(&input), (nint)(&rounded), (nint)(&count) };
            _backend.Launch(module.GetFunction("round_f32_bf16"), new Dim3((count + 255) / 256), new Dim3(256), 0, stream, new ReadOnlySpan<nint>(roundArguments, 3));
            nint* scaleArguments = stackalloc nint[] { (nint)(&rounded), (nint)(&scaled), (nint)(&scale), (nint)(&count) };
            _backend.Launch(module.GetFunction("scale_bf16_f32"), new Dim3((count + 255) / 256), new Dim3(256), 0, stream, new ReadOnlySpan<nint>(scaleArguments, 4));

            float[] gpuSums = new float[rows];
            float[] gpuScaled = new float[x.Length];
            _backend.CopyDeviceToHost(MemoryMarshal.AsBytes(gpuSums.AsSpan()), sums, stream);
            _backend.CopyDeviceToHost(MemoryMarshal.AsBytes(gpuScaled.AsSpan()), scaled, stream);
            _backend.Synchronize(stream);

            for (int r = 0; r < rows; r++)
            {
                double expected = 0;
                for (int c = 0; c < cols; c++)
                {
                    expected += x[r * cols + c];
                }
                // fp32 accumulation of 1111 terms in [-1, 1]: |error| <= cols * eps32 * sum|x| ~ 1111 * 6e-8 * 1111.
                Assert.That(gpuSums[r], Is.EqualTo(expected).Within(cols * cols * 6e-8), $"row_sum_f32(rows={rows}, cols={cols}) row {r}");
            }
            for (int i = 0; i < x.Length; i++)
            {
                float expected = scale * BFloat16.ToSingle(BFloat16.FromSingle(x[i]));
                Assert.That(gpuScaled[i], Is.EqualTo(expected), $"bf16 round trip and scale, element {i}: exact");
            }
        }
        finally
        {
            _backend.Free(input);
            _backend.Free(sums);
            _backend.Free(rounded);
            _backend.Free(scaled);
            _backend.DestroyStream(stream);
        }
    }

    [Test]
    public void Dynamic_shared_memory_above_48_KiB_is_opted_into()
    {
        using var module = _backend.LoadModule(CudaTestSupport.TestKernels);
        const int threads = 256, copies = 96;    // 96 KiB of dynamic shared memory per block
        float[] x = Enumerable.Range(0, threads * 3).Select(i => (float)i).ToArray();
        ulong input = _backend.Allocate(x.Length * sizeof(float));
        ulong output = _backend.Allocate(x.Length * sizeof(float));
        try
        {
            _backend.CopyHostToDevice(input, MemoryMarshal.AsBytes(x.AsSpan()), 0);
            int copyCount = copies;
            nint* arguments = stackalloc nint[] { (nint)(&input), (nint)(&output), (nint)(&copyCount) };
            _backend.Launch(module.GetFunction("shared_echo_f32"), new Dim3(3), new Dim3(threads), threads * copies * sizeof(float), 0, new ReadOnlySpan<nint>(arguments, 3));
            float[] back = new float[x.Length];
            _backend.CopyDeviceToHost(MemoryMarshal.AsBytes(back.AsSpan()), output, 0);
            Assert.That(back, Is.EqualTo(x));
        }
        finally
        {
            _backend.Free(input);
            _backend.Free(output);
        }
    }

    [Test]
    public void Modules_come_from_the_cache_the_second_time_and_name_missing_functions()
    {
        using (var first = _backend.LoadModule(CudaTestSupport.TestKernels))
        {
            Assert.That(first.GetFunction("row_sum_f32"), Is.Not.Zero);
        }
        long hits = _backend.Cache.Hits;
        using var second = _backend.LoadModule(CudaTestSupport.TestKernels);
        Assert.That(_backend.Cache.Hits, Is.EqualTo(hits + 1));
        var error = Assert.Throws<CudaException>(() => second.GetFunction("no_such_kernel"))!;
        Assert.That(error.Message, Does.Contain("test_kernels.cu").And.Contain("no_such_kernel").And.Contain("row_sum_f32"));
    }

    [Test]
    public void Bad_launches_name_the_kernel()
    {
        using var module = _backend.LoadModule(CudaTestSupport.TestKernels);
        nint function = module.GetFunction("row_sum_f32");
        ulong buffer = _backend.Allocate(4096);
        try
        {
            int columns = 1;
            nint* arguments = stackalloc nint[] { (nint)(&buffer), (nint)(&buffer), (nint)(&columns) };
            // 4096 threads per block: over every device's limit of 1024.
            var error = Assert.Throws<CudaException>(() => _backend.Launch(function, new Dim3(1), new Dim3(4096), 0, 0, new ReadOnlySpan<nint>(arguments, 3)))!;
            Assert.That(error.Message, Does.Contain("row_sum_f32 (test_kernels.cu)").And.Contain("block (4096, 1, 1)"));
        }
        finally
        {
            _backend.Free(buffer);
        }
    }

    [Test]
    public void Disposing_a_backend_frees_what_was_left_and_counts_it_as_leaked()
    {
        int leakedBefore = DeviceMemoryCounters.LeakedCount;
        using (var backend = new DriverBackend(0, _backend.Cache))
        {
            backend.Allocate(4096);
            backend.CreateStream();
            Assert.That(DeviceMemoryCounters.LiveCount, Is.EqualTo(_liveBefore + 1));
        }
        Assert.That(DeviceMemoryCounters.LeakedCount, Is.EqualTo(leakedBefore + 1));
        var (free, total) = _backend.MemoryInfo();
        Assert.That(free, Is.GreaterThan(0).And.LessThanOrEqualTo(total), "the shared primary context is still usable");
    }
}
