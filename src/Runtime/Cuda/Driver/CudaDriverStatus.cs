using System.Globalization;
using System.Text;
using KernelLM.Native;
using static KernelLM.Native.CudaDriver;
using static KernelLM.Runtime.Cuda.Check;

namespace KernelLM.Runtime.Cuda.Driver;

/// <summary>One GPU as the driver describes it.</summary>
public sealed record CudaDeviceInfo(int Ordinal, string Name, int ComputeCapability, long TotalMemoryBytes)
{
    public int Multiprocessors { get; init; }
    public int MaxSharedMemoryPerBlockOptIn { get; init; }
    public int L2CacheBytes { get; init; }
    public int MemoryBusWidthBits { get; init; }

    /// <summary>"sm_90".</summary>
    public string Arch => string.Create(CultureInfo.InvariantCulture, $"sm_{ComputeCapability}");

    /// <summary>Reads a device's name and attributes (needs cuInit, no context).</summary>
    public static unsafe CudaDeviceInfo Query(int ordinal)
    {
        ThrowIfFailed(cuDeviceGet(out int device, ordinal));
        byte* name = stackalloc byte[256];
        ThrowIfFailed(cuDeviceGetName(name, 256, device));
        ThrowIfFailed(cuDeviceTotalMem_v2(out nuint totalBytes, device));
        int Attribute(CUdevice_attribute attribute)
        {
            ThrowIfFailed(cuDeviceGetAttribute(out int value, attribute, device));
            return value;
        }
        int major = Attribute(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
        int minor = Attribute(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR);
        return new CudaDeviceInfo(ordinal, new string((sbyte*)name), major * 10 + minor, (long)totalBytes)
        {
            Multiprocessors = Attribute(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            MaxSharedMemoryPerBlockOptIn = Attribute(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
            L2CacheBytes = Attribute(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE),
            MemoryBusWidthBits = Attribute(CUdevice_attribute.CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH),
        };
    }
}

/// <summary>
/// The CUDA driver as this process sees it: the library, what cuInit(0) returned, the driver version and the
/// devices, or why there are none. Computed once (cuInit's answer does not change within a process).
/// </summary>
public sealed class CudaDriverStatus
{
    private static readonly Lazy<CudaDriverStatus> s_current = new(Probe);

    private CudaDriverStatus(NativeLibraryProbe library) => Library = library;

    public static CudaDriverStatus Current => s_current.Value;

    public NativeLibraryProbe Library { get; }

    /// <summary>cuInit(0)'s result; null when libcuda was not found.</summary>
    public CUresult? InitResult { get; private set; }

    /// <summary>cuDriverGetVersion: 12020 for CUDA 12.2; 0 when unknown.</summary>
    public int DriverVersion { get; private set; }

    public IReadOnlyList<CudaDeviceInfo> Devices { get; private set; } = [];

    /// <summary>Why no device can be used ("no CUDA device: cuInit(0) returned CUDA_ERROR_NO_DEVICE ..."); null when one can.</summary>
    public string? Problem { get; private set; }

    /// <summary>The CUresult name behind <see cref="Problem"/>, when there is one.</summary>
    public string? ProblemErrorName { get; private set; }

    public string DriverVersionText => DriverVersion == 0 ? "unknown"
        : string.Create(CultureInfo.InvariantCulture, $"{DriverVersion / 1000}.{DriverVersion % 1000 / 10}");

    /// <summary>Throws the <see cref="CudaException"/> that says why there is no usable device.</summary>
    public void ThrowIfNoDevice()
    {
        if (Problem is not null)
        {
            throw new CudaException(Problem, ProblemErrorName);
        }
    }

    private static CudaDriverStatus Probe()
    {
        var status = new CudaDriverStatus(NativeLibraries.Load(NativeLibraries.Cuda));
        if (!status.Library.Found)
        {
            status.Problem = $"no CUDA device: the CUDA driver library is not installed ({status.Library.Describe()}; set KERNELLM_LIBCUDA to use a libcuda.so.1 elsewhere)";
            return status;
        }
        var init = cuInit(0);
        status.InitResult = init;
        if (cuDriverGetVersion(out int version) == CUresult.CUDA_SUCCESS)
        {
            status.DriverVersion = version;
        }
        if (init != CUresult.CUDA_SUCCESS)
        {
            status.ProblemErrorName = Name(init);
            status.Problem = init switch
            {
                CUresult.CUDA_ERROR_NO_DEVICE => $"no CUDA device: cuInit(0) returned CUDA_ERROR_NO_DEVICE ({Describe(init)})",
                // The toolkit's stub libcuda (for linking only) answers this when no real driver is installed.
                CUresult.CUDA_ERROR_STUB_LIBRARY => $"no CUDA device: {status.Library.Describe()} is the toolkit's stub library, not a driver ({Describe(init)})",
                _ => $"no usable CUDA device: cuInit(0) returned {Name(init)} ({Describe(init)})",
            };
            return status;
        }
        try
        {
            ThrowIfFailed(cuDeviceGetCount(out int count));
            if (count == 0)
            {
                status.Problem = "no CUDA device: the driver reports 0 devices";
                status.ProblemErrorName = nameof(CUresult.CUDA_ERROR_NO_DEVICE);
                return status;
            }
            status.Devices = Enumerable.Range(0, count).Select(CudaDeviceInfo.Query).ToArray();
        }
        catch (CudaException error)
        {
            status.Problem = $"no usable CUDA device: {error.Message}";
            status.ProblemErrorName = error.ErrorName;
        }
        return status;
    }

    public override string ToString()
    {
        var text = new StringBuilder();
        text.Append(CultureInfo.InvariantCulture, $"driver {DriverVersionText}, cuInit: {(InitResult is { } init ? Name(init) : "not called")}");
        foreach (var device in Devices)
        {
            text.Append(CultureInfo.InvariantCulture, $"; GPU {device.Ordinal}: {device.Name} ({device.Arch})");
        }
        if (Problem is not null)
        {
            text.Append("; ").Append(Problem);
        }
        return text.ToString();
    }
}
