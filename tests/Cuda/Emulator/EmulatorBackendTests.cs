using System.Diagnostics;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Emulator;

namespace KernelLM.Tests.Cuda.Emulator;

/// <summary>
/// The emulated device as a driver: compilation (errors with the g++ log and the file name, the disk
/// cache), the memory budget and allocation bookkeeping, copies checked against allocations, streams,
/// and the validation of launches.
/// </summary>
[TestFixture]
public sealed class EmulatorBackendTests
{
    private const string Kernels = """
        #include "common.cuh"

        extern "C" __global__ void scale(float* y, float factor, int n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) {
                y[i] *= factor;
            }
        }

        extern "C" __global__ __launch_bounds__(128) void bounded(float* y) {
            y[threadIdx.x] = 1.0f;
        }

        extern "C" __global__ void write_from_block(float* y, int block) {
            if (blockIdx.x == block) {
                y[threadIdx.x] = (float)block;
            }
        }

        extern "C" __global__ void spin_until_set(volatile int* flag) {
            while (flag[0] == 0) {
            }
        }
        """;

    private EmulatorBackend _device = null!;
    private IKernelModule _module = null!;

    [OneTimeSetUp]
    public void SetUp()
    {
        _device = new EmulatorBackend(EmulatorTestSupport.Options);
        _module = _device.LoadModule(EmulatorTestSupport.Source("backend_tests.cu", Kernels));
    }

    [OneTimeTearDown]
    public void TearDown()
    {
        _module.Dispose();
        _device.Dispose();
    }

    [TearDown]
    public void EveryAllocationFreed() => Assert.That(_device.LiveAllocations, Is.Zero, "device allocations leaked by the test");

    [Test]
    public void Compile_error_carries_the_gxx_log_and_the_file_name()
    {
        const string broken = """
            #include "common.cuh"
            extern "C" __global__ void broken(float* y) {
                y[threadIdx.x] = undeclared_value;
            }
            """;
        var error = Assert.Throws<CudaException>(() => _device.LoadModule(EmulatorTestSupport.Source("broken.cu", broken)))!;
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.Compilation));
        Assert.That(error.FileName, Is.EqualTo("broken.cu"));
        Assert.That(error.CompilerLog, Does.Contain("broken.cu:3:").And.Contain("undeclared_value"));
        Assert.That(error.Message, Does.StartWith("broken.cu:").And.Contain("undeclared_value"));
    }

    [Test]
    public void Dynamic_shared_memory_must_go_through_KLM_DYNAMIC_SHARED()
    {
        const string source = """
            extern "C" __global__ void raw_dynamic(float* y) {
                extern __shared__ float dynamic[];
                y[threadIdx.x] = dynamic[threadIdx.x];
            }
            """;
        var error = Assert.Throws<CudaException>(() => _device.LoadModule(EmulatorTestSupport.Source("raw_dynamic.cu", source)))!;
        Assert.That(error.CompilerLog, Does.Contain("raw_dynamic.cu:2:"));
    }

    [Test]
    public void Second_load_of_a_file_comes_from_the_cache()
    {
        // A unique comment makes the first load a guaranteed miss in the shared test cache.
        string text = $"// {Guid.NewGuid()}\n" + Kernels;
        var source = EmulatorTestSupport.Source("cache_probe.cu", text);
        var watch = Stopwatch.StartNew();
        using var first = (EmulatorModule)_device.LoadModule(source);
        var compile = watch.Elapsed;
        watch.Restart();
        using var second = (EmulatorModule)_device.LoadModule(source);
        var cached = watch.Elapsed;
        try
        {
            Assert.That(first.LoadedFromCache, Is.False);
            Assert.That(second.LoadedFromCache, Is.True);
            Assert.That(second.LibraryPath, Is.EqualTo(first.LibraryPath));
            Assert.That(cached, Is.LessThan(compile), $"compile {compile.TotalMilliseconds:F0} ms, cache hit {cached.TotalMilliseconds:F0} ms");
            TestContext.Out.WriteLine($"compile {compile.TotalMilliseconds:F0} ms, cache hit {cached.TotalMilliseconds:F0} ms");
            using var y = DeviceBuffer.From<float>(_device, [1f, 2f, 3f]);
            _device.Run(second, "scale", new Dim3(1), new Dim3(32), 0, y, 2f, 3);
            Assert.That(y.Read<float>(3), Is.EqualTo(new[] { 2f, 4f, 6f }));
        }
        finally
        {
            File.Delete(first.LibraryPath);
        }
    }

    [Test]
    public void Exceeding_the_memory_budget_is_a_typed_out_of_memory_error()
    {
        using var small = new EmulatorBackend(EmulatorTestSupport.Options with { MemoryBytes = 1 << 20 });
        ulong first = small.Allocate(600_000);
        var error = Assert.Throws<CudaException>(() => small.Allocate(600_000))!;
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.OutOfMemory));
        Assert.That(error.Message, Does.Contain("600000 bytes").And.Contain("of 1048576 bytes in use"));
        small.Free(first);
        ulong second = small.Allocate(600_000);
        small.Free(second);
        Assert.That(small.LiveAllocations, Is.Zero);
    }

    [Test]
    public void Allocations_are_counted_and_return_to_zero()
    {
        int processBefore = EmulatorMemoryCounters.LiveCount;
        var addresses = Enumerable.Range(1, 20).Select(i => _device.Allocate(i * 100)).ToList();
        Assert.That(_device.LiveAllocations, Is.EqualTo(20));
        Assert.That(EmulatorMemoryCounters.LiveCount, Is.EqualTo(processBefore + 20));
        Assert.That(_device.LiveAllocatedBytes, Is.EqualTo(Enumerable.Range(1, 20).Sum(i => (i * 100 + 255) / 256 * 256)),
            "each rounded up to 256 bytes");
        Assert.That(addresses, Has.All.Matches<ulong>(address => address % 256 == 0), "256-byte aligned like cudaMalloc");
        foreach (ulong address in addresses)
        {
            _device.Free(address);
        }
        Assert.That(_device.LiveAllocations, Is.Zero);
        Assert.That(_device.LiveAllocatedBytes, Is.Zero);
        Assert.That(EmulatorMemoryCounters.LiveCount, Is.EqualTo(processBefore));
        var error = Assert.Throws<CudaException>(() => _device.Free(addresses[0]))!;
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.InvalidValue));
        Assert.That(error.Message, Does.Contain("use after free"), "a double free names the freed allocation");
    }

    [Test]
    public void Copies_and_memsets_are_checked_against_their_allocation()
    {
        using var buffer = DeviceBuffer.Of<float>(_device, 10);
        byte[] host = new byte[48];
        var error = Assert.Throws<CudaException>(() => _device.CopyHostToDevice(buffer.Address, host, stream: 0))!;
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.InvalidValue));
        Assert.That(error.Message, Does.Contain("run 8 bytes past its end"));
        Assert.Throws<CudaException>(() => _device.CopyDeviceToHost(host, buffer.Address + 4, stream: 0));
        Assert.Throws<CudaException>(() => _device.Memset(buffer.Address - 4, 0, 4, stream: 0));
        Assert.Throws<CudaException>(() => _device.CopyDeviceToDevice(buffer.Address, buffer.Address + 8, 40, stream: 0));

        _device.Memset(buffer.Address, 0, 40, stream: 0);
        _device.CopyHostToDevice(buffer.Address + 4, BitConverter.GetBytes(5f), stream: 0);
        _device.CopyDeviceToDevice(buffer.Address + 8, buffer.Address + 4, 4, stream: 0);
        Assert.That(buffer.Read<float>(3), Is.EqualTo(new[] { 0f, 5f, 5f }));
    }

    [Test]
    public void Streams_are_validated_and_run_in_order()
    {
        nint stream = _device.CreateStream();
        using var y = DeviceBuffer.From<float>(_device, [1f, 1f]);
        var arguments = new KernelArgument[] { y, 3f, 2 };
        _device.Run(_module, "scale", new Dim3(1), new Dim3(32), 0, arguments);
        _device.Synchronize(stream);
        Assert.That(y.Read<float>(2), Is.EqualTo(new[] { 3f, 3f }));
        _device.DestroyStream(stream);
        var error = Assert.Throws<CudaException>(() => _device.Synchronize(stream))!;
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.InvalidHandle));
    }

    [Test]
    public void Launches_are_validated_before_they_run()
    {
        using var y = DeviceBuffer.Of<float>(_device, 1024);
        CudaException Invalid(Dim3 grid, Dim3 block, int shared, params KernelArgument[] arguments) =>
            Assert.Throws<CudaException>(() => _device.Run(_module, "scale", grid, block, shared, arguments))!;

        Assert.That(Invalid(new Dim3(1), new Dim3(1025), 0, y, 1f, 1).ErrorName, Is.EqualTo(EmulatorErrors.InvalidValue));
        Assert.That(Invalid(new Dim3(1), new Dim3(32, 32, 2), 0, y, 1f, 1).Message, Does.Contain("at most 1024 threads"));
        Assert.That(Invalid(new Dim3(0), new Dim3(32), 0, y, 1f, 1).Message, Does.Contain("grid (0, 1, 1) is invalid"));
        Assert.That(Invalid(new Dim3(1), new Dim3(32), 228 * 1024, y, 1f, 1).Message, Does.Contain("dynamic shared memory"));
        Assert.That(Invalid(new Dim3(1), new Dim3(32), 0, y, 1f).Message, Does.Contain("takes 3 arguments, 2 given"));
        var bounds = Assert.Throws<CudaException>(() => _device.Run(_module, "bounded", new Dim3(1), new Dim3(256), 0, y))!;
        Assert.That(bounds.ErrorName, Is.EqualTo(EmulatorErrors.LaunchOutOfResources));
        Assert.That(bounds.Message, Does.Contain("__launch_bounds__(128)"));
        var missing = Assert.Throws<CudaException>(() => _module.GetFunction("no_such_kernel"))!;
        Assert.That(missing.ErrorName, Is.EqualTo(EmulatorErrors.NotFound));
        Assert.That(missing.Message, Does.Contain("backend_tests.cu").And.Contain("scale, bounded"));
        var handle = Assert.Throws<CudaException>(() => _device.Launch(12345, new Dim3(1), new Dim3(1), 0, 0, []))!;
        Assert.That(handle.ErrorName, Is.EqualTo(EmulatorErrors.InvalidHandle));
        using var other = new EmulatorBackend(EmulatorTestSupport.Options);
        var foreign = Assert.Throws<CudaException>(() => other.Run(_module, "scale", new Dim3(1), new Dim3(1), 0, y, 1f, 1))!;
        Assert.That(foreign.Message, Does.Contain("another EmulatorBackend"));
    }

    [Test]
    public void Race_shadow_forgets_old_launches_when_launch_ids_wrap()
    {
        // The shadow keeps 10 bits of launch id: a write of launch k must not be mistaken, 1022 launches
        // later, for a write of the current launch (that would be a false race between blocks).
        using var y = DeviceBuffer.Of<float>(_device, 32);
        for (int launch = 0; launch < 1100; launch++)
        {
            _device.Run(_module, "write_from_block", new Dim3(2), new Dim3(32), 0, y, launch % 2);
        }
        Assert.That(y.Read<float>(32), Has.All.EqualTo(1f));
    }

    [Test]
    public void Endless_kernel_times_out_and_the_device_stays_usable()
    {
        using var device = new EmulatorBackend(EmulatorTestSupport.Options with { LaunchTimeout = TimeSpan.FromSeconds(1) });
        using var module = device.LoadModule(EmulatorTestSupport.Source("backend_tests.cu", Kernels));
        using var flag = DeviceBuffer.Of<int>(device, 1);
        device.Memset(flag.Address, 0, 4, stream: 0);
        var error = Assert.Throws<CudaException>(() => device.Run(module, "spin_until_set", new Dim3(1), new Dim3(64), 0, flag))!;
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.LaunchTimeout));
        Assert.That(error.Message, Does.Contain("did not finish within 1000 ms"));
        device.Memset(flag.Address, 1, 4, stream: 0);
        device.Run(module, "spin_until_set", new Dim3(1), new Dim3(64), 0, flag);
    }

    [Test]
    public void Missing_compiler_is_a_clear_error()
    {
        var options = EmulatorTestSupport.Options with { Compiler = "/nonexistent/kernellm-g++" };
        var error = Assert.Throws<CudaException>(() => new EmulatorBackend(options).Dispose())!;
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.NoCompiler));
        Assert.That(error.Message, Does.Contain("/nonexistent/kernellm-g++").And.Contain("KERNELLM_CXX"));
    }
}
