using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;
using KernelLM.Runtime.Cuda.Emulator;
using KernelLM.Tests.Cuda;

namespace KernelLM.Tests.Conformance;

/// <summary>A device of the conformance suite: its name, the activation dtypes it computes in, and how to make it
/// (throwing <see cref="IgnoreException"/> with the reason when it does not exist on this machine).</summary>
public sealed record ConformanceDevice(string Name, IReadOnlyList<DType> Activations, Func<OpBackend> Create);

/// <summary>The devices, created once on first use and shared by every case.</summary>
internal static class ConformanceDevices
{
    private static readonly Dictionary<string, Lazy<OpBackend>> s_created = new(StringComparer.Ordinal);

    public static IReadOnlyList<ConformanceDevice> All { get; } =
    [
        new("cpu", [DType.F32], () => new CpuOpBackend()),
        new("cuda-emulated", [DType.F32, DType.BF16, DType.F16], Emulated),
        new("cuda", [DType.F32, DType.BF16, DType.F16], RealOrIgnore),
    ];

    /// <summary>The named device, or an ignored test carrying the reason it does not exist here.</summary>
    public static OpBackend Get(string name)
    {
        Lazy<OpBackend> device;
        lock (s_created)
        {
            if (!s_created.TryGetValue(name, out device!))
            {
                var profile = All.Single(d => d.Name == name);
                device = new Lazy<OpBackend>(profile.Create);
                s_created[name] = device;
            }
        }
        return device.Value;
    }

    public static void DisposeAll()
    {
        lock (s_created)
        {
            foreach (var device in s_created.Values.Where(d => d.IsValueCreated))
            {
                device.Value.Dispose();
            }
            s_created.Clear();
        }
    }

    /// <summary>The emulated CUDA device: every kernels/*.cu compiled by g++ with the CUDA shim and executed on
    /// CPU threads, with guard regions checked after each launch.</summary>
    private static CudaOpBackend Emulated() => new CudaOpBackend("cuda-emulated", new CudaDevice(new EmulatorBackend()));

    /// <summary>The real GPU (kernels compiled by NVRTC for its architecture), or an ignored case saying why not.</summary>
    private static CudaOpBackend RealOrIgnore()
    {
        CudaTestSupport.RequireDevice();
        return new CudaOpBackend("cuda", new CudaDevice(new DriverBackend()));
    }
}
