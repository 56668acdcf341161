using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Emulator;

namespace KernelLM.Tests.Cuda.Emulator;

/// <summary>
/// Stream capture and graph replay on the emulated device, with the driver's rules: recorded work does not run
/// until the graph is launched; launch arguments are the values at capture; what a replay must see change has to
/// be in device memory; host copies, synchronisations, allocations and legacy-stream work during a capture are
/// refused with the driver's error names and invalidate the capture.
/// </summary>
[TestFixture]
public sealed class EmulatorGraphTests
{
    private const string Kernels = """
        #include "common.cuh"

        // y[i] += a * x[i] for i < *n (n read from device memory when the kernel runs).
        extern "C" __global__ void axpy_at(float* y, const float* x, float a, const int* n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < *n) {
                y[i] += a * x[i];
            }
        }
        """;

    private CudaDevice _device = null!;
    private nint _stream;

    private EmulatorBackend Backend => (EmulatorBackend)_device.Backend;

    [OneTimeSetUp]
    public void SetUp()
    {
        _device = new CudaDevice(new EmulatorBackend(EmulatorTestSupport.Options), [EmulatorTestSupport.Source("graph_tests.cu", Kernels)]);
    }

    [OneTimeTearDown]
    public void TearDown() => _device.Dispose();

    [SetUp]
    public void CreateStream() => _stream = Backend.CreateStream();

    [TearDown]
    public void Clean()
    {
        Backend.DestroyStream(_stream);
        Assert.That(Backend.LiveGraphs, Is.Zero, "graphs leaked by the test");
        Assert.That(Backend.LiveAllocations, Is.Zero, "device allocations leaked by the test");
    }

    private void Axpy(DeviceTensor y, DeviceTensor x, float a, DeviceTensor n, nint stream)
    {
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        var arguments = new KernelArguments(values, pointers);
        arguments.Add(y.Address);
        arguments.Add(x.Address);
        arguments.Add(a);
        arguments.Add(n.Address);
        Backend.Launch(_device.Function("axpy_at"), new Dim3(1), new Dim3(32), 0, stream, arguments.Pointers);
    }

    [Test]
    public void A_graph_replays_its_work_with_the_captured_arguments_and_the_current_device_memory()
    {
        using var y = _device.Allocate("y", DType.F32, 8);
        using var x = _device.Allocate("x", DType.F32, 8);
        using var n = _device.Allocate("n", DType.I32, 1);
        y.Upload<float>(new float[8]);
        x.Upload<float>([1, 2, 3, 4, 5, 6, 7, 8]);
        n.Upload<int>([8]);
        float a = 2;
        using var graph = CudaGraph.Capture(_device, _stream, a, (scale, stream) =>
        {
            Axpy(y, x, scale, n, stream);
            Backend.Memset(x.Address, 0, 4, stream);                        // x[0] = 0
            Backend.CopyDeviceToDevice(x.Address + 4, x.Address + 8, 4, stream); // x[1] = x[2]
        });
        Assert.That(y.Download<float>(), Is.All.EqualTo(0f), "capturing runs nothing");
        Assert.That(x.Download<float>()[0], Is.EqualTo(1f));

        graph.Launch(_stream);
        Backend.Synchronize(_stream);
        Assert.That(y.Download<float>(), Is.EqualTo(new float[] { 2, 4, 6, 8, 10, 12, 14, 16 }));
        Assert.That(x.Download<float>()[..3], Is.EqualTo(new float[] { 0, 3, 3 }));

        n.Upload<int>([3]);   // the replay reads the new length; a = 2 stays as captured
        graph.Launch(_stream);
        Assert.That(y.Download<float>(), Is.EqualTo(new float[] { 2, 10, 12, 8, 10, 12, 14, 16 }));
    }

    [Test]
    public void Host_copies_and_synchronisation_of_the_capturing_stream_are_refused_and_invalidate_the_capture()
    {
        using var y = _device.Allocate("y", DType.F32, 8);
        Backend.BeginCapture(_stream);
        var copy = Assert.Throws<CudaException>(() => Backend.CopyHostToDevice(y.Address, new byte[4], _stream))!;
        Assert.That(copy.ErrorName, Is.EqualTo(EmulatorErrors.StreamCaptureUnsupported));
        var sync = Assert.Throws<CudaException>(() => Backend.Synchronize(_stream))!;
        Assert.That(sync.ErrorName, Is.EqualTo(EmulatorErrors.StreamCaptureUnsupported));
        var end = Assert.Throws<CudaException>(() => Backend.EndCapture(_stream))!;
        Assert.That(end.ErrorName, Is.EqualTo(EmulatorErrors.StreamCaptureInvalidated));
        Assert.That(end.Message, Does.Contain("CopyHostToDevice"));
        Backend.CopyHostToDevice(y.Address, new byte[4], _stream);   // the stream works again
    }

    [Test]
    public void Legacy_stream_work_and_allocation_during_a_capture_are_refused()
    {
        using var y = _device.Allocate("y", DType.F32, 8);
        using var n = _device.Allocate("n", DType.I32, 1);
        Backend.BeginCapture(_stream);
        var legacy = Assert.Throws<CudaException>(() => Axpy(y, y, 1, n, 0))!;
        Assert.That(legacy.ErrorName, Is.EqualTo(EmulatorErrors.StreamCaptureImplicit));
        var allocate = Assert.Throws<CudaException>(() => Backend.Allocate(64))!;
        Assert.That(allocate.ErrorName, Is.EqualTo(EmulatorErrors.StreamCaptureUnsupported));
        Assert.That(() => Backend.EndCapture(_stream), Throws.TypeOf<CudaException>()
            .With.Property(nameof(CudaException.ErrorName)).EqualTo(EmulatorErrors.StreamCaptureInvalidated));
    }

    [Test]
    public void A_failing_capture_callback_leaves_no_graph_and_the_stream_usable()
    {
        using var y = _device.Allocate("y", DType.F32, 8);
        using var n = _device.Allocate("n", DType.I32, 1);
        Assert.Throws<InvalidOperationException>(() => CudaGraph.Capture(_device, _stream, 0, (_, stream) =>
        {
            Axpy(y, y, 1, n, stream);
            throw new InvalidOperationException("planned");
        }));
        Assert.Throws<CudaException>(() => CudaGraph.Capture(_device, _stream, 0, (_, stream) => Backend.Synchronize(stream)));
        using var graph = CudaGraph.Capture(_device, _stream, 0, (_, stream) => Backend.Memset(y.Address, 0, 32, stream));
        graph.Launch(_stream);
    }

    [Test]
    public void Bad_handles_and_states_are_refused()
    {
        Assert.That(() => Backend.BeginCapture(0), Throws.TypeOf<CudaException>().With.Message.Contain("legacy default stream"));
        Assert.That(() => Backend.EndCapture(_stream), Throws.TypeOf<CudaException>().With.Message.Contain("not capturing"));
        Backend.BeginCapture(_stream);
        Assert.That(() => Backend.BeginCapture(_stream), Throws.TypeOf<CudaException>().With.Message.Contain("already capturing"));
        nint graph = Backend.EndCapture(_stream);
        Backend.DestroyGraph(graph);
        Assert.That(() => Backend.DestroyGraph(graph), Throws.TypeOf<CudaException>().With.Message.Contain("not a live graph"));
        Assert.That(() => Backend.LaunchGraph(graph, _stream), Throws.TypeOf<CudaException>().With.Message.Contain("not a live graph"));
    }
}
