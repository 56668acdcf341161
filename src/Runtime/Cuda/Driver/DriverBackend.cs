using System.Globalization;
using KernelLM.Native;
using static KernelLM.Native.CudaDriver;
using static KernelLM.Runtime.Cuda.Check;

namespace KernelLM.Runtime.Cuda.Driver;

/// <summary>
/// <see cref="ICudaBackend"/> over the real CUDA driver: one device's primary context, NVRTC-compiled modules
/// (through a <see cref="KernelCache"/>), explicit streams. Every device allocation is counted in
/// <see cref="DeviceMemoryCounters"/>; whatever is still allocated, loaded or created when the backend is
/// disposed is freed then (allocations are counted as leaked).
/// Copies: into or out of pageable host memory (managed arrays, spans) a copy is complete when the call
/// returns; into or out of page-locked memory (cuMemHostAlloc) it is asynchronous: synchronize the stream
/// before reading the destination.
/// Debug switch: KERNELLM_CUDA_SYNC=1 (or <see cref="SynchronizeAfterLaunch"/>) synchronises after every
/// launch so that a faulting kernel is named at its launch.
/// </summary>
public sealed partial class DriverBackend : ICudaBackend
{
    // Above 48 KiB of dynamic shared memory a kernel must opt in (cuFuncSetAttribute).
    private const int DefaultDynamicSharedLimit = 48 * 1024;

    private readonly PrimaryContextHandle _context;
    private readonly Lock _lock = new();
    private readonly Dictionary<ulong, long> _allocations = [];
    private readonly Dictionary<nint, StreamHandle> _streams = [];
    private readonly HashSet<DriverModule> _modules = [];
    private readonly Dictionary<nint, string> _functionNames = [];
    private readonly Dictionary<nint, int> _dynamicSharedOptIn = [];
    private readonly Lazy<string> _target;
    private bool _disposed;

    /// <summary>Opens a device. Throws <see cref="CudaException"/> starting "no CUDA device: ..." when libcuda is
    /// missing or cuInit finds no device.</summary>
    public DriverBackend(int deviceOrdinal = 0, KernelCache? cache = null)
    {
        var status = CudaDriverStatus.Current;
        status.ThrowIfNoDevice();
        if (deviceOrdinal < 0 || deviceOrdinal >= status.Devices.Count)
        {
            throw new CudaException($"no CUDA device {deviceOrdinal}: the driver reports {status.Devices.Count} " +
                $"({string.Join(", ", status.Devices.Select(device => $"{device.Ordinal}: {device.Name}"))})", nameof(CUresult.CUDA_ERROR_INVALID_DEVICE));
        }
        Device = status.Devices[deviceOrdinal];
        Cache = cache ?? KernelCache.ForCompiler("nvrtc");
        ThrowIfFailed(cuDeviceGet(out int device, deviceOrdinal));
        _context = PrimaryContextHandle.Retain(device);
        try
        {
            MakeCurrent();
        }
        catch
        {
            _context.Dispose();
            throw;
        }
        _target = new Lazy<string>(() => NvrtcCompiler.TargetFor(Device.ComputeCapability));
        SynchronizeAfterLaunch = Environment.GetEnvironmentVariable("KERNELLM_CUDA_SYNC") == "1";
    }

    public CudaDeviceInfo Device { get; }

    public string DeviceName => Device.Name;

    public bool IsEmulated => false;

    public int ComputeCapability => Device.ComputeCapability;

    public long TotalMemoryBytes => Device.TotalMemoryBytes;

    public int MultiprocessorCount => Device.Multiprocessors;

    public KernelCache Cache { get; }

    /// <summary>What <see cref="LoadModule"/> compiles for: `sm_XY` for this device, or `compute_XY` PTX when
    /// the installed NVRTC predates the device.</summary>
    public string Target => _target.Value;

    public bool SynchronizeAfterLaunch { get; set; }

    /// <summary>cuMemGetInfo: free and total bytes on the device now.</summary>
    public (long Free, long Total) MemoryInfo()
    {
        MakeCurrent();
        ThrowIfFailed(cuMemGetInfo_v2(out nuint free, out nuint total));
        return ((long)free, (long)total);
    }

    public ulong Allocate(long bytes)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(bytes);
        MakeCurrent();
        var result = cuMemAlloc_v2(out ulong address, (nuint)bytes);
        if (result == CUresult.CUDA_ERROR_OUT_OF_MEMORY)
        {
            var (free, total) = MemoryInfo();
            throw new CudaException(string.Create(CultureInfo.InvariantCulture,
                $"CUDA_ERROR_OUT_OF_MEMORY: cannot allocate {bytes} bytes on {DeviceName} ({free} of {total} bytes free)"), result.ToString());
        }
        ThrowIfFailed(result);
        lock (_lock)
        {
            _allocations.Add(address, bytes);
        }
        DeviceMemoryCounters.Allocated(bytes);
        return address;
    }

    public void Free(ulong address)
    {
        long bytes;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (!_allocations.Remove(address, out bytes))
            {
                throw new CudaException($"Free(0x{address:x}): not a live allocation of this backend (freed twice, or never allocated here)");
            }
        }
        MakeCurrent();
        ThrowIfFailed(cuMemFree_v2(address));
        DeviceMemoryCounters.Freed(bytes);
    }

    public unsafe void CopyHostToDevice(ulong destination, ReadOnlySpan<byte> source, nint stream)
    {
        if (source.IsEmpty)
        {
            return;
        }
        MakeCurrent();
        fixed (byte* pointer = source)
        {
            ThrowIfFailed(cuMemcpyHtoDAsync_v2(destination, pointer, (nuint)source.Length, stream));
        }
    }

    public unsafe void CopyDeviceToHost(Span<byte> destination, ulong source, nint stream)
    {
        if (destination.IsEmpty)
        {
            return;
        }
        MakeCurrent();
        fixed (byte* pointer = destination)
        {
            ThrowIfFailed(cuMemcpyDtoHAsync_v2(pointer, source, (nuint)destination.Length, stream));
        }
    }

    public void CopyDeviceToDevice(ulong destination, ulong source, long bytes, nint stream)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(bytes);
        if (bytes == 0)
        {
            return;
        }
        MakeCurrent();
        ThrowIfFailed(cuMemcpyDtoDAsync_v2(destination, source, (nuint)bytes, stream));
    }

    public void Memset(ulong destination, byte value, long bytes, nint stream)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(bytes);
        if (bytes == 0)
        {
            return;
        }
        MakeCurrent();
        ThrowIfFailed(cuMemsetD8Async(destination, value, (nuint)bytes, stream));
    }

    public nint CreateStream()
    {
        MakeCurrent();
        // A blocking stream (CU_STREAM_DEFAULT): work on stream 0 (the legacy default stream) still orders with it.
        var stream = StreamHandle.Create(_context, CudaFlags.CU_STREAM_DEFAULT);
        nint value = stream.DangerousGetHandle();
        lock (_lock)
        {
            _streams.Add(value, stream);
        }
        return value;
    }

    public void DestroyStream(nint stream)
    {
        StreamHandle? handle;
        lock (_lock)
        {
            if (!_streams.Remove(stream, out handle))
            {
                throw new CudaException($"DestroyStream(0x{stream:x}): not a live stream of this backend");
            }
        }
        handle.Dispose();
    }

    public void Synchronize(nint stream)
    {
        MakeCurrent();
        ThrowIfFailed(cuStreamSynchronize(stream));
    }

    public IKernelModule LoadModule(KernelSource source)
    {
        ArgumentNullException.ThrowIfNull(source);
        var compiled = NvrtcCompiler.Compile(source, Target, Cache);
        MakeCurrent();
        var result = ModuleHandle.Load(_context, compiled.Image, out var handle);
        if (result != CUresult.CUDA_SUCCESS)
        {
            handle.Dispose();
            string hint = result == CUresult.CUDA_ERROR_UNSUPPORTED_PTX_VERSION
                ? $" (NVRTC {NvrtcCompiler.Info.Version} is newer than driver {CudaDriverStatus.Current.DriverVersionText}: use an NVRTC no newer than the driver)"
                : "";
            throw new CudaException($"{source.FileName}: cuModuleLoadData of its {compiled.Kind} for {compiled.Arch} returned {Name(result)} ({Describe(result)}){hint}",
                Name(result), compiled.Log, source.FileName);
        }
        var module = new DriverModule(this, source, handle);
        lock (_lock)
        {
            _modules.Add(module);
        }
        return module;
    }

    public unsafe void Launch(nint function, Dim3 grid, Dim3 block, int dynamicSharedBytes, nint stream, ReadOnlySpan<nint> arguments)
    {
        if (grid.X <= 0 || grid.Y <= 0 || grid.Z <= 0 || block.X <= 0 || block.Y <= 0 || block.Z <= 0 || dynamicSharedBytes < 0)
        {
            throw new CudaException($"launch of {FunctionName(function)}: grid {grid}, block {block}, dynamic shared memory {dynamicSharedBytes} B: every dimension must be positive");
        }
        MakeCurrent();
        if (dynamicSharedBytes > DefaultDynamicSharedLimit)
        {
            OptInToDynamicShared(function, dynamicSharedBytes);
        }
        CUresult result;
        fixed (nint* pointers = arguments)
        {
            result = cuLaunchKernel(function, (uint)grid.X, (uint)grid.Y, (uint)grid.Z, (uint)block.X, (uint)block.Y, (uint)block.Z,
                (uint)dynamicSharedBytes, stream, (void**)pointers, null);
        }
        if (result == CUresult.CUDA_SUCCESS && SynchronizeAfterLaunch && !IsCapturing(stream))
        {
            result = cuStreamSynchronize(stream);
        }
        if (result != CUresult.CUDA_SUCCESS)
        {
            throw new CudaException($"launch of {FunctionName(function)} (grid {grid}, block {block}, {dynamicSharedBytes} B dynamic shared memory) " +
                $"returned {Name(result)} ({Describe(result)})", Name(result));
        }
    }

    public void Dispose()
    {
        KeyValuePair<ulong, long>[] allocations;
        StreamHandle[] streams;
        DriverModule[] modules;
        lock (_lock)
        {
            if (_disposed)
            {
                return;
            }
            _disposed = true;
            allocations = _allocations.ToArray();
            streams = _streams.Values.ToArray();
            modules = _modules.ToArray();
            _allocations.Clear();
            _streams.Clear();
            _modules.Clear();
        }
        cuCtxSetCurrent(_context.DangerousGetHandle());
        cuCtxSynchronize();
        DestroyGraphs();
        DestroyCublas();
        FreePinnedBuffers();
        foreach (var (address, bytes) in allocations)
        {
            cuMemFree_v2(address);
            DeviceMemoryCounters.FreedAsLeak(bytes);
        }
        foreach (var stream in streams)
        {
            stream.Dispose();
        }
        foreach (var module in modules)
        {
            module.Dispose();
        }
        _context.Dispose();
    }

    public override string ToString() => $"{DeviceName} ({Device.Arch}, {TotalMemoryBytes / (1 << 20)} MiB, driver {CudaDriverStatus.Current.DriverVersionText})";

    // The driver's current context is per thread; any thread may call the backend.
    private void MakeCurrent()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ThrowIfFailed(cuCtxSetCurrent(_context.DangerousGetHandle()));
    }

    private void OptInToDynamicShared(nint function, int bytes)
    {
        lock (_lock)
        {
            if (_dynamicSharedOptIn.TryGetValue(function, out int granted) && granted >= bytes)
            {
                return;
            }
        }
        var result = cuFuncSetAttribute(function, CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes);
        if (result != CUresult.CUDA_SUCCESS)
        {
            throw new CudaException($"{FunctionName(function)}: cannot use {bytes} B of dynamic shared memory " +
                $"(the device allows {Device.MaxSharedMemoryPerBlockOptIn} B per block): {Name(result)} ({Describe(result)})", Name(result));
        }
        lock (_lock)
        {
            _dynamicSharedOptIn[function] = bytes;
        }
    }

    private string FunctionName(nint function)
    {
        lock (_lock)
        {
            return _functionNames.TryGetValue(function, out string? name) ? name : $"function 0x{function:x}";
        }
    }

    private void Forget(DriverModule module, IEnumerable<nint> functions)
    {
        lock (_lock)
        {
            _modules.Remove(module);
            foreach (nint function in functions)
            {
                _functionNames.Remove(function);
                _dynamicSharedOptIn.Remove(function);
            }
        }
    }

    /// <summary>One loaded kernel file; its functions are valid until it is disposed.</summary>
    private sealed class DriverModule(DriverBackend backend, KernelSource source, ModuleHandle handle) : IKernelModule
    {
        private readonly Dictionary<string, nint> _functions = new(StringComparer.Ordinal);

        public string FileName => source.FileName;

        public nint GetFunction(string name)
        {
            ArgumentNullException.ThrowIfNull(name);
            lock (_functions)
            {
                ObjectDisposedException.ThrowIf(handle.IsClosed, this);
                if (_functions.TryGetValue(name, out nint cached))
                {
                    return cached;
                }
                backend.MakeCurrent();
                var result = cuModuleGetFunction(out nint function, handle.DangerousGetHandle(), name);
                if (result == CUresult.CUDA_ERROR_NOT_FOUND)
                {
                    throw new CudaException($"{FileName}: no kernel function '{name}' (entry points: {string.Join(", ", source.EntryPoints)})",
                        Name(result), fileName: FileName);
                }
                ThrowIfFailed(result);
                _functions[name] = function;
                lock (backend._lock)
                {
                    backend._functionNames[function] = $"{name} ({FileName})";
                }
                return function;
            }
        }

        public void Dispose()
        {
            nint[] functions;
            lock (_functions)
            {
                if (handle.IsClosed)
                {
                    return;
                }
                functions = _functions.Values.ToArray();
                _functions.Clear();
                handle.Dispose();
            }
            backend.Forget(this, functions);
        }
    }
}
