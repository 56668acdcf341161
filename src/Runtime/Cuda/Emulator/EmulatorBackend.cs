using System.Runtime.InteropServices;
using System.Text;
using System.Text.RegularExpressions;

namespace KernelLM.Runtime.Cuda.Emulator;

/// <summary>
/// The emulated CUDA device: the same kernels/*.cu compiled for the CPU by g++ (with cuda_shim.h) and run
/// with real threads, for CI and machines without a GPU. Device memory is host memory in a reserved arena,
/// with guard regions around every allocation; every load and store of a kernel to device or shared
/// memory is checked (bounds, alignment, races between threads and between blocks), barriers and warp
/// operations check their participants, and the guards are compared after every launch. Launches and
/// copies run synchronously, in call order, whatever the stream. See docs/emulator.md.
/// </summary>
/// <example><code>
/// using var device = new EmulatorBackend(new EmulatorOptions { MemoryBytes = 64 &lt;&lt; 20 });
/// using var module = device.LoadModule(KernelSources.Get("rms_norm.cu"));
/// device.Launch(module.GetFunction("rms_norm_bf16"), grid, block, 0, stream: 0, arguments);
/// </code></example>
public sealed unsafe partial class EmulatorBackend : ICudaBackend
{
    private const int MaxThreadsPerBlock = 1024;
    private const uint MaxLaunchId = 1022;   // the shadow keeps 10 bits of launch id; 1023 marks poison
    private const int HandleIndexBits = 24;  // function handle = backend id << 24 | (kernel index + 1)

    private static int s_nextId;

    private readonly Lock _lock = new();
    private readonly EmulatorOptions _options;
    private readonly EmulatorCompiler _compiler;
    private readonly EmulatorRuntime _runtime;
    private readonly EmulatedDeviceHandle _device;
    private readonly DeviceHeap _heap;
    private readonly List<EmulatedKernel> _kernels = [];
    private readonly List<EmulatorModule> _modules = [];
    private readonly HashSet<nint> _streams = [];
    private readonly int _apiVersion;
    private readonly long _id = Interlocked.Increment(ref s_nextId);
    private long _nextStream;
    private uint _launchId;
    private bool _disposed;

    public EmulatorBackend() : this(new EmulatorOptions()) { }

    /// <summary>Compiles (or takes from the cache) the runtime and reserves the device arena. Throws
    /// <see cref="CudaException"/> when g++ is missing.</summary>
    public EmulatorBackend(EmulatorOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentOutOfRangeException.ThrowIfLessThanOrEqual(options.MemoryBytes, 0);
        ArgumentOutOfRangeException.ThrowIfLessThan(options.Threads, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(options.Multiprocessors, 1);
        ArgumentOutOfRangeException.ThrowIfNegative(options.MaxDynamicSharedBytes);
        if (options.GuardBytes < DeviceHeap.Alignment || options.GuardBytes % DeviceHeap.Alignment != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(options), $"GuardBytes must be a positive multiple of {DeviceHeap.Alignment}");
        }
        _options = options;
        _compiler = new EmulatorCompiler(options.Compiler, options.CacheDirectory);
        _runtime = EmulatorRuntime.Load(_compiler);
        _apiVersion = int.Parse(ApiVersionPattern().Match(EmulatorCompiler.ApiHeaderText).Groups[1].Value);
        // Room for the guards and for fragmentation; untouched pages cost nothing (MAP_NORESERVE).
        long arenaBytes = (options.MemoryBytes + options.MemoryBytes / 4 + (256L << 20) + 4095) / 4096 * 4096;
        nint device = _runtime.CreateDevice((ulong)arenaBytes, out ulong arenaBase);
        if (device == 0)
        {
            throw new CudaException($"cannot reserve {arenaBytes} bytes of address space (and 8 times as much for its shadow) " +
                                    "for the emulated device", EmulatorErrors.OutOfMemory);
        }
        _device = new EmulatedDeviceHandle(_runtime, device);
        _heap = new DeviceHeap(arenaBase, arenaBytes, options.MemoryBytes, options.GuardBytes,
            (offset, bytes, addressable) => _runtime.Mark(_device.DangerousGetHandle(), (ulong)offset, (ulong)bytes, addressable));
    }

    public string DeviceName => $"emulated ({_options.Threads} threads)";

    public bool IsEmulated => true;

    public int ComputeCapability => _options.ComputeCapability;

    public long TotalMemoryBytes => _options.MemoryBytes;

    public int MultiprocessorCount => _options.Multiprocessors;

    /// <summary>Live device allocations of this backend (tests assert it returns to zero).</summary>
    public int LiveAllocations
    {
        get
        {
            lock (_lock)
            {
                return _heap.LiveCount;
            }
        }
    }

    /// <summary>Bytes charged to this backend's budget by live allocations (each rounded up to 256).</summary>
    public long LiveAllocatedBytes
    {
        get
        {
            lock (_lock)
            {
                return _heap.LiveBytes;
            }
        }
    }

    /// <summary>OS threads the process-wide runtime has created so far.</summary>
    public int RuntimeThreads => _runtime.Workers;

    public ulong Allocate(long bytes)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            RefuseAllocationDuringCapture("Allocate");
            var allocation = _heap.Allocate(bytes);
            EmulatorMemoryCounters.Add(allocation.Bytes, 1);
            return allocation.Address;
        }
    }

    public void Free(ulong address)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            RefuseAllocationDuringCapture("Free");
            DrainCopies();
            var (allocation, damage) = _heap.Free(address);
            EmulatorMemoryCounters.Add(-allocation.Bytes, -1);
            if (damage is not null)
            {
                throw new CudaException($"freeing {allocation}: {damage} (an out-of-bounds write that no launch check saw: host code?)",
                    EmulatorErrors.GuardCorrupted);
            }
        }
    }

    /// <summary>Where a device address is (which allocation, which offset), for messages.</summary>
    public string DescribeAddress(ulong address)
    {
        lock (_lock)
        {
            return _heap.Describe(address);
        }
    }

    public void CopyHostToDevice(ulong destination, ReadOnlySpan<byte> source, nint stream)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            CheckStream(stream);
            RefuseDuringCapture(stream, "CopyHostToDevice");
            DrainCopies();
            byte* target = _heap.Resolve(destination, source.Length, "CopyHostToDevice");
            source.CopyTo(new Span<byte>(target, source.Length));
        }
    }

    public void CopyDeviceToHost(Span<byte> destination, ulong source, nint stream)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            CheckStream(stream);
            RefuseDuringCapture(stream, "CopyDeviceToHost");
            DrainCopies();
            byte* origin = _heap.Resolve(source, destination.Length, "CopyDeviceToHost");
            new ReadOnlySpan<byte>(origin, destination.Length).CopyTo(destination);
        }
    }

    public void CopyDeviceToDevice(ulong destination, ulong source, long bytes, nint stream)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            CheckStream(stream);
            DrainCopies();
            byte* origin = _heap.Resolve(source, bytes, "CopyDeviceToDevice (source)");
            byte* target = _heap.Resolve(destination, bytes, "CopyDeviceToDevice (destination)");
            if (Captured(stream, "CopyDeviceToDevice") is { } nodes)
            {
                nodes.Add(GraphNode.Copy(destination, source, bytes));
                return;
            }
            Buffer.MemoryCopy(origin, target, bytes, bytes);
        }
    }

    public void Memset(ulong destination, byte value, long bytes, nint stream)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            CheckStream(stream);
            DrainCopies();
            byte* target = _heap.Resolve(destination, bytes, "Memset");
            if (Captured(stream, "Memset") is { } nodes)
            {
                nodes.Add(GraphNode.Fill(destination, value, bytes));
                return;
            }
            NativeMemory.Fill(target, (nuint)bytes, value);
        }
    }

    /// <summary>Streams only order work, and the emulator runs everything synchronously in call order.</summary>
    public nint CreateStream()
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            nint stream = (nint)(++_nextStream);
            _streams.Add(stream);
            return stream;
        }
    }

    public void DestroyStream(nint stream)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            if (stream == 0 || !_streams.Remove(stream))
            {
                throw new CudaException($"DestroyStream: 0x{stream:x} is not a live stream of this device", EmulatorErrors.InvalidHandle);
            }
        }
    }

    public void Synchronize(nint stream)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            CheckStream(stream);
            RefuseDuringCapture(stream, "Synchronize");
            DrainCopies();
        }
    }

    public IKernelModule LoadModule(KernelSource source)
    {
        ArgumentNullException.ThrowIfNull(source);
        ThrowIfDisposed();
        IReadOnlyList<string> entryPoints = source.EntryPoints.Count > 0 ? source.EntryPoints : KernelSources.FindEntryPoints(source.Text);
        if (entryPoints.Count == 0)
        {
            throw new CudaException($"{source.FileName}: no extern \"C\" __global__ entry point", EmulatorErrors.NotFound,
                fileName: source.FileName);
        }
        var library = _compiler.CompileModule(source, entryPoints);   // outside the lock: g++ takes seconds
        nint handle = NativeLibrary.Load(library.Path);
        int version = ((delegate* unmanaged<nint, int>)NativeLibrary.GetExport(handle, "klm_module_attach"))(_runtime.Api);
        if (version != _apiVersion)
        {
            throw new CudaException($"{source.FileName}: module API version {version}, runtime {_apiVersion} (stale cache?)",
                EmulatorErrors.Internal, fileName: source.FileName);
        }
        int count;
        var table = ((delegate* unmanaged<int*, KlmKernel*>)NativeLibrary.GetExport(handle, "klm_module_kernels"))(&count);
        nint staticShared;
        ulong staticSharedBytes;
        ((delegate* unmanaged<nint*, ulong*, void>)NativeLibrary.GetExport(handle, "klm_module_static_shared"))(&staticShared, &staticSharedBytes);
        nint enter = NativeLibrary.GetExport(handle, "klm_module_enter");
        var bounds = EmulatorModule.LaunchBounds(source.Text);
        var functions = new Dictionary<string, nint>(StringComparer.Ordinal);
        var module = new EmulatorModule(source, library.Path, library.FromCache, functions);
        lock (_lock)
        {
            ThrowIfDisposed();
            for (int i = 0; i < count; i++)
            {
                string name = KlmFault.Text(table[i].Name);
                var sizes = new int[table[i].ParameterCount];
                for (int p = 0; p < sizes.Length; p++)
                {
                    sizes[p] = (int)((uint*)table[i].ParameterSizes)[p];
                }
                _kernels.Add(new EmulatedKernel(module, name, table[i].Thunk, enter, table[i].ParameterCount,
                    bounds.TryGetValue(name, out int limit) ? limit : null, staticShared, staticSharedBytes) { ParameterSizes = sizes });
                functions[name] = (nint)(_id << HandleIndexBits | (long)_kernels.Count);
            }
            _modules.Add(module);
        }
        return module;
    }

    public void Launch(nint function, Dim3 grid, Dim3 block, int dynamicSharedBytes, nint stream, ReadOnlySpan<nint> arguments)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            CheckStream(stream);
            var kernel = Resolve(function);
            Validate(kernel, grid, block, dynamicSharedBytes, arguments);
            DrainCopies();
            if (Captured(stream, "Launch") is { } nodes)
            {
                nodes.Add(GraphNode.Launch(kernel, grid, block, dynamicSharedBytes, arguments));
                return;
            }
            Run(kernel, grid, block, dynamicSharedBytes, arguments);
        }
    }

    /// <summary>Runs one validated launch (the caller holds the lock).</summary>
    private void Run(EmulatedKernel kernel, Dim3 grid, Dim3 block, int dynamicSharedBytes, ReadOnlySpan<nint> arguments)
    {
        if (++_launchId > MaxLaunchId)
        {
            // The shadow holds the launch id in 10 bits: forget every earlier launch's writes.
            foreach (var allocation in _heap.Live)
            {
                _runtime.Mark(_device.DangerousGetHandle(), allocation.Address - _heap.ArenaBase, (ulong)allocation.Bytes, true);
            }
            _launchId = 1;
        }
        var desc = new KlmLaunchDesc
        {
            Device = _device.DangerousGetHandle(),
            Thunk = kernel.Thunk,
            Enter = kernel.Enter,
            DynamicSharedBytes = (uint)dynamicSharedBytes,
            LaunchId = _launchId,
            DeviceUsedBytes = (ulong)_heap.HighWater,
            StaticShared = kernel.StaticShared,
            StaticSharedBytes = kernel.StaticSharedBytes,
            Parallelism = _options.Threads,
            TimeoutMilliseconds = (int)Math.Clamp(_options.LaunchTimeout.TotalMilliseconds, 1, int.MaxValue),
        };
        desc.Grid[0] = (uint)grid.X;
        desc.Grid[1] = (uint)grid.Y;
        desc.Grid[2] = (uint)grid.Z;
        desc.Block[0] = (uint)block.X;
        desc.Block[1] = (uint)block.Y;
        desc.Block[2] = (uint)block.Z;
        KlmFault fault;
        fixed (nint* parameters = arguments)
        {
            desc.Params = (nint)parameters;
            _runtime.Launch(&desc, &fault);
        }
        string? damage = CheckAllGuards();
        if (fault.Kind != KlmFaultKind.None)
        {
            throw FaultException(kernel, fault, damage);
        }
        if (damage is not null)
        {
            throw new CudaException($"kernel '{kernel.Name}' ({kernel.Module.FileName}): out-of-bounds write: {damage} " +
                                    "(a write the access checks did not see, such as memset)",
                EmulatorErrors.GuardCorrupted, fileName: kernel.Module.FileName);
        }
    }

    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed)
            {
                return;
            }
            _disposed = true;
            foreach (var module in _modules)
            {
                module.Dispose();
            }
            FreePinnedBuffers();
            // Like destroying a CUDA context: what is still allocated goes with it.
            EmulatorMemoryCounters.Add(-_heap.Live.Sum(allocation => allocation.Bytes), -_heap.LiveCount);
            _heap.Clear();
            _device.Dispose();
        }
    }

    private EmulatedKernel Resolve(nint function)
    {
        long index = function & ((1L << HandleIndexBits) - 1);
        if (function >> HandleIndexBits != _id || index < 1 || index > _kernels.Count)
        {
            throw new CudaException($"Launch: 0x{function:x} is not a function handle of this device (a module loaded on " +
                                    "another EmulatorBackend?)", EmulatorErrors.InvalidHandle);
        }
        var kernel = _kernels[(int)index - 1];
        if (kernel.Module.IsDisposed)
        {
            throw new CudaException($"Launch: kernel '{kernel.Name}' belongs to {kernel.Module.FileName}, which was unloaded",
                EmulatorErrors.InvalidHandle, fileName: kernel.Module.FileName);
        }
        return kernel;
    }

    private void Validate(EmulatedKernel kernel, Dim3 grid, Dim3 block, int dynamicSharedBytes, ReadOnlySpan<nint> arguments)
    {
        string Name() => $"launch of '{kernel.Name}' ({kernel.Module.FileName})";
        if (block.X < 1 || block.Y < 1 || block.Z < 1 || block.X > 1024 || block.Y > 1024 || block.Z > 64 || block.Count > MaxThreadsPerBlock)
        {
            throw new CudaException($"{Name()}: block {block} is invalid (each dimension at least 1; x, y at most 1024, z at most 64; " +
                                    $"at most {MaxThreadsPerBlock} threads)", EmulatorErrors.InvalidValue, fileName: kernel.Module.FileName);
        }
        if (grid.X < 1 || grid.Y < 1 || grid.Z < 1 || grid.Y > 65535 || grid.Z > 65535)
        {
            throw new CudaException($"{Name()}: grid {grid} is invalid (each dimension at least 1; y and z at most 65535)",
                EmulatorErrors.InvalidValue, fileName: kernel.Module.FileName);
        }
        if (kernel.LaunchBounds is int limit && block.Count > limit)
        {
            throw new CudaException($"{Name()}: {block.Count} threads per block exceed its __launch_bounds__({limit})",
                EmulatorErrors.LaunchOutOfResources, fileName: kernel.Module.FileName);
        }
        if (dynamicSharedBytes < 0 || dynamicSharedBytes > _options.MaxDynamicSharedBytes)
        {
            throw new CudaException($"{Name()}: {dynamicSharedBytes} bytes of dynamic shared memory (the limit is " +
                                    $"{_options.MaxDynamicSharedBytes})", EmulatorErrors.InvalidValue, fileName: kernel.Module.FileName);
        }
        if (arguments.Length != kernel.ParameterCount)
        {
            throw new CudaException($"{Name()}: the kernel takes {kernel.ParameterCount} arguments, {arguments.Length} given",
                EmulatorErrors.InvalidValue, fileName: kernel.Module.FileName);
        }
        for (int i = 0; i < arguments.Length; i++)
        {
            if (arguments[i] == 0)
            {
                throw new CudaException($"{Name()}: argument {i} is a null pointer (each argument is a pointer to its value)",
                    EmulatorErrors.InvalidValue, fileName: kernel.Module.FileName);
            }
        }
    }

    private CudaException FaultException(EmulatedKernel kernel, in KlmFault fault, string? damage)
    {
        var text = new StringBuilder($"kernel '{kernel.Name}' ({kernel.Module.FileName}): {fault.MessageText}");
        if (fault.Kind is KlmFaultKind.OutOfBounds or KlmFaultKind.Race or KlmFaultKind.Misaligned && _heap.InArena(fault.Address))
        {
            text.Append("; ").Append(_heap.Describe(fault.Address));
        }
        if (fault.ModulePath != 0 && SourceLocator.Locate(KlmFault.Text(fault.ModulePath), fault.CodeOffset) is string location)
        {
            text.Append(" [at ").Append(location).Append(']');
        }
        if (damage is not null)
        {
            text.Append("; also ").Append(damage);
        }
        string name = fault.Kind switch
        {
            KlmFaultKind.OutOfBounds or KlmFaultKind.NullAddress or KlmFaultKind.SharedOutOfBounds => EmulatorErrors.IllegalAddress,
            KlmFaultKind.Misaligned => EmulatorErrors.MisalignedAddress,
            KlmFaultKind.Race => EmulatorErrors.Race,
            KlmFaultKind.Barrier => EmulatorErrors.Barrier,
            KlmFaultKind.WarpSync => EmulatorErrors.WarpSync,
            KlmFaultKind.Deadlock => EmulatorErrors.Deadlock,
            KlmFaultKind.Trap => EmulatorErrors.LaunchFailed,
            KlmFaultKind.Assert => EmulatorErrors.Assert,
            KlmFaultKind.Timeout => EmulatorErrors.LaunchTimeout,
            _ => EmulatorErrors.Internal,
        };
        return new CudaException(text.ToString(), name, fileName: kernel.Module.FileName);
    }

    /// <summary>Compares every live allocation's guards; restores damaged ones and describes the first.</summary>
    private string? CheckAllGuards()
    {
        string? first = null;
        var live = _heap.Live;
        for (int i = 0; i < live.Count; i++) // by index: a foreach over the interface would allocate per launch
        {
            var allocation = live[i];
            if (_heap.CheckGuards(allocation) is string damage)
            {
                first ??= damage;
                _heap.RestoreGuards(allocation);
            }
        }
        return first;
    }

    private void CheckStream(nint stream)
    {
        if (stream != 0 && !_streams.Contains(stream))
        {
            throw new CudaException($"0x{stream:x} is not a live stream of this device", EmulatorErrors.InvalidHandle);
        }
    }

    private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(_disposed, this);

    [GeneratedRegex(@"#define\s+KLM_API_VERSION\s+(\d+)")]
    private static partial Regex ApiVersionPattern();

    /// <summary>The emulated device's arena and shadow (klm_device_create); released once.</summary>
    private sealed class EmulatedDeviceHandle : SafeHandle
    {
        private readonly EmulatorRuntime _runtime;

        public EmulatedDeviceHandle(EmulatorRuntime runtime, nint device) : base(0, ownsHandle: true)
        {
            _runtime = runtime;
            SetHandle(device);
        }

        public override bool IsInvalid => handle == 0;

        protected override bool ReleaseHandle()
        {
            _runtime.DestroyDevice(handle);
            return true;
        }
    }
}

/// <summary>Device memory of every emulated device in the process not yet freed (or released with its
/// backend): tests assert these return to their starting values, as with <see cref="NativeMemoryCounters"/>.</summary>
public static class EmulatorMemoryCounters
{
    private static long s_liveBytes;
    private static int s_liveCount;

    public static long LiveBytes => Interlocked.Read(ref s_liveBytes);
    public static int LiveCount => Volatile.Read(ref s_liveCount);

    internal static void Add(long bytes, int count)
    {
        Interlocked.Add(ref s_liveBytes, bytes);
        Interlocked.Add(ref s_liveCount, count);
    }
}
