namespace KernelLM.Runtime.Cuda;

/// <summary>Launch geometry, as CUDA's dim3.</summary>
public readonly record struct Dim3(int X, int Y = 1, int Z = 1)
{
    public long Count => (long)X * Y * Z;

    public override string ToString() => $"({X}, {Y}, {Z})";
}

/// <summary>
/// One kernel source file as the kernel library hands it to a backend: the `.cu` text, its file name (for
/// error messages) and every header it may include (`common.cuh`), by name.
/// </summary>
public sealed record KernelSource(string FileName, string Text, IReadOnlyDictionary<string, string> Headers)
{
    /// <summary>Names of the `extern "C" __global__` entry points declared in the file.</summary>
    public IReadOnlyList<string> EntryPoints { get; init; } = [];
}

/// <summary>A compiled kernel file on one backend; functions are looked up by their extern "C" name.</summary>
public interface IKernelModule : IDisposable
{
    string FileName { get; }

    /// <summary>The function's handle (CUfunction on the driver; an entry of the emulator's table).
    /// Throws <see cref="CudaException"/> naming the function and file when it does not exist.</summary>
    nint GetFunction(string name);
}

/// <summary>
/// The driver interface the CUDA device is written against, with two implementations: the real CUDA
/// driver (libcuda + NVRTC) and the in-process emulator (the same `.cu` files compiled for the CPU by g++
/// with a CUDA shim header). Addresses are device addresses (CUdeviceptr); streams are opaque handles
/// (0 = the default stream). Every call checks its result and throws <see cref="CudaException"/>.
/// Launch arguments are passed the way cuLaunchKernel takes them: one pointer per argument, pointing at
/// the argument's value.
/// </summary>
public interface ICudaBackend : IDisposable
{
    /// <summary>"NVIDIA H200", or "emulated (N threads)".</summary>
    string DeviceName { get; }

    bool IsEmulated { get; }

    /// <summary>major * 10 + minor (90 for sm_90).</summary>
    int ComputeCapability { get; }

    long TotalMemoryBytes { get; }

    /// <summary>Streaming multiprocessors (132 on an H200); launchers size grids with it (flash-decoding's split
    /// count). The emulated device reports <see cref="Emulator.EmulatorOptions.Multiprocessors"/>.</summary>
    int MultiprocessorCount { get; }

    ulong Allocate(long bytes);

    void Free(ulong address);

    void CopyHostToDevice(ulong destination, ReadOnlySpan<byte> source, nint stream);

    void CopyDeviceToHost(Span<byte> destination, ulong source, nint stream);

    void CopyDeviceToDevice(ulong destination, ulong source, long bytes, nint stream);

    void Memset(ulong destination, byte value, long bytes, nint stream);

    nint CreateStream();

    void DestroyStream(nint stream);

    void Synchronize(nint stream);

    /// <summary>Compiles (or takes from the cache) and loads one kernel file.</summary>
    IKernelModule LoadModule(KernelSource source);

    /// <summary>Enqueues a launch on the stream; never synchronises (except the debug switch).</summary>
    void Launch(nint function, Dim3 grid, Dim3 block, int dynamicSharedBytes, nint stream, ReadOnlySpan<nint> arguments);

    /// <summary>Starts recording the work enqueued on <paramref name="stream"/> (a created stream, never 0) into a graph
    /// instead of running it (thread-local capture mode). Host copies and synchronisations of that stream, work on the
    /// legacy default stream, and device allocation on this thread are refused until <see cref="EndCapture"/>.</summary>
    void BeginCapture(nint stream);

    /// <summary>Ends the capture and instantiates what was recorded: an executable graph for <see cref="LaunchGraph"/>.
    /// Throws (and ends the capture) when a refused call invalidated it.</summary>
    nint EndCapture(nint stream);

    /// <summary>Enqueues the graph's work on <paramref name="stream"/>, with the argument values captured.</summary>
    void LaunchGraph(nint graph, nint stream);

    void DestroyGraph(nint graph);

    /// <summary>Page-locked host memory (cuMemHostAlloc): copies from it run asynchronously, overlapping host work.</summary>
    nint AllocatePinned(long bytes);

    void FreePinned(nint host);

    /// <summary>Enqueues a copy from page-locked memory (<see cref="AllocatePinned"/>) to the device. The source must
    /// stay unchanged until the stream, or an event recorded after the copy, has been synchronised.</summary>
    void CopyPinnedToDevice(ulong destination, nint source, long bytes, nint stream);

    /// <summary>An event recorded on <paramref name="stream"/> after the work enqueued so far; pass it once to
    /// <see cref="SynchronizeEvent"/>, which waits for that work and releases the event.</summary>
    nint RecordEvent(nint stream);

    void SynchronizeEvent(nint @event);
}

/// <summary>A CUDA driver, NVRTC, cuBLAS or emulator failure: the API's enum name, its own error string,
/// the failing expression, and (for compilation) the compiler log and the file name.</summary>
public sealed class CudaException : KernelLMException
{
    public CudaException() { }
    public CudaException(string message) : base(message) { }
    public CudaException(string message, Exception inner) : base(message, inner) { }

    public CudaException(string message, string? errorName, string? compilerLog = null, string? fileName = null) : base(message)
    {
        ErrorName = errorName;
        CompilerLog = compilerLog;
        FileName = fileName;
    }

    /// <summary>CUDA_ERROR_OUT_OF_MEMORY, NVRTC_ERROR_COMPILATION, ...</summary>
    public string? ErrorName { get; }

    public string? CompilerLog { get; }

    public string? FileName { get; }
}
